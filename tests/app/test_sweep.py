"""gift.app.sweep: the grid search, resume after an interruption, the final run on train+val, test evaluation;
and `gift sweep` / `gift report` / `gift finetune --data vtab1k:...` for real on a micro ViT."""
import csv
import json
import math
import os
import shutil

import pytest

import gift.app.commands.sweep as sweep_module
from gift.app.cli import main
from gift.app.commands.sweep import SweepError, SweepGrid, parse_grid, run_grid_search
from gift.app.divergence import Diverged
from gift.app.run_folder import FolderInUse, FolderLock
from tests.helpers import fgvc_tree, vtab_tree

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "pre_layering")

PLAN = SweepGrid(lrs=(1e-3, 1e-4), weight_decays=(0.0, 0.01), search_epochs=1, epochs=2)


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
    assert second.calls[-1]["eval_every"] == 2 and "eval_every" not in second.calls[0]
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
        SweepGrid(lrs=(1e-3,), weight_decays=(0.0,), search_epochs=0, epochs=2)


def test_grown_grid_with_a_new_best_point_moves_the_old_final_run_aside(tmp_path, capsys):
    out = str(tmp_path / "sweep")
    small = SweepGrid(lrs=(1e-3,), weight_decays=(0.0,), search_epochs=1, epochs=2)
    old = run_grid_search(small, out, FakeTrainer(), quiet=True)
    assert (old["lr"], old["weight_decay"]) == (1e-3, 0.0)
    trainer = FakeTrainer()
    grown = run_grid_search(PLAN, out, trainer, quiet=False)
    assert (grown["lr"], grown["weight_decay"]) == (1e-4, 0.01) and trainer.calls[-1]["lr"] == 1e-4
    assert (
        trainer.calls[-1]["resume"] is False and "moved the final run of lr0.001_wd0 aside" in capsys.readouterr().out
    )
    assert json.load(open(os.path.join(out, "final_lr0.001_wd0", "eval.json"))) == old
    # a final run of the old best point cut off mid-way is not resumed at the new point either
    os.remove(os.path.join(out, "final", "eval.json"))
    open(os.path.join(out, "final", "checkpoint.pt"), "w").close()
    json.dump({"lr": 1e-3, "weight_decay": 0.0}, open(os.path.join(out, "final", "point.json"), "w"))
    trainer = FakeTrainer()
    run_grid_search(PLAN, out, trainer, quiet=True)
    assert trainer.calls[-1]["resume"] is False and os.path.isfile(
        os.path.join(out, "final_lr0.001_wd0_2", "checkpoint.pt")
    )


# ---------------------------------------------------------------------------- the real thing, on a micro ViT
MICRO = ["--model", "gift_vit_micro_patch4_32", "--batch-size", "4", "--quiet", "--device", "cpu"]


