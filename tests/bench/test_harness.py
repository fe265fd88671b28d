"""The bench's own instruments: interleaved timing, paired ratios and their spread, the fair floor, the naive
merged baseline, and the targets line of the report (its saved-bytes counter is gift.memory's:
tests/model/test_memory.py)."""
import time

import pytest
import torch

from bench.harness import (
    GeneratorRuns,
    RatioStats,
    bench_rounds,
    build_provider,
    cuda_step_peak_bytes,
    format_ratio,
    interleaved_times,
    paired_ratios,
    quartiles,
    random_gift_state,
)
from gift.testing import assert_model_agrees, model_exact_and_baseline, outputs_and_grads
from tests.helpers import tiny_timm_vit


# ------------------------------------------------------------------------------------ timing and ratios
def test_interleaved_times_alternate_order():
    order = []
    fns = {"base": lambda: order.append("base"), "other": lambda: order.append("other")}
    times = interleaved_times(fns, rounds=4, warmup=1)
    assert order == ["base", "other", "base", "other", "other", "base", "base", "other", "other", "base"]
    assert all(len(t) == 4 for t in times.values())


def test_interleaved_times_prepares_arguments_outside_the_timed_region():
    received = []

    def prepare():
        time.sleep(0.05)  # would dominate the timing if it were inside the timed region
        return (len(received),)

    times = interleaved_times({"op": received.append}, rounds=3, warmup=1, prepare={"op": prepare})
    assert received == [0, 1, 2, 3]  # fresh arguments per call, warm-up included
    assert max(times["op"]) < 0.05


def test_paired_ratios_median_and_interquartile_range_on_known_data():
    base = [1.0, 2.0, 4.0, 1.0, 2.0]
    other = [1.0 * 1.1, 2.0 * 1.3, 4.0 * 1.2, 1.0 * 1.5, 2.0 * 1.4]  # per-round ratios 1.1 1.3 1.2 1.5 1.4
    ratios = paired_ratios({"base": base, "other": other}, "base")
    assert ratios["base"] == RatioStats(1.0, 1.0, 1.0)
    assert ratios["other"].median == pytest.approx(1.3)
    assert (ratios["other"].q1, ratios["other"].q3) == (pytest.approx(1.2), pytest.approx(1.4))
    assert ratios["other"].half_iqr == pytest.approx(0.1)
    assert paired_ratios({"x": [1.0]}, "missing") == {}
    assert quartiles([2.5]) == RatioStats(2.5, 2.5, 2.5)


def test_format_ratio_prints_the_digits_the_spread_supports():
    assert format_ratio(1.0432, 1.030, 1.056) == "1.04 ±0.01"
    assert format_ratio(1.0432, 1.0420, 1.0446) == "1.043 ±0.001"
    assert format_ratio(1.0432, 0.9, 1.3) == "1.0 ±0.2"
    assert format_ratio(1.2, 1.2, 1.2) == "1.200"
    assert format_ratio(None) == ""


def test_bench_rounds_from_the_environment(monkeypatch):
    monkeypatch.delenv("GIFT_BENCH_ROUNDS", raising=False)
    assert bench_rounds(24) == 24
    monkeypatch.setenv("GIFT_BENCH_ROUNDS", "2")
    assert bench_rounds(24) == 2
    monkeypatch.setenv("GIFT_BENCH_ROUNDS", "two")
    with pytest.raises(ValueError, match="GIFT_BENCH_ROUNDS='two' is not a positive integer"):
        bench_rounds(24)


