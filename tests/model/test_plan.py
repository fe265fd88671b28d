"""`gift plan` predicts what a real training step holds: its numbers come from the model on fake
tensors, counted by the instruments that measure real steps (gift.memory)."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from gift import FastGIFT, GIFTConfig
from gift.plan import (
    DoesNotFit,
    TrainingSetup,
    choose_memory_mode,
    compare_with_real_step,
)
from tests.helpers import budget_for

SAVED_TOLERANCE = 0.03


def _check_rows(rows):
    assert rows
    for mode, predicted, measured in rows:
        assert measured.saved_activation > 0
        assert (
            abs(predicted.saved_activation - measured.saved_activation) <= SAVED_TOLERANCE * measured.saved_activation
        ), mode
        assert abs(predicted.peak - measured.peak) <= SAVED_TOLERANCE * measured.peak, mode
        for side in ("frozen", "trainable", "gradient", "optimizer"):  # parameter side: exact
            assert getattr(predicted, side) == getattr(measured, side), (mode, side)


@pytest.mark.parametrize("batch_size", [2, 8])
@pytest.mark.parametrize("model", ["vit_small_patch16_224", "vit_base_patch16_224"])
@pytest.mark.parametrize("method", ["gift", "lora", "linear", "full"])
def test_predicted_bytes_match_a_real_cpu_step(model, batch_size, method):
    torch.set_num_threads(1)
    rows = compare_with_real_step(TrainingSetup(model=model, batch_size=batch_size, method=method, num_classes=10))
    assert [r[0] for r in rows] == (["none", "mlp", "block"] if method == "gift" else ["none"])
    _check_rows(rows)
    if method == "gift":  # each memory mode keeps less than the one before
        saved = [r[2].saved_activation for r in rows]
        assert saved[0] > saved[1] > saved[2]


def test_predicted_bytes_match_with_bf16_backbone_and_autocast():
    setup = TrainingSetup(model="vit_small_patch16_224", batch_size=2, backbone_dtype="bfloat16", amp="bf16")
    _check_rows(compare_with_real_step(setup))


def test_huge_and_giant_vits_plan_without_their_weights():
    """ViT-H/14 and ViT-g/14 at batch 32 (2.5 and 4 GB of fp32 weights): the planning process stays under 2 GB.
    (Seconds per model are in the output; there is no wall-clock assertion.)"""
    code = textwrap.dedent("""
        import json, resource, time
        from gift.plan import TrainingSetup, plan_training
        out = {}
        for name in ("vit_huge_patch14_224", "vit_giant_patch14_224"):
            start = time.perf_counter()
            plan = plan_training(TrainingSetup(model=name, batch_size=32), "80GiB")
            out[name] = {"seconds": time.perf_counter() - start, "plan": plan.to_json()}
        # VmHWM: the peak RSS of this process's own memory (ru_maxrss would include the forking parent's)
        with open("/proc/self/status") as f:
            out["max_rss_bytes"] = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
        print(json.dumps(out))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["max_rss_bytes"] < 2 * 2**30
    for name, weights in (("vit_huge_patch14_224", 632e6 * 4), ("vit_giant_patch14_224", 1.0e9 * 4)):
        modes = out[name]["plan"]["modes"]
        assert set(modes) == {"none", "mlp", "block"}
        assert 0.95 * weights < modes["none"]["parameter_bytes"] < 1.2 * weights
        assert modes["none"]["peak_bytes"] > modes["mlp"]["peak_bytes"] > modes["block"]["peak_bytes"]


# ---------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("method", ["gift", "lora"])
@pytest.mark.parametrize("accumulation", [2, 4])
def test_predicted_accumulated_steps_match_a_real_cpu_step(method, accumulation):
    torch.set_num_threads(1)
    setup = TrainingSetup(model="vit_small_patch16_224", batch_size=4, method=method, num_classes=10,
                          grad_accum_steps=accumulation)
    rows = compare_with_real_step(setup)
    _check_rows(rows)
    for mode, predicted, measured in rows:
        if method == "gift":  # the generator's output (and its graph but with memory=block) stays between micro-batches
            assert measured.generator_kept > 0 and predicted.generator_kept == measured.generator_kept, mode
        else:
            assert measured.generator_kept == 0


