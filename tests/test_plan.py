"""`gift plan` predicts what a real training step holds: its numbers come from the model on fake
tensors, counted by the instruments that measure real steps (gift.memory)."""
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from gift.plan import (FIT_FRACTION, DoesNotFit, PlanError, TrainingSetup, choose_memory_mode, compare_with_real_step, parse_bytes,
                       plan_training)

SAVED_TOLERANCE = 0.03


def _check_rows(rows):
    assert rows
    for mode, predicted, measured in rows:
        assert measured.saved_activation > 0
        assert abs(predicted.saved_activation - measured.saved_activation) <= SAVED_TOLERANCE * measured.saved_activation, mode
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


def test_step_peak_keeps_the_forwards_own_transients_and_the_batch():
    """A frozen wide layer before a small trainable head: the forward's 4096-wide temporary is the step's peak
    (nothing of it is saved for backward), so the peak must hold it, beyond parameters, AdamW state and batch."""
    from gift.memory import measure_training_step, storage_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 16), torch.nn.Linear(16, 2))
    model[:3].requires_grad_(False)
    x, y = torch.randn(8, 16), torch.zeros(8, dtype=torch.long)
    step = measure_training_step(model, x, y)
    wide = 8 * 4096 * 4
    assert step.saved_activation < wide and step.backward_transient < wide
    assert step.peak >= step.parameter + step.optimizer + storage_bytes([x, y]) + wide


# ---------------------------------------------------------------- choosing a memory mode
@pytest.fixture(scope="module")
def small_plan():
    return plan_training(TrainingSetup(model="vit_small_patch16_224", batch_size=8))


def budget_for(peak: int) -> int:
    """The smallest budget a predicted ``peak`` fits, with the margin kept for the CUDA allocator."""
    return math.ceil(peak / FIT_FRACTION) + 1