def test_a_missing_final_split_is_refused_before_the_first_point_trains(tmp_path, monkeypatch, capsys):
    fgvc_tree(str(tmp_path / "cub"))
    os.remove(tmp_path / "cub" / "test.json")
    calls = []
    monkeypatch.setattr(sweep_module, "finetune", lambda cfg, **kw: calls.append(cfg))
    assert main(["sweep", "--recipe", "fgvc", *MICRO, "--data", f"fgvc-json:{tmp_path / 'cub'}", "--lr", "1e-3",
                 "--weight-decay", "0", "--search-epochs", "1", "--epochs", "1", "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert calls == [] and "test.json: no such file" in err and len(err.splitlines()) == 1
    assert main(["sweep", *MICRO, "--data", "default", "--lr", "1e-3", "--weight-decay", "0", "--epochs", "1",
                 "--output", str(tmp_path / "e")]) == 2
    assert calls == [] and "embedded dataset has no split 'trainval'" in capsys.readouterr().err


def test_sweep_interrupted_then_resumed_then_report_with_lora(tmp_path, monkeypatch, capsys):
    fgvc_tree(str(tmp_path / "cub"))  # 3 classes with ids "007", "12", 3; images under images/<class>/
    data = f"fgvc-json:{tmp_path / 'cub'}"
    out, lora_out = str(tmp_path / "sweep"), str(tmp_path / "lora")
    sweep = ["sweep", "--recipe", "fgvc", *MICRO, "--data", data, "--lr", "1e-3,1e-2", "--weight-decay", "0,0.01",
             "--search-epochs", "1", "--epochs", "2", "--output", out]
    real, calls = sweep_module.finetune, []

    def interrupted_after_one(cfg, **kw):
        calls.append(cfg)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, **kw)

    monkeypatch.setattr(sweep_module, "finetune", interrupted_after_one)
    assert main(sweep) == 130
    assert calls[0].block == "identity" and calls[0].method_rank == 16  # the recipe,
    assert calls[0].epochs == 1  # then flags
    first_adapter = os.path.getmtime(os.path.join(out, "points", "lr0.001_wd0", "adapter", "gift_config.json"))
    calls.clear()

    def counted(cfg, **kw):
        calls.append(cfg)
        return real(cfg, **kw)

    monkeypatch.setattr(sweep_module, "finetune", counted)
    assert main(sweep) == 0
    assert [(c.lr, c.weight_decay, c.train_split, c.eval_split, c.epochs) for c in calls[:3]] == [
        (1e-3, 0.01, "train", "val", 1), (1e-2, 0.0, "train", "val", 1), (1e-2, 0.01, "train", "val", 1)]
    assert os.path.getmtime(os.path.join(out, "points", "lr0.001_wd0", "adapter", "gift_config.json")) == first_adapter
    rows = list(csv.DictReader(open(os.path.join(out, "sweep.csv"))))
    best = max(rows, key=lambda r: float(r["top1"]))
    final = calls[3]
    assert (final.train_split, final.eval_split, final.epochs, final.eval_every) == ("trainval", "test", 2, 2)
    assert len(rows) == 4
    assert (final.lr, final.weight_decay) == (float(best["lr"]), float(best["weight_decay"]))
    result = json.load(open(os.path.join(out, "final", "eval.json")))
    history = json.load(open(os.path.join(out, "final", "metrics.json")))
    assert result["split"] == "test" and result["top1"] == history[-1]["val_top1"] and len(history) == 2
    assert math.isnan(history[0]["val_top1"])  # test is scored once, after the last epoch
    assert result["dataset"] == "cub" and result["method"] == "gift"

    assert main(["sweep", "--recipe", "fgvc-lora", *MICRO, "--data", data, "--lr", "1e-3", "--weight-decay", "0",
                 "--search-epochs", "1", "--epochs", "1", "--output", lora_out]) == 0
    report = str(tmp_path / "report")
    capsys.readouterr()
    assert main(["report", out, lora_out, "--output", report]) == 0
    md = open(os.path.join(report, "results.md")).read()
    assert "| Method | Params (M) | cub | Mean |" in md and "| GIFT |" in md and "| LoRA |" in md
    assert f"{100 * result['top1']:.2f}" in md.split("| GIFT |")[1].splitlines()[0]
    assert os.path.isfile(os.path.join(report, "results.csv")) and os.path.isfile(os.path.join(report, "results.png"))


def test_finetune_and_eval_on_vtab1k_splits_and_bad_data_is_one_line(tmp_path, capsys):
    folder = vtab_tree(str(tmp_path), "dtd")
    out = str(tmp_path / "run")
    assert main(["finetune", *MICRO, "--data", f"vtab1k:{folder}", "--train-split", "train800val200",
                 "--eval-split", "test", "--epochs", "1", "--output", out]) == 0
    history = json.load(open(os.path.join(out, "metrics.json")))
    assert main(["eval", "--adapter", os.path.join(out, "adapter"), "--eval-split", "test"]) == 0
    scored = json.load(open(os.path.join(out, "eval.json")))
    assert scored["num_images"] == 6 and scored["top1"] == history[-1]["val_top1"]  # the recorded data and split
    capsys.readouterr()
    os.remove(os.path.join(folder, "test.txt"))
    assert main(["finetune", *MICRO, "--data", f"vtab1k:{folder}", "--eval-split", "test", "--epochs", "1",
                 "--output", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gift finetune: error: ") and "test.txt: no such file" in err[0]


# ---------------------------------------------------------------------------- divergence and damaged files
class DivergingTrainer(FakeTrainer):
    """FakeTrainer, but the points with an lr in ``diverging`` diverge (as finetune does: it raises)."""

    def __init__(self, diverging=(1e30,), **kw):
        super().__init__(**kw)
        self.diverging = diverging

    def __call__(self, settings):
        if settings["lr"] in self.diverging:
            self.calls.append(dict(settings))
            raise Diverged("training diverged at epoch 1, step 2 (loss nan): ...", short="epoch 1, step 2 (loss nan)")
        return super().__call__(settings)


def test_a_diverged_point_is_recorded_as_such_and_never_chosen(tmp_path, capsys):
    plan = SweepGrid(lrs=(1e30, 1e-3), weight_decays=(0.0,), search_epochs=1, epochs=2)
    out = str(tmp_path / "sweep")
    result = run_grid_search(plan, out, DivergingTrainer(), quiet=False)
    said = capsys.readouterr().out
    assert "lr1e+30_wd0: diverged (epoch 1, step 2 (loss nan)); not a candidate" in said
    assert "diverged, never chosen: lr1e+30_wd0" in said
    rows = list(csv.DictReader(open(os.path.join(out, "sweep.csv"))))
    assert [(r["point"], r["status"], r["top1"]) for r in rows] == [("lr1e+30_wd0", "diverged", ""),
                                                                    ("lr0.001_wd0", "done", "0.5")]
    assert (result["lr"], result["search"]["diverged"]) == (1e-3, ["lr1e+30_wd0"])
    again = DivergingTrainer()  # a re-run does not train the diverged point again
    assert run_grid_search(plan, out, again, quiet=True) == result and again.calls == []
    with pytest.raises(SweepError, match="every point of the grid diverged .*lr1e\\+30_wd0, lr0.001_wd0"):
        run_grid_search(plan, str(tmp_path / "all"), DivergingTrainer(diverging=(1e30, 1e-3)), quiet=True)


def test_a_real_sweep_with_a_diverging_learning_rate_picks_the_healthy_point(tmp_path):
    out = str(tmp_path / "sweep")
    assert main(["sweep", *MICRO, "--train-size", "16", "--val-size", "8", "--rank", "4", "--num-clusters", "4",
                 "--lr", "1e30,1e-3", "--weight-decay", "0", "--search-epochs", "1", "--epochs", "1",
                 "--final-train-split", "train", "--final-eval-split", "val", "--output", out]) == 0
    rows = {r["point"]: r for r in csv.DictReader(open(os.path.join(out, "sweep.csv")))}
    assert rows["lr1e+30_wd0"]["status"] == "diverged" and rows["lr0.001_wd0"]["status"] == "done"
    result = json.load(open(os.path.join(out, "final", "eval.json")))
    assert result["lr"] == 1e-3 and result["search"]["diverged"] == ["lr1e+30_wd0"]


def test_damaged_control_files_are_remade_or_refused_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "sweep")
    first = run_grid_search(PLAN, out, FakeTrainer(), quiet=True)
    csv_path = os.path.join(out, "sweep.csv")
    lines = open(csv_path).read().splitlines()
    open(csv_path, "w").write("\n".join(lines[:-1] + ["lr0.0001_wd0.01,0.0001,0.01,1,,,,"]) + "\n")  # cut short
    os.remove(os.path.join(out, "final", "eval.json"))
    open(os.path.join(out, "final", "eval.json"), "w").write('{"method": "gi')
    trainer = FakeTrainer()
    assert run_grid_search(PLAN, out, trainer, quiet=False) == first
    said = capsys.readouterr().out
    assert "1 damaged row(s)" in said and "eval.json is damaged (JSONDecodeError); making it again" in said
    assert [(c["lr"], c["weight_decay"], c["eval_split"]) for c in trainer.calls] == [(1e-4, 0.01, "val"),
                                                                                      (1e-4, 0.01, "test")]
    assert open(csv_path).read().splitlines()[-1].endswith(",done")
    eval_path = os.path.join(out, "final", "eval.json")
    json.dump({**json.load(open(eval_path)), "top1": float("nan")}, open(eval_path, "w"))  # NaN: no result
    trainer = FakeTrainer()
    assert run_grid_search(PLAN, out, trainer, quiet=False) == first
    assert "eval.json is damaged (ValueError); making it again" in capsys.readouterr().out
    assert [c["eval_split"] for c in trainer.calls] == ["test"]
    # a sweep.csv of a gift before the status column: a NaN point is done, and never chosen
    rows = list(csv.DictReader(open(csv_path)))
    fields = [f for f in rows[0] if f != "status"]
    best = max(rows, key=lambda r: float(r["top1"]))
    best["top1"] = "nan"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.remove(eval_path)
    trainer = FakeTrainer()
    result = run_grid_search(PLAN, out, trainer, quiet=True)
    assert (result["lr"], result["weight_decay"]) != (float(best["lr"]), float(best["weight_decay"]))
    assert best["point"] in result["search"]["diverged"] and [c["eval_split"] for c in trainer.calls] == ["test"]
    open(os.path.join(out, "sweep.json"), "w").write("")
    with pytest.raises(SweepError, match="sweep.json \\(the sweep's settings\\) is damaged .*delete that file"):
        run_grid_search(PLAN, out, FakeTrainer(), quiet=True)


def test_a_point_whose_checkpoint_cannot_be_read_names_the_way_out(tmp_path, capsys):
    sweep = ["sweep", *MICRO, "--train-size", "16", "--val-size", "8", "--rank", "4", "--num-clusters", "4",
             "--lr", "1e-3", "--weight-decay", "0", "--search-epochs", "1", "--epochs", "1", "--final-train-split",
             "train", "--final-eval-split", "val", "--output", str(tmp_path / "s")]
    point = tmp_path / "s" / "points" / "lr0.001_wd0"
    os.makedirs(point)
    (point / "checkpoint.pt").write_bytes(b"")
    capsys.readouterr()
    assert main(sweep) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume: cannot read" in err
    assert f"to train that point again, delete {point}" in err


def test_ctrl_c_in_a_sweep_says_to_rerun_the_sweep_not_resume(tmp_path, monkeypatch, capsys):
    import gift.app.train as train_module

    sweep = ["sweep", *MICRO, "--train-size", "16", "--val-size", "8", "--rank", "4", "--num-clusters", "4",
             "--lr", "1e-3", "--weight-decay", "0", "--search-epochs", "2", "--epochs", "1", "--final-train-split",
             "train", "--final-eval-split", "val", "--output", str(tmp_path / "s")]
    real, calls = train_module.batch_of, {"n": 0}

    def interrupt(dataset, indices):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(dataset, indices)

    monkeypatch.setattr(train_module, "batch_of", interrupt)
    assert main(sweep) == 130
    said = capsys.readouterr().out
    assert "interrupted: saved" in said and "re-run the same gift sweep command to continue" in said
    assert "--resume" not in said


def test_a_second_sweep_on_a_folder_in_use_is_refused(tmp_path):
    out = str(tmp_path / "sweep")
    os.makedirs(out)
    with FolderLock(out):
        with pytest.raises(FolderInUse, match="is in use by another gift run"):
            run_grid_search(PLAN, out, FakeTrainer(), quiet=True)


def test_a_sweep_folder_written_before_with_amp_bf16_is_resumed_not_refused(tmp_path, monkeypatch, capsys):
    """The pre-layering fixture recorded ``"amp": "bf16"`` (the spelling then); now it is ``bfloat16``."""
    out = tmp_path / "sweep_bf16"
    shutil.copytree(os.path.join(FIXTURE, "sweep_bf16"), out)
    sweep = ["sweep", *MICRO[:2], "--quiet", "--device", "cpu", "--train-size", "32", "--val-size", "16",
             "--batch-size", "16", "--rank", "4", "--num-clusters", "4", "--lr", "1e-3", "--weight-decay", "0",
             "--search-epochs", "1", "--epochs", "1", "--final-train-split", "train", "--final-eval-split", "val",
             "--output", str(out)]
    before = json.load(open(out / "final" / "eval.json"))
    real, calls = sweep_module.finetune, []
    monkeypatch.setattr(sweep_module, "finetune", lambda cfg, **kw: calls.append(cfg) or real(cfg, **kw))
    for amp in ("bf16", "bfloat16"):
        assert main([*sweep, "--amp", amp]) == 0 and calls == []  # nothing to train: the same sweep, done
    assert json.load(open(out / "sweep.json"))["amp"] == "bfloat16"
    os.remove(out / "final" / "eval.json")  # made again from the old final checkpoint, which resumes
    capsys.readouterr()
    assert main([*sweep, "--amp", "bf16"]) == 0 and len(calls) == 1
    said = capsys.readouterr().out
    assert "was written by an older gift that did not record train_data, train_content, warmup, amp" in said
    after = json.load(open(out / "final" / "eval.json"))
    assert after["top1"] == before["top1"] and after["lr"] == before["lr"]
    capsys.readouterr()
    assert main([*sweep, "--amp", "bf16", "--num-clusters", "8"]) == 2  # a real difference is still refused
    assert "holds another sweep (num_clusters: 4 there vs 8 now)" in capsys.readouterr().err
