"""`gift plan` predicts what a real training step holds: its numbers come from the model on fake
tensors, counted by the instruments that measure real steps (gift.memory)."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from gift.plan import (
    TrainingSetup,
    compare_with_real_step,
)

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