# ------------------------------------------------------------------------------------ providers
def test_floor_backpropagates_down_to_the_first_target_input_and_nothing_below():
    backbone = tiny_timm_vit()
    floor = build_provider("floor", backbone, rank=8)
    model = floor.model
    seen = {}
    model.patch_embed.register_forward_hook(lambda m, a, out: seen.update(patch_embed=out.requires_grad))
    model.blocks[0].attn.qkv.register_forward_hook(lambda m, a, out: seen.update(qkv0=out.requires_grad))
    model.blocks[0].attn.proj.register_forward_hook(lambda m, a, out: seen.update(proj0_input=a[0]))
    x = torch.randn(2, 3, 32, 32)  # images, as every provider gets them
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    assert seen["patch_embed"] is False and seen["qkv0"] is False  # nothing below the first target is on the tape
    assert seen["proj0_input"].requires_grad  # backward reaches the first target's input: the zero gate's gradient
    gate = model.blocks[0].attn.proj.floor_gate
    assert gate.grad is not None and gate.grad.abs() > 0 and gate.item() == 0.0
    trained = [n for group in floor.optimizer.param_groups for n, p in model.named_parameters()
               if any(p is q for q in group["params"])]
    assert trained and all(n.startswith("head.") for n in trained)  # the gate is never stepped


def test_naive_merged_is_one_linear_per_target_and_matches_the_reference():
    backbone = tiny_timm_vit()
    state = random_gift_state(backbone, rank=8)
    ref = build_provider("reference", backbone, rank=8, gift_state=state)
    naive = build_provider("naive_merged", backbone, rank=8, gift_state=state)
    proj = naive.model.backbone.blocks[0].attn.proj
    assert not proj._forward_hooks  # no residual hook: the merged weight is used in one F.linear
    calls = []
    original = torch.nn.functional.linear
    x = torch.randn(2, 3, 32, 32)
    try:
        torch.nn.functional.linear = lambda *a: calls.append(a[1].shape) or original(*a)
        naive.model(x)
    finally:
        torch.nn.functional.linear = original
    assert calls.count(proj.weight.shape) == len(naive.model.target_groups[0])  # the reference makes two per layer
    y = torch.tensor([1, 3])
    exact, baseline = model_exact_and_baseline(ref.model, x, y)
    assert_model_agrees(outputs_and_grads(naive.model, x, y), exact, baseline, naive.model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU peak memory needs CUDA")
def test_cuda_step_peak_excludes_memory_allocated_before_the_step():
    backbone = tiny_timm_vit().cuda()
    floor = build_provider("floor", backbone, rank=8)
    x, y = torch.randn(2, 3, 32, 32, device="cuda"), torch.tensor([0, 1], device="cuda")
    first = cuda_step_peak_bytes(floor, x, y)
    ballast = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # allocated before: not counted
    assert 0 < cuda_step_peak_bytes(floor, x, y) < first + 2**20
    del ballast


# ------------------------------------------------------------------------------------ report


def test_every_name_the_bench_readme_cites_exists():
    import importlib
    import os
    import re

    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "bench", "README.md"), encoding="utf-8").read()
    names = set(re.findall(r"`((?:gift_kernels|gift|bench)(?:\.\w+)+)", text))
    assert "gift.lora.lora_model" in names and len(names) >= 8
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
    assert missing == []


def test_an_accumulated_step_applies_the_gradients_of_one_batch_and_runs_the_generator_once():
    """The gradients an optimizer step of 4 micro-batches applies (recorded as the step begins) are the whole batch's:
    against the float64 model on the whole batch, its fp32 error as slack (gift.testing)."""
    backbone = tiny_timm_vit()
    state = random_gift_state(backbone, rank=8)
    whole, parts = (build_provider("fast_torch", backbone, rank=8, gift_state=state) for _ in range(2))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    exact, baseline = model_exact_and_baseline(whole.model, x, y)
    runs = []
    original = parts.gift_model.generator_tokens
    parts.gift_model.generator_tokens = lambda key: runs.append(key) or original(key)
    trained = {n: p for n, p in parts.model.named_parameters() if p.requires_grad}
    applied = {"output": baseline["output"]}
    parts.optimizer.register_step_pre_hook(lambda *_: applied.update({n: p.grad.clone() for n, p in trained.items()}))
    parts.step(x, y, micro_batches=4)
    assert len(runs) == 1 and len(applied) > 10
    assert_model_agrees(applied, exact, baseline, parts.model)


