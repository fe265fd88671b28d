"""Fault injection on a tiny run: a kill at each atomic write of the last epoch, a full disk (ENOSPC
injected where the disk reports it, and the free-space check before training), a non-finite step, two
runs on one folder, SIGTERM. After each, either `--resume` gives exactly the uninterrupted run, or the
run stopped with one line and kept its last good files."""
import collections
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import gift.app.train as train_module
import gift_kernels.files
from gift.app.cli import main
from gift.app.divergence import MIN_LOSS_SCALE, Diverged, step_is_finite
from gift.app.run_folder import LOCK_FILE, MIB, DiskFull, FolderInUse, FolderLock, check_free_space, is_disk_full

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--train-size", "32", "--val-size", "16", "--batch-size", "16", "--quiet", "--rank", "4", "--num-clusters",
        "4", "--drop-path", "0.1", "--epochs", "2"]


def finetune(out, *extra) -> int:
    return main(["finetune", *TINY, "--output", str(out), *extra])


def one_error_line(capsys) -> str:
    """The one line of stderr (besides the random-initialisation warning every tiny run prints)."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(a whole 2-epoch run, the same run stopped after epoch 1) as folders."""
    root = tmp_path_factory.mktemp("reference")
    assert finetune(root / "whole") == 0
    assert finetune(root / "half", "--stop-after", "1") == 0
    return root / "whole", root / "half"


def assert_same_run(a, b) -> None:
    """Two run folders hold the same run: adapter tensors, its config, the checkpoint's weights and the
    metrics (but the step times), and no temporary file is left."""
    ta, tb = (load_file(os.path.join(o, "adapter", "gift_adapter.safetensors")) for o in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ca, cb = (json.load(open(os.path.join(o, "adapter", "gift_config.json"))) for o in (a, b))
    assert ca == cb
    sa, sb = (torch.load(os.path.join(o, "checkpoint.pt"), weights_only=False) for o in (a, b))
    assert (sa["epoch"], sa["step_in_epoch"]) == (sb["epoch"], sb["step_in_epoch"])
    assert all(torch.equal(sa["trainable"][k], sb["trainable"][k]) for k in sa["trainable"])
    ma, mb = ([{k: v for k, v in row.items() if k != "step_time_s"} for row in json.load(open(o / "metrics.json"))]
              for o in (a, b))
    assert ma == mb
    lines = [open(os.path.join(o, "metrics.csv")).read().splitlines() for o in (a, b)]
    assert [line.rsplit(",", 1)[0] for line in lines[0]] == [line.rsplit(",", 1)[0] for line in lines[1]]
    for root, _, files in os.walk(b):
        assert not [f for f in files if f.startswith(gift_kernels.files.TMP_PREFIX)], (root, files)


class SimulatedKill(BaseException):
    """A SIGKILL at an exact point: nothing after it runs and no ``except Exception`` of gift catches it."""


def written_files(monkeypatch, run) -> list[str]:
    """The files atomic writes renamed into place while ``run()`` ran, in order."""
    real, names = os.replace, []

    def record(src, dst):
        if os.path.basename(src).startswith(gift_kernels.files.TMP_PREFIX):
            names.append(os.path.relpath(dst, os.path.dirname(os.path.dirname(dst))))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", record)
    run()
    monkeypatch.setattr(os, "replace", real)
    return names


def test_a_kill_at_any_atomic_write_of_the_last_epoch_resumes_to_the_uninterrupted_run(
        tmp_path, monkeypatch, reference):
    whole, half = reference
    probe = tmp_path / "probe"
    shutil.copytree(half, probe)
    writes = written_files(monkeypatch, lambda: finetune(probe, "--resume"))
    # the resume rewrites epoch 1's adapter and metrics, then epoch 2 writes checkpoint, adapter, metrics, curves
    assert writes.count("probe/checkpoint.pt") == 1 and writes.count("adapter/gift_adapter.safetensors") == 2
    real = os.replace
    # a kill after write i leaves what a kill before write i + 1 does: "mid" (the temp file written, not
    # renamed) at every write and "after" at the last one reach every state a kill can leave
    kills = [(i, "mid") for i in range(len(writes))] + [(len(writes) - 1, "after")]
    for index, phase in kills:
        name = writes[index]
        out = tmp_path / f"kill{index}_{phase}"
        shutil.copytree(half, out)
        count = {"n": 0}

        def kill(src, dst, index=index, phase=phase):
            if not os.path.basename(src).startswith(gift_kernels.files.TMP_PREFIX):
                return real(src, dst)
            count["n"] += 1
            if count["n"] - 1 != index:
                return real(src, dst)
            if phase == "mid":  # a real kill leaves the temp file behind
                os.link(src, os.path.join(os.path.dirname(src), gift_kernels.files.TMP_PREFIX + "killed"))
                raise SimulatedKill
            real(src, dst)
            raise SimulatedKill

        monkeypatch.setattr(os, "replace", kill)
        with pytest.raises(SimulatedKill):
            finetune(out, "--resume")
        monkeypatch.setattr(os, "replace", real)
        assert finetune(out, "--resume") == 0, (name, phase)
        assert_same_run(whole, out)


def test_a_full_disk_while_saving_is_one_line_and_loses_nothing_written(tmp_path, monkeypatch, capsys, reference):
    whole, half = reference
    real = gift_kernels.files._fsync_path
    for target in ("checkpoint.pt", "gift_adapter.safetensors"):  # the disk fills before / after the checkpoint
        out = tmp_path / target
        shutil.copytree(half, out)
        before = torch.load(out / "checkpoint.pt", weights_only=False)
        seen = {"n": 0}

        def full(path, target=target):
            if os.path.basename(path).startswith(gift_kernels.files.TMP_PREFIX) and path.endswith(target):
                seen["n"] += 1
                if seen["n"] == (2 if target.endswith("safetensors") else 1):  # epoch 2's, not the resume's
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(path)

        monkeypatch.setattr(gift_kernels.files, "_fsync_path", full)
        capsys.readouterr()
        assert finetune(out, "--resume") == 2
        err = one_error_line(capsys)
        assert "no space left on device while writing epoch 2's files" in err and "--resume" in err, err
        after = torch.load(out / "checkpoint.pt", weights_only=False)  # whole: the old one, or epoch 2's
        assert after["epoch"] == (1 if target == "checkpoint.pt" else 2) and before["epoch"] == 1
        monkeypatch.setattr(gift_kernels.files, "_fsync_path", real)
        assert finetune(out, "--resume") == 0  # space freed: the same run as without the full disk
        assert_same_run(whole, out)


def test_too_little_free_space_is_refused_before_training_and_before_overwrite(tmp_path, monkeypatch, capsys,
                                                                              reference):
    whole, _ = reference
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    epochs = []
    monkeypatch.setattr(train_module, "train_one_epoch", lambda *a, **k: epochs.append(a))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("gift.app.run_folder.shutil.disk_usage", lambda path: usage(10 ** 12, 10 ** 12, 1000))
    capsys.readouterr()
    assert finetune(out, "--overwrite") == 2
    err = one_error_line(capsys)
    assert "0.0 MiB free on its file system, but an epoch needs about" in err and "checkpoint.pt" in err
    assert epochs == [] and os.path.isfile(out / "checkpoint.pt")  # nothing computed, the old run kept
    assert_same_run(whole, out)


def test_disk_full_is_recognised_in_every_form_the_writers_report_it():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 46592 vs 46484")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied")) and not is_disk_full(ValueError("x"))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_checkpoint_written_to_a_full_device_raises_enospc():
    """The checkpoint goes through Python's file object, so a full disk is an OSError (torch.save to a path
    raises an unrelated-looking stream error instead)."""
    with pytest.raises(OSError) as raised, open("/dev/full", "wb") as f:
        torch.save({"w": torch.zeros(100_000)}, f)
    assert raised.value.errno == errno.ENOSPC


