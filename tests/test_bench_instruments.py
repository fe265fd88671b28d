"""The bench's own instruments: saved-for-backward bytes and interleaved ratios."""
import torch
import torch.nn as nn

from bench.harness import SavedTensorCounter, interleaved_times, median_ratios


def test_saved_tensor_counter_counts_unique_storages_and_skips_parameters():
    lin = nn.Linear(8, 4, bias=False)
    x = torch.randn(16, 8, requires_grad=True)
    with SavedTensorCounter(exclude=lin) as counter:
        y = lin(x)          # saves x (for dW) and W (a parameter: not counted)
        z = torch.exp(y)    # saves its output z
        w = z * z           # saves z again: same storage, counted once
        v = x.view(-1) * 2  # saves nothing (multiplication by a constant)
    assert counter.bytes == x.numel() * 4 + z.numel() * 4
    (w.sum() + v.sum()).backward()


def test_saved_tensor_counter_excludes_given_tensors():
    a = torch.randn(32, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    with SavedTensorCounter(exclude=[b]) as counter:
        (a * b).sum()
    assert counter.bytes == 32 * 4  # b saved for da is excluded, a saved for db is counted


def test_interleaved_times_alternate_order_and_ratios_are_paired_medians():
    order = []
    fns = {"base": lambda: order.append("base"), "other": lambda: order.append("other")}
    times = interleaved_times(fns, rounds=4, warmup=1)
    assert order == ["base", "other", "base", "other", "other", "base", "base", "other", "other", "base"]
    assert all(len(t) == 4 for t in times.values())
    ratios = median_ratios({"base": [1.0, 2.0, 4.0], "other": [1.1, 2.4, 4.4]}, "base")
    assert ratios["base"] == 1.0 and abs(ratios["other"] - 1.1) < 1e-12
    assert median_ratios({"x": [1.0]}, "missing") == {}