def test_eval_forward_of_the_unmerged_model_is_the_merged_models():
    """The ``merged`` eval baseline is the plain backbone (``merge_and_unload()``: no GIFT layer left to ask for
    residuals) with the unmerged model's outputs."""
    backbone = tiny_timm_vit().eval()
    state = random_gift_state(backbone, rank=8)
    merged = build_provider("merged", backbone, rank=8, gift_state=state)
    fast = build_provider("fast_torch", backbone, rank=8, gift_state=state)
    assert merged.gift_model is None and not any(getattr(m, "gift_adapted", False) for m in merged.model.modules())
    assert type(merged.model) is type(backbone) and not fast.model.merged
    x = torch.randn(2, 3, 32, 32)
    fast.model.eval()
    merged.model.eval()
    torch.testing.assert_close(fast.eval_forward(x), merged.eval_forward(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (backbone(x) - merged.eval_forward(x)).abs().max() > 1e-3  # the merged weights hold the adapter


def test_generator_runs_tell_cached_eval_forwards_from_fresh_ones():
    """The bench's ``cached`` check: after a first eval forward, the timed ones run no generator; with the residuals
    dropped before every forward (what the check must catch) each runs it once per key, with equal outputs."""
    backbone = tiny_timm_vit().eval()
    fast = build_provider("fast_torch", backbone, rank=8, gift_state=random_gift_state(backbone, rank=8))
    fast.model.eval()
    runs = GeneratorRuns(fast)
    x = torch.randn(2, 3, 32, 32)
    first = fast.eval_forward(x)
    assert runs.take() == len(fast.gift_model.target_groups)
    assert all(torch.equal(fast.eval_forward(x), first) for _ in range(3)) and runs.take() == 0
    for _ in range(3):
        fast.gift_model.residuals.reset()
        assert torch.equal(fast.eval_forward(x), first)
    assert runs.take() == 3 * len(fast.gift_model.target_groups)
    assert GeneratorRuns(build_provider("lora", backbone, rank=8)).take() == 0


def test_a_compiled_provider_compiles_outside_its_steps_and_keeps_the_shared_weights():
    """``fast_torch+compile``: its first step (the compile) is timed apart and undone, so that it agrees with
    the float64 reference on the weights every provider holds; its steps then train."""
    from bench.harness import agreement
    from tests.helpers import ToyViT

    torch.manual_seed(0)
    backbone = ToyViT()
    state = random_gift_state(backbone, rank=8)
    ref = build_provider("reference", backbone, rank=8, gift_state=state)
    compiled = build_provider("fast_torch+compile", backbone, rank=8, gift_state=state)
    x, y = torch.randn(2, 5, 12), torch.tensor([0, 2])
    before = {n: p.detach().clone() for n, p in compiled.gift_model.named_parameters() if p.requires_grad}
    assert compiled.compiled and not ref.compiled
    assert compiled.compile_first_step(x, y) > 0 and compiled.compile_s is not None
    assert all(torch.equal(p, before[n]) for n, p in compiled.gift_model.named_parameters() if p.requires_grad)
    exact, baseline = model_exact_and_baseline(ref.model, x, y)
    result = agreement(compiled, exact, baseline, x, y)
    # inductor's CPU reductions run in another order than eager's: a nearly cancelling gradient (ToyViT's q bias, at
    # 1e-6 of the others' scale) can exceed 5x eager's error at its own scale; a wrong weight or gradient is O(1) there
    assert result["out_rel"] < 1e-5 and result["grad_rel"] < 1e-3, result["why"]
    compiled.step(x, y)
    assert any(not torch.equal(p, before[n]) for n, p in compiled.gift_model.named_parameters() if p.requires_grad)


def test_the_compiled_floor_is_one_graph_and_compiles_nothing_after_its_first_step():
    """``floor+compile``: the floor's gate adds no graph break, and the steps after `compile_first_step` (the timed
    ones) compile no new graph (what a fresh leaf made by ``requires_grad_`` inside the model did)."""
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    floor = build_provider("floor+compile", tiny_timm_vit(), rank=8)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    floor.compile_first_step(x, y)
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(2):
        floor.step(x, y)
    assert graphs == 1 and counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