def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys,
                                                                             reference):
    whole, half = reference
    out = tmp_path / "run"
    shutil.copytree(half, out)
    calls = {"n": 0}
    real_loss = torch.nn.functional.cross_entropy

    class OverflowingLoss:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        def cross_entropy(self, *args, **kwargs):  # the second step of epoch 2 overflows
            calls["n"] += 1
            loss = real_loss(*args, **kwargs)
            return loss * float("inf") if calls["n"] == 2 else loss

    monkeypatch.setattr(train_module, "F", OverflowingLoss())
    capsys.readouterr()
    assert finetune(out, "--resume") == 2
    err = one_error_line(capsys)
    assert "training diverged at epoch 2, step 2 (loss inf)" in err and "stopped before saving it" in err
    assert "keeps the last good checkpoint and adapter (after epoch 1)" in err and "lower --lr" in err
    assert_same_run(half, out)  # nothing of the diverged epoch was written
    monkeypatch.setattr(train_module, "F", torch.nn.functional)
    assert finetune(out, "--resume") == 0
    assert_same_run(whole, out)
    capsys.readouterr()
    assert finetune(tmp_path / "huge", "--lr", "1e30") == 2  # NaN from the start: nothing saved at all
    err = one_error_line(capsys)
    assert "training diverged at epoch 1" in err and "nothing of this run was saved" in err
    assert not os.path.exists(tmp_path / "huge" / "checkpoint.pt")