def test_two_simulated_micro_batches_have_the_peak_of_all():
    """A prediction runs the first and the last micro-batch of a step (gift.predict.SIMULATED_MICRO_BATCHES); those in
    between hold no more: a real step of 2 micro-batches and one of 5 have the same bytes."""
    from gift.memory import measure_training_step
    from gift.predict import SIMULATED_MICRO_BATCHES
    from gift.testing import randomize_gift_
    from tests.helpers import tiny_timm_vit

    assert SIMULATED_MICRO_BATCHES == 2
    x, y = torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    for memory in ("none", "block"):
        steps = []
        for micro_batches in (2, 5):
            model = randomize_gift_(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3), memory=memory))
            steps.append(measure_training_step(model, x, y, micro_batches=micro_batches))
        assert steps[0] == steps[1], memory
        one = measure_training_step(randomize_gift_(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3),
                                                             memory=memory)), x, y)
        assert steps[0].peak > one.peak  # the gradients and the generator's output kept between micro-batches show


def test_fit_accumulation_takes_the_fewest_micro_batches_that_fit(small_plan):
    from gift.plan import plan_fitting

    setup = small_plan.setup
    peaks = {k: small_plan.fake.predict(8, "block", k).peak for k in (1, 2, 4, 8)}
    assert peaks[1] > peaks[2] > peaks[4] > peaks[8]
    plan = plan_fitting(setup, budget_for(peaks[4]))
    assert plan.accumulation == 4 and plan.recommended is not None and plan.fewer[:1] == (2,)
    mode, why = choose_memory_mode(plan)
    assert why.startswith(f"memory={mode} with 4 micro-batches of 2 (--grad-accum-steps 4): predicted peak")
    assert "2 micro-batches per step need" in why
    assert plan_fitting(setup, budget_for(small_plan.modes["none"].peak)).accumulation == 1
    assert plan_fitting(setup, budget_for(peaks[4]), accumulations=(8, 3)).accumulation == 8  # 3 does not divide
    with pytest.raises(DoesNotFit, match=r"batch size 8 as 8 micro-batches of 1 does not fit .* in any memory mode"):
        plan_fitting(setup, peaks[8] - 1)



def test_memory_auto_says_when_the_fastest_mode_fits_at_more_micro_batches(small_plan):
    """The rule is the fewest micro-batches first, then the fastest mode there; it predicts no time. When its mode
    recomputes and memory=none fits at more micro-batches, the one line says so (and that it may be faster)."""
    from gift.plan import plan_fitting

    fake, setup = small_plan.fake, small_plan.setup
    block_at_1 = fake.predict(8, "block", 1).peak
    assert fake.predict(8, "none", 1).peak > block_at_1 > fake.predict(8, "none", 8).peak  # the premise
    plan = plan_fitting(setup, budget_for(block_at_1))
    assert (plan.accumulation, plan.recommended) == (1, "block")
    k, peak, mode = plan.faster_mode_later
    assert mode == "none" and peak == fake.predict(8, "none", k).peak and peak <= plan.usable_memory
    assert all(fake.predict(8, "none", fewer).peak > plan.usable_memory for fewer in (1, 2, 4, 8) if fewer < k)
    why = choose_memory_mode(plan)[1]
    assert why.startswith("memory=block: predicted peak")
    assert f"memory=none fits with {k} micro-batches" in why and "it predicts no time" in why
    relaxed = plan_fitting(setup, budget_for(fake.predict(8, "none", 1).peak))  # memory=none fits at once: no note
    assert relaxed.recommended == "none" and relaxed.faster_mode_later is None
    assert "predicts no time" not in choose_memory_mode(relaxed)[1]

def test_dinov3_7b_fits_an_8gib_gpu_at_batch_64_with_nf4():
    """The issue's target: ``gift plan --model vit_7b_patch16_dinov3 --batch-size 64 --device-memory 8GiB --amp bf16
    --backbone-dtype nf4 --memory auto`` finds a fitting (memory mode, accumulation) plan, on fake tensors (the 7B
    model's weights are never allocated)."""
    pytest.importorskip("torchao")
    code = textwrap.dedent("""
        import json
        from gift.plan import TrainingSetup, choose_memory_mode, plan_fitting
        setup = TrainingSetup(model="vit_7b_patch16_dinov3", batch_size=64, amp="bf16", backbone_dtype="nf4")
        plan = plan_fitting(setup, "8GiB")
        with open("/proc/self/status") as f:
            rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
        print(json.dumps({"plan": plan.to_json(), "why": choose_memory_mode(plan)[1], "max_rss_bytes": rss}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    out = json.loads(result.stdout.strip().splitlines()[-1])
    plan = out["plan"]
    k, mode = plan["grad_accum_steps"], plan["recommended"]
    assert mode is not None and plan["modes"][mode]["fits"] and 64 % k == 0 and k > 1
    assert plan["modes"][mode]["peak_bytes"] <= 0.9 * 8 * 2**30
    assert plan["modes"]["block"]["generator_saved_bytes"] == 0  # memory=block recomputes the generator
    assert out["why"].startswith(f"memory={mode} with {k} micro-batches of {64 // k}")
    assert out["max_rss_bytes"] < 2 * 2**30
