"""gift.memory, the byte counters of one training step: bytes saved for backward, and a step's peak."""
import torch
import torch.nn as nn

from gift.memory import SavedTensorCounter


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


def test_step_peak_keeps_the_forwards_own_transients_and_the_batch():
    """A frozen wide layer before a small trainable head: the forward's 4096-wide temporary is the step's peak
    (nothing of it is saved for backward), so the peak must hold it, beyond parameters, AdamW state and batch."""
    from gift.memory import measure_training_step, storage_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 16), torch.nn.Linear(16, 2)
    )
    model[:3].requires_grad_(False)
    x, y = torch.randn(8, 16), torch.zeros(8, dtype=torch.long)
    step = measure_training_step(model, x, y)
    wide = 8 * 4096 * 4
    assert step.saved_activation < wide and step.backward_transient < wide
    assert step.peak >= step.parameter + step.optimizer + storage_bytes([x, y]) + wide
