"""``gift plan`` and ``gift finetune --memory auto``: the planner from the command line."""
import json

import torch

from gift.plan import TrainingSetup, plan_training
from tests.helpers import budget_for


def test_gift_plan_command_json_and_exit_status(capsys):
    from gift.app.cli import main

    assert main(["plan", "--model", "vit_small_patch16_224", "--batch-size", "2", "--memory", "block",
                 "--device-memory", "4GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["modes"]) == {"block"} and out["recommended"] == "block"
    assert set(out["modes"]["block"]) >= {
        "saved_activation_bytes",
        "parameter_bytes",
        "optimizer_bytes",
        "peak_bytes",
        "fits",
    }
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
        m.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: None if name in ("torchao", "peft") else real_find_spec(name, *a),
        )
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



def test_finetune_memory_auto_refuses_with_the_batch_that_would_fit(tmp_path, capsys):
    """With --grad-accum-steps given, --memory auto picks the mode only; nothing fitting is one line."""
    from gift.app.cli import main

    args = ["finetune", "--memory", "auto", "--epochs", "1", "--train-size", "64", "--val-size", "32",
            "--batch-size", "32", "--output", str(tmp_path / "run"), "--quiet", "--grad-accum-steps", "1"]
    plan = plan_training(TrainingSetup(model="gift_vit_micro_patch4_32", batch_size=32, num_classes=2))
    budget = plan.modes["block"].peak - 1
    assert main(args + ["--max-memory", str(budget)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gift finetune: error: --memory auto: batch size 32 does not fit") and err.count("\n") == 1
    assert "would fit with memory=block" in err


def test_finetune_memory_auto_accumulates_when_the_batch_does_not_fit(tmp_path, capsys):
    """A global batch whose step fits in no mode trains as micro-batches: the fewest that fit, in the fastest mode
    that fits there; the one line says both; the gradients are the whole batch's (test_finetune)."""
    from gift.app.cli import main
    from gift.app.data import TASKS

    setup = TrainingSetup(model="gift_vit_micro_patch4_32", batch_size=32, num_classes=len(TASKS["pattern"]))
    whole = plan_training(setup).modes["block"].peak
    two = plan_training(TrainingSetup(**{**setup.__dict__, "grad_accum_steps": 2}))
    assert two.modes["block"].peak < whole  # halving the micro-batch saves memory in this model
    budget = budget_for(two.modes["block"].peak)
    assert budget_for(whole) > budget
    args = ["finetune", "--memory", "auto", "--epochs", "1", "--train-size", "64", "--val-size", "32",
            "--batch-size", "32", "--output", str(tmp_path / "run"), "--max-memory", str(budget)]
    assert main(args) == 0
    out = capsys.readouterr().out
    fastest = next(m for m in ("none", "mlp", "block") if budget_for(two.modes[m].peak) <= budget)
    assert (f"--memory auto: memory={fastest} with 2 micro-batches of 16 (--grad-accum-steps 2): predicted peak"
            in out), out
    assert "1 micro-batch per step needs" in out


def test_gift_plan_with_grad_accum_steps_and_memory_auto(capsys):
    from gift.app.cli import main

    base = ["plan", "--model", "gift_vit_micro_patch4_32", "--num-classes", "2", "--batch-size", "32"]
    assert main(base + ["--grad-accum-steps", "4", "--json"]) == 0
    four = json.loads(capsys.readouterr().out)
    assert (four["grad_accum_steps"], four["micro_batch_size"]) == (4, 8)
    assert all(m["generator_kept_bytes"] > 0 for m in four["modes"].values())
    assert main(base + ["--grad-accum-steps", "4"]) == 0
    text = capsys.readouterr().out
    assert "batch 32 as 4 micro-batches of 8" in text and "generator kept meanwhile" in text
    budget = budget_for(four["modes"]["block"]["peak_bytes"])
    assert main(base + ["--memory", "auto", "--device-memory", str(budget), "--json"]) == 0
    auto = json.loads(capsys.readouterr().out)
    assert 1 < auto["grad_accum_steps"] <= 4 and auto["recommended"] is not None
    assert auto["auto"].startswith(f"--memory auto: memory={auto['recommended']} with {auto['grad_accum_steps']} "
                                   f"micro-batches of {32 // auto['grad_accum_steps']}")
    assert main(base + ["--grad-accum-steps", "5"]) == 2
    assert "does not split into --grad-accum-steps 5" in capsys.readouterr().err
    assert main(base + ["--memory", "auto"]) == 2  # no budget on a CPU machine
    assert "--memory auto needs a budget" in capsys.readouterr().err



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


def test_model_ema_copy_of_the_whole_model_is_in_the_peak_and_in_memory_auto():
    from gift.app.run_config import FinetuneConfig, choose_finetune_memory

    setup = TrainingSetup(model="gift_vit_micro_patch4_32", batch_size=4, num_classes=2)
    plain, ema = plan_training(setup), plan_training(TrainingSetup(**{**setup.__dict__, "model_ema": True}))
    for mode, step in plain.modes.items():
        assert step.ema == 0 and ema.modes[mode].ema == step.parameter == step.frozen + step.trainable > 0
        assert ema.modes[mode].peak == step.peak + step.parameter
    budget = str(budget_for(ema.modes["none"].peak) - 2)
    chosen = {flag: choose_finetune_memory(FinetuneConfig(memory="auto", model_ema=flag, max_memory=budget,
                                                          batch_size=4), 2, 4, "cpu")[0] for flag in (False, True)}
    assert chosen == {False: "none", True: "mlp"}
