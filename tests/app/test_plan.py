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
