"""gift.app.train, the training loop: exact resume after a Ctrl-C inside the forward or backward pass, and
runs kept unless asked."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from gift.app.cli import main
from tests.helpers import TINY, finetune_run


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_resume_after_ctrl_c_inside_forward_or_backward_with_drop_path_is_bitwise_exact(tmp_path, monkeypatch, where):
    from timm.models.vision_transformer import Block

    args = ["--epochs", "2", "--drop-path", "0.1"]
    whole = finetune_run(tmp_path, "whole", *args)
    calls = {"n": 0}
    real = Block.forward

    def ctrl_c(*_):
        raise KeyboardInterrupt

    def interrupt(self, x, *a, **kw):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 4 * 4 + 3:  # 4 blocks per forward: epoch 2 (3 steps each), its 2nd step, the 3rd block
                if where == "forward":
                    ctrl_c()  # after the first two blocks drew their drop-path masks
                out = real(self, x, *a, **kw)
                out.register_hook(ctrl_c)  # inside autograd's backward pass, half-way through
                return out
        return real(self, x, *a, **kw)

    monkeypatch.setattr(Block, "forward", interrupt)
    cut = str(tmp_path / "cut")
    assert main(["finetune", *TINY, *args, "--output", cut]) == 130
    state = torch.load(os.path.join(cut, "checkpoint.pt"), weights_only=False)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)
    monkeypatch.setattr(Block, "forward", real)
    assert main(["finetune", *TINY, *args, "--output", cut, "--resume"]) == 0
    a, b = (load_file(os.path.join(o, "adapter", "gift_adapter.safetensors")) for o in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[h["train_loss"] for h in json.load(open(os.path.join(o, "metrics.json")))] for o in (whole, cut)]
    assert losses[0] == losses[1]


def test_existing_runs_are_kept_unless_asked_and_resume_extends_a_finished_run(tmp_path, capsys):
    out = finetune_run(tmp_path, "r", "--epochs", "1")
    capsys.readouterr()
    assert main(["finetune", *TINY, "--epochs", "1", "--output", out]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["finetune", *TINY, "--epochs", "1", "--output", out, "--resume"]) == 0
    assert "already finished (1 epochs)" in capsys.readouterr().out
    assert main(["finetune", *TINY, "--epochs", "2", "--output", out, "--resume"]) == 0
    said = capsys.readouterr().out
    assert "extending the run from 1 to 2 epochs" in said and "schedule now spans 2 epochs" in said
    history = json.load(open(os.path.join(out, "metrics.json")))
    assert [h["epoch"] for h in history] == [1, 2]
    assert main(["finetune", *TINY, "--epochs", "1", "--output", out, "--resume"]) == 2
    assert "--epochs 1 is fewer than the 2 epoch(s)" in capsys.readouterr().err
    assert main(["finetune", *TINY, "--epochs", "1", "--output", out, "--overwrite"]) == 0
    assert len(json.load(open(os.path.join(out, "metrics.json")))) == 1
    assert main(["finetune", *TINY, "--epochs", "3", "--output", out, "--overwrite", "--stop-after", "1"]) == 0
    capsys.readouterr()
    assert main(["finetune", *TINY, "--epochs", "2", "--output", out, "--resume"]) == 0  # fewer, not done yet
    assert "shortening the run from 3 to 2 epochs" in capsys.readouterr().out


def test_accumulation_skips_the_all_reduce_of_a_compiled_data_parallel_module(tmp_path):
    """``--compile`` wraps the DDP module: its micro-batches but the last still run under DDP's ``no_sync()``."""
    import torch.distributed as dist
    import torch.nn as nn

    from gift.app.train import data_parallel_of

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
        assert data_parallel_of(ddp) is ddp and data_parallel_of(torch.compile(ddp)) is ddp  # compiles lazily
        assert data_parallel_of(torch.compile(nn.Linear(3, 2))) is None and data_parallel_of(nn.Linear(3, 2)) is None
    finally:
        dist.destroy_process_group()