def test_under_the_loss_scaler_a_non_finite_step_is_skipped_as_torch_amp_does():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=4.0)
    loss = (weight * torch.tensor([1.0, float("inf"), 1.0])).sum()
    scaler.scale(loss).backward()
    assert step_is_finite(loss, [weight], scaler, "epoch 1, step 1") is False
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight.detach(), torch.ones(3)) and scaler.get_scale() == 2.0  # skipped, scale halved
    scaler.update(MIN_LOSS_SCALE / 2)
    with pytest.raises(Diverged, match="at loss scale 0.25"):
        step_is_finite(loss, [weight], scaler, "epoch 1, step 2")
    off = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(Diverged, match="training diverged at epoch 1, step 3 \\(non-finite gradients\\)"):
        step_is_finite(torch.tensor(1.0), [weight], off, "epoch 1, step 3")


def test_the_loss_scale_and_its_growth_counter_are_checkpointed(tmp_path):
    """Resume continues float16's scaler where it was (not afresh at 2**16), so it is bit-identical."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=4)
    for overflow in (True, False, False):  # one skipped step (scale halved), then two that count to growth
        optimizer.zero_grad()
        scaler.scale(model(torch.ones(1, 3)).sum() * (float("inf") if overflow else 1.0)).backward()
        scaler.step(optimizer)
        scaler.update()
    path = str(tmp_path / "checkpoint.pt")
    train_module.save_checkpoint(path, model, optimizer, scheduler, {"k": 1}, 1, 0, 1, [], {}, {}, scaler=scaler)
    state = train_module.load_checkpoint(path, {"k": 1})
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=4)
    train_module.restore_scaler(fresh, state)
    assert fresh.get_scale() == scaler.get_scale() == 2.0 ** 15
    assert fresh.state_dict() == scaler.state_dict() and fresh.state_dict()["_growth_tracker"] == 2
    train_module.restore_scaler(fresh, {"scaler": None})  # a checkpoint of an older gift: left as it is
    assert fresh.get_scale() == 2.0 ** 15


def test_a_folder_lock_is_exclusive_and_a_dead_owners_lock_is_taken_over(tmp_path, capsys):
    with FolderLock(str(tmp_path)) as held:
        owner = json.load(open(tmp_path / LOCK_FILE))
        assert owner["pid"] == os.getpid() and held.recovered is None
        with pytest.raises(FolderInUse, match=f"is in use by another gift run \\(pid {os.getpid()} on host"):
            FolderLock(str(tmp_path)).acquire()
    assert not os.path.exists(tmp_path / LOCK_FILE)  # released and removed
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 2 ** 22 + 1, "host": "gone", "started": "then"}))  # a SIGKILL's
    assert finetune(out, "--epochs", "1") == 0
    assert f"took over the lock of {out} from a run that ended without releasing it (pid {2 ** 22 + 1}" in \
        capsys.readouterr().out
    assert not os.path.exists(out / LOCK_FILE)


def test_a_second_run_on_a_folder_in_use_is_refused_and_sigterm_saves_like_ctrl_c(tmp_path, capsys):
    """A real second process: it holds the folder, a run started meanwhile is refused in one line; SIGTERM
    (what a scheduler sends) then saves mid-epoch, and --resume gives the uninterrupted run."""
    args = [*TINY[:-1], "4"]
    whole = tmp_path / "whole"
    assert main(["finetune", *args, "--output", str(whole)]) == 0
    out = tmp_path / "shared"
    # the child computes as this process does (same thread count), so that its result is comparable bit for bit
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    loud = [a for a in args if a != "--quiet"]
    log = open(tmp_path / "child.err", "w+")
    child = subprocess.Popen([sys.executable, "-m", "gift", "finetune", *loud, "--output", str(out)], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        for line in child.stdout:  # the first epoch's line: the child holds the lock and is training
            if line.startswith("epoch 1/4"):
                break
        assert os.path.isfile(out / LOCK_FILE) and child.poll() is None
        capsys.readouterr()
        assert main(["finetune", *args, "--output", str(out), "--overwrite"]) == 2
        err = one_error_line(capsys)
        assert f"is in use by another gift run (pid {child.pid} on host" in err
        child.send_signal(signal.SIGTERM)
        stdout, _ = child.communicate()
    finally:
        if child.poll() is None:
            child.kill()
        log.seek(0)
        stderr = log.read()
        log.close()
    assert child.returncode == 143, stderr[-2000:]
    assert "terminated (SIGTERM): saved" in stdout and "continue with --resume" in stdout
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] >= 1 and not os.path.exists(out / LOCK_FILE)
    assert main(["finetune", *args, "--output", str(out), "--resume"]) == 0
    assert_same_run(whole, out)


def test_overwrite_keeps_the_old_run_until_the_new_one_saves_a_checkpoint(tmp_path, monkeypatch, capsys, reference):
    """--overwrite sets the old run aside: a new run that diverges (or crashes, or is killed) before its
    first checkpoint puts it back; one that saves a checkpoint replaces it."""
    whole, half = reference
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    capsys.readouterr()
    assert finetune(out, "--overwrite", "--lr", "1e30") == 2  # NaN from the first step
    err = one_error_line(capsys)
    assert "nothing of this run was saved" in err and f"the run it was to replace is back in {out}" in err, err
    assert_same_run(whole, out)
    assert not os.path.exists(out / ".gift-replaced")

    def crash(*args, **kwargs):
        raise RuntimeError("injected crash in the first step")

    monkeypatch.setattr(train_module, "accumulate_gradients", crash)
    with pytest.raises(RuntimeError, match="injected crash"):
        finetune(out, "--overwrite")
    assert_same_run(whole, out)

    def kill(*args, **kwargs):
        raise SimulatedKill

    monkeypatch.setattr(train_module, "accumulate_gradients", kill)
    monkeypatch.setattr(train_module, "restore_replaced", lambda folder: False)  # a SIGKILL runs no handler
    with pytest.raises(SimulatedKill):  # the old run is left aside, the next run puts it back
        finetune(out, "--overwrite")
    assert os.path.isdir(out / ".gift-replaced") and not os.path.exists(out / "checkpoint.pt")
    monkeypatch.undo()
    capsys.readouterr()
    assert finetune(out, "--resume") == 0
    assert "put back the run" in capsys.readouterr().out
    assert_same_run(whole, out)
    assert finetune(out, "--overwrite", "--stop-after", "1") == 0  # a checkpoint saved: the old run is gone
    assert not os.path.exists(out / ".gift-replaced")
    assert_same_run(half, out)


def test_an_interrupt_after_a_step_that_made_a_weight_non_finite_saves_nothing(tmp_path, monkeypatch, capsys,
                                                                              reference):
    """Finite loss and gradients, but the update overflows a weight; Ctrl-C arrives before the next step's
    check: the interrupt's checkpoint would hold the infinity, so none is written."""
    _, half = reference
    out = tmp_path / "run"
    shutil.copytree(half, out)
    real_step, real_accumulate = torch.amp.GradScaler.step, train_module.accumulate_gradients
    calls = {"step": 0, "accumulate": 0}

    def overflowing_step(self, optimizer, *args, **kwargs):
        result = real_step(self, optimizer, *args, **kwargs)
        calls["step"] += 1
        if calls["step"] == 1:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    def interrupted(run, x, y):
        calls["accumulate"] += 1
        if calls["accumulate"] == 2:
            raise KeyboardInterrupt
        return real_accumulate(run, x, y)

    monkeypatch.setattr(torch.amp.GradScaler, "step", overflowing_step)
    monkeypatch.setattr(train_module, "accumulate_gradients", interrupted)
    capsys.readouterr()
    assert finetune(out, "--resume") == 2
    err = one_error_line(capsys)
    assert "interrupted after training diverged: 1 trained tensor(s) are not finite" in err, err
    assert "keeps the last good checkpoint and adapter (after epoch 1)" in err and "another --output" in err
    assert_same_run(half, out)


def test_a_disk_too_full_for_the_lock_file_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "run"
    capsys.readouterr()
    assert finetune(out) == 2
    err = one_error_line(capsys)
    assert "no space left on its file system, not even for the lock file .gift.lock" in err, err
    assert os.listdir(out) == []


def test_the_free_space_message_adds_up(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("gift.app.run_folder.shutil.disk_usage", lambda path: usage(10 ** 12, 10 ** 12, MIB))
    needed = {"checkpoint.pt": 3 * MIB, "adapter": 2 * MIB, "metrics": MIB}
    with pytest.raises(DiskFull) as empty:
        check_free_space(str(tmp_path), needed)
    assert ("needs about 9.0 MiB (checkpoint.pt 3.0 + adapter 2.0 + metrics 1.0 + 3.0 for the largest"
            in str(empty.value))
    (tmp_path / "checkpoint.pt").write_bytes(b"x" * (2 * MIB))  # replaced: its space comes back
    with pytest.raises(DiskFull) as replacing:
        check_free_space(str(tmp_path), needed)
    assert ("needs about 7.0 MiB (checkpoint.pt 3.0 + adapter 2.0 + metrics 1.0 - 2.0 the files there give back "
            "+ 3.0 for the largest") in str(replacing.value)
