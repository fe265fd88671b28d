"""gift.app.sweep: the grid search, resume after an interruption, the final run on train+val, test evaluation."""
import csv
import json
import os

import pytest

from gift.app.sweep import SweepError, SweepPlan, parse_grid, run_grid_search

PLAN = SweepPlan(lrs=(1e-3, 1e-4), weight_decays=(0.0, 0.01), search_epochs=1, epochs=2)


class FakeTrainer:
    """Records the settings of every call; the score depends on (lr, weight decay), best at lr 1e-4, wd 0.01."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls, self.interrupt_at = [], interrupt_at

    def __call__(self, settings):
        self.calls.append(dict(settings))
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        os.makedirs(settings["output"], exist_ok=True)
        score = 0.5 + (0.2 if settings["lr"] == 1e-4 else 0.0) + settings["weight_decay"]
        return {"top1": score + (0.1 if settings["eval_split"] == "test" else 0.0), "trainable_parameters": 1234}


def test_parse_grid():
    assert parse_grid("1e-4,2.5e-4, 5e-4", "--lr") == (1e-4, 2.5e-4, 5e-4)
    assert parse_grid([0.01, 0], "--weight-decay") == (0.01, 0.0)
    with pytest.raises(SweepError, match="--lr 'x,1': expected numbers"):
        parse_grid("x,1", "--lr")
    with pytest.raises(SweepError, match="non-negative"):
        parse_grid("-1", "--lr")


def test_interrupted_sweep_resumes_without_retraining_then_runs_final_on_trainval_and_test(tmp_path):
    out = str(tmp_path / "sweep")
    first = FakeTrainer(interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_grid_search(PLAN, out, first, identity={"model": "m"}, quiet=True)
    rows = list(csv.DictReader(open(os.path.join(out, "sweep.csv"))))
    assert [(float(r["lr"]), float(r["weight_decay"])) for r in rows] == [(1e-3, 0.0)]
    second = FakeTrainer()
    result = run_grid_search(PLAN, out, second, identity={"model": "m"}, record={"method": "gift"}, quiet=True)
    trained = [(c["lr"], c["weight_decay"], c["train_split"], c["eval_split"], c["epochs"]) for c in second.calls]
    assert trained == [(1e-3, 0.01, "train", "val", 1), (1e-4, 0.0, "train", "val", 1),
                       (1e-4, 0.01, "train", "val", 1), (1e-4, 0.01, "trainval", "test", 2)]
    rows = list(csv.DictReader(open(os.path.join(out, "sweep.csv"))))
    assert len(rows) == 4 and float(rows[3]["top1"]) == pytest.approx(0.71)
    saved = json.load(open(os.path.join(out, "final", "eval.json")))
    assert saved == result and result["split"] == "test" and result["method"] == "gift"
    assert result["top1"] == pytest.approx(0.81) and (result["lr"], result["weight_decay"]) == (1e-4, 0.01)
    third = FakeTrainer()
    assert run_grid_search(PLAN, out, third, identity={"model": "m"}, quiet=True) == result and third.calls == []


def test_point_cut_off_mid_training_resumes_from_its_checkpoint(tmp_path):
    out = str(tmp_path / "sweep")
    os.makedirs(os.path.join(out, "points", "lr0.001_wd0"))
    open(os.path.join(out, "points", "lr0.001_wd0", "checkpoint.pt"), "w").close()
    trainer = FakeTrainer()
    run_grid_search(PLAN, out, trainer, quiet=True)
    assert [c["resume"] for c in trainer.calls] == [True, False, False, False, False]


def test_resume_refuses_a_folder_of_another_sweep(tmp_path):
    out = str(tmp_path / "sweep")
    run_grid_search(PLAN, out, FakeTrainer(), identity={"model": "a"}, quiet=True)
    with pytest.raises(SweepError, match="holds another sweep \\(model: 'a' there vs 'b' now\\)"):
        run_grid_search(PLAN, out, FakeTrainer(), identity={"model": "b"}, quiet=True)
    with pytest.raises(SweepError, match="must be positive"):
        SweepPlan(lrs=(1e-3,), weight_decays=(0.0,), search_epochs=0, epochs=2)