def test_a_budget_between_two_modes_picks_the_faster_that_fits(small_plan):
    peaks = {m: b.peak for m, b in small_plan.modes.items()}
    assert peaks["none"] > peaks["mlp"] > peaks["block"]
    for budget, want in ((budget_for((peaks["none"] + peaks["mlp"]) // 2), "mlp"),
                         (budget_for((peaks["mlp"] + peaks["block"]) // 2), "block"), (budget_for(peaks["none"]), "none")):
        plan = small_plan.with_device_memory(budget)
        assert plan.recommended == want and plan.fits(want)
        mode, why = choose_memory_mode(plan)
        assert mode == want and f"memory={want}" in why and "\n" not in why
        assert f"within {FIT_FRACTION:.0%} of" in why and "kept for the CUDA allocator" in why
        assert plan.largest_batch_size >= 8


def test_a_budget_keeps_a_margin_for_the_cuda_allocator(small_plan):
    """A peak that fills the whole budget does not fit: FIT_FRACTION of it is what a step may use."""
    assert FIT_FRACTION == 0.9
    peak = small_plan.modes["none"].peak
    assert not small_plan.with_device_memory(peak + 1).fits("none")
    assert small_plan.with_device_memory(budget_for(peak)).fits("none")


def test_a_budget_below_every_mode_names_the_batch_that_fits(small_plan):
    budget = small_plan.modes["block"].peak - 1
    plan = small_plan.with_device_memory(budget)
    assert plan.recommended is None
    with pytest.raises(DoesNotFit, match=r"batch size 8 does not fit .* batch size \d+ would fit with memory=block") as e:
        choose_memory_mode(plan)
    fitting = e.value.largest_batch_size
    assert 1 <= fitting < 8
    usable = plan.usable_memory
    assert usable == int(budget * FIT_FRACTION)
    assert plan.fake.predict(fitting, "block").peak <= usable < plan.fake.predict(fitting + 1, "block").peak


def test_bad_input_is_one_clear_line():
    with pytest.raises(PlanError, match="unknown model 'vit_smal'"):
        plan_training(TrainingSetup(model="vit_smal", batch_size=2))
    with pytest.raises(PlanError, match="method 'qlora' is unknown"):
        TrainingSetup(model="vit_small_patch16_224", batch_size=2, method="qlora")
    with pytest.raises(PlanError, match="cannot read the memory size '24 gigs'"):
        parse_bytes("24 gigs")
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512") == 512


def test_gift_plan_command_json_and_exit_status(capsys):
    from gift.app.cli import main

    assert main(["plan", "--model", "vit_small_patch16_224", "--batch-size", "2", "--memory", "block",
                 "--device-memory", "4GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["modes"]) == {"block"} and out["recommended"] == "block"
    assert set(out["modes"]["block"]) >= {"saved_activation_bytes", "parameter_bytes", "optimizer_bytes", "peak_bytes", "fits"}
    assert all(isinstance(v, int) for k, v in out["modes"]["block"].items() if k.endswith("_bytes"))
    assert main(["plan", "--model", "vit_small_patch16_224", "--rank", "0"]) == 2
    assert "--rank" in capsys.readouterr().err


def test_gift_plan_without_an_extra_is_one_line_and_status_2(capsys, monkeypatch):
    import builtins
    import importlib.util

    from gift.app.cli import main

    args = ["plan", "--model", "vit_small_patch16_224", "--batch-size", "2", "--device-memory", "4GiB"]
    real_find_spec, real_import = importlib.util.find_spec, builtins.__import__
    with monkeypatch.context() as m:  # not installed
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torchao", "peft") else real_find_spec(name, *a))
        for extra, flags in (("nf4", ["--backbone-dtype", "nf4"]), ("lora", ["--method", "lora"])):
            assert main(args + flags) == 2
            err = capsys.readouterr().err
            assert f"pip install 'gift[{extra}]'" in err and err.count("\n") == 1
    with monkeypatch.context() as m:  # installed but broken: it does not import
        m.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                  if name.startswith("torchao") else real_import(name, *a, **k))
        assert main(args + ["--backbone-dtype", "nf4"]) == 2
        err = capsys.readouterr().err
        assert "pip install 'gift[nf4]'" in err and err.count("\n") == 1


def test_model_ema_copy_of_the_whole_model_is_in_the_peak_and_in_memory_auto():
    from gift.app.finetune import FinetuneConfig
    from gift.app.plan import choose_finetune_memory

    setup = TrainingSetup(model="gift_vit_micro_patch4_32", batch_size=4, num_classes=2)
    plain, ema = plan_training(setup), plan_training(TrainingSetup(**{**setup.__dict__, "model_ema": True}))
    for mode, step in plain.modes.items():
        assert step.ema == 0 and ema.modes[mode].ema == step.parameter == step.frozen + step.trainable > 0
        assert ema.modes[mode].peak == step.peak + step.parameter
    budget = str(budget_for(ema.modes["none"].peak) - 2)
    chosen = {flag: choose_finetune_memory(FinetuneConfig(memory="auto", model_ema=flag, max_memory=budget,
                                                          batch_size=4), 2, 4, "cpu")[0] for flag in (False, True)}
    assert chosen == {False: "none", True: "mlp"}


def test_finetune_memory_auto_refuses_with_the_batch_that_would_fit(tmp_path, capsys):
    from gift.app.cli import main

    args = ["finetune", "--memory", "auto", "--epochs", "1", "--train-size", "64", "--val-size", "32",
            "--batch-size", "32", "--output", str(tmp_path / "run"), "--quiet"]
    plan = plan_training(TrainingSetup(model="gift_vit_micro_patch4_32", batch_size=32, num_classes=2))
    budget = plan.modes["block"].peak - 1
    assert main(args + ["--max-memory", str(budget)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gift finetune: error: --memory auto: batch size 32 does not fit") and err.count("\n") == 1
    assert "would fit with memory=block" in err


def test_finetune_model_ema_is_evaluated_alongside_and_resumes_exactly(tmp_path):
    import os

    from safetensors.torch import load_file

    from gift.app.cli import main

    tiny = ["finetune", "--train-size", "64", "--val-size", "32", "--batch-size", "32", "--quiet", "--model-ema",
            "--model-ema-decay", "0.5", "--epochs", "2"]
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    assert main(tiny + ["--output", whole]) == 0
    assert main(tiny + ["--output", part, "--stop-after", "1"]) == 0
    assert main(tiny + ["--output", part, "--resume"]) == 0
    history = json.load(open(os.path.join(whole, "metrics.json")))
    assert len(history) == 2 and all(0 <= h["val_top1_ema"] <= 1 for h in history)
    a, b = (load_file(os.path.join(out, "adapter_ema", "gift_adapter.safetensors")) for out in (whole, part))
    trained = load_file(os.path.join(whole, "adapter", "gift_adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], trained[k]) for k in a)  # the average is not the last step's weights
