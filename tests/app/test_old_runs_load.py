"""Runs written before the layering still load: the adapters and the checkpoint in
tests/app/fixtures/pre_layering were written by main ``fa8690a`` (make_expected_logits.py there says how)."""
import json
import os
import shutil

import torch
from safetensors.torch import load_file

from gift.adapters import load_gift_adapter
from gift.app.cli import main
from gift.app.data import SyntheticShapes
from gift.lora import load_lora_adapter
from gift_kernels.testing import assert_agree

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "pre_layering")
# the flags the fixture's GIFT run was trained with (its checkpoint refuses others)
GIFT_RUN = ["--train-size", "64", "--val-size", "16", "--batch-size", "32", "--quiet", "--rank", "4",
            "--num-clusters", "4"]


def _images() -> torch.Tensor:
    return torch.stack([SyntheticShapes(4, seed=9)[i][0] for i in range(4)]).double()


def _expected(name: str) -> torch.Tensor:
    return torch.load(os.path.join(FIXTURE, "expected_logits.pt"), weights_only=True)[name]


def test_a_gift_adapter_written_before_loads_with_its_weights_and_logits():
    adapter = os.path.join(FIXTURE, "run_gift", "adapter")
    model = load_gift_adapter(adapter).eval()
    saved = load_file(os.path.join(adapter, "gift_adapter.safetensors"))
    state = model.gift_state_dict()
    assert sorted(state) == sorted(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    with torch.no_grad():
        logits = model.double()(_images())
    assert_agree({"logits": logits}, {"logits": _expected("gift_logits")}, torch.float64)


def test_a_lora_adapter_written_before_loads_with_its_logits():
    model, run = load_lora_adapter(os.path.join(FIXTURE, "run_lora", "adapter"))
    assert run["method"] == "lora"
    with torch.no_grad():
        logits = model.eval().double()(_images())
    assert_agree({"logits": logits}, {"logits": _expected("lora_logits")}, torch.float64)


def test_gift_eval_scores_an_adapter_written_before(tmp_path):
    out = str(tmp_path / "eval.json")
    assert main(["eval", "--adapter", os.path.join(FIXTURE, "run_gift", "adapter"), "--output", out]) == 0
    result = json.load(open(out))
    assert result["method"] == "gift" and result["num_images"] == 16


def test_a_checkpoint_written_before_resumes_where_it_stopped(tmp_path, capsys):
    run = str(tmp_path / "run_gift")
    shutil.copytree(os.path.join(FIXTURE, "run_gift"), run)
    before = json.load(open(os.path.join(run, "metrics.json")))
    assert len(before) == 1  # the fixture stopped after epoch 1 of 2
    # it ran without accumulation, the only way then: resuming it with accumulation is another run
    assert main(["finetune", *GIFT_RUN, "--epochs", "2", "--output", run, "--resume", "--grad-accum-steps", "2"]) == 2
    assert "grad_accum_steps: checkpoint None vs now 2" in capsys.readouterr().err
    assert main(["finetune", *GIFT_RUN, "--epochs", "2", "--output", run, "--resume"]) == 0
    said = capsys.readouterr().out  # what the identity of then did not hold is said, not refused
    assert ("did not record train_data, train_content, warmup, amp, backbone_dtype, model_ema_decay; those are not "
            "checked" in said)
    after = json.load(open(os.path.join(run, "metrics.json")))
    assert len(after) == 2 and after[0] == before[0]
