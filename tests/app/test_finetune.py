"""`gift finetune`: resume equivalence, Ctrl-C, DDP on 2 CPU processes, and every bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import gift.app.train as finetune_module
from gift.adapters import load_gift_adapter
from gift.app.cli import main
from gift.app.commands.eval import load_adapter_model
from gift.app.data import SyntheticShapes, make_shapes
from gift.files import atomic_write
from gift_kernels.testing import relative_errors

TINY = ["--train-size", "96", "--val-size", "32", "--batch-size", "32", "--quiet", "--drop-path", "0.1"]


def run(tmp, name, *extra):
    out = str(tmp / name)
    assert main(["finetune", *TINY, "--output", out, *extra]) == 0
    return out


def adapter(out):
    return load_file(os.path.join(out, "adapter", "gift_adapter.safetensors"))


def test_embedded_dataset_is_deterministic_with_masks_and_two_labelings():
    a, b = make_shapes(8, 32, seed=3), make_shapes(8, 32, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    images, masks, shapes, patterns = a
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and masks.shape == (8, 32, 32)
    assert ((masks.float().mean((1, 2)) > 0.05) & (masks.float().mean((1, 2)) < 0.6)).all()  # one object, not the frame
    assert not torch.equal(images, make_shapes(8, 32, seed=4)[0])
    ds_shape, ds_pattern = SyntheticShapes(8, task="shape", seed=3), SyntheticShapes(8, task="pattern", seed=3)
    assert torch.equal(ds_shape[0][0], ds_pattern[0][0]) and ds_shape.labels.tolist() == shapes.tolist()
    assert ds_pattern.labels.tolist() == patterns.tolist()


def test_finetune_writes_metrics_curves_and_adapter(tmp_path):
    out = run(tmp_path, "run", "--epochs", "2")
    for f in ("metrics.csv", "metrics.json", "curves.png", "checkpoint.pt", "adapter/gift_config.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert Image.open(os.path.join(out, "curves.png")).format == "PNG"
    assert open(os.path.join(out, "metrics.csv")).read().count("\n") == 3


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    whole = run(tmp_path, "whole", "--epochs", "3")
    part = run(tmp_path, "part", "--epochs", "3", "--stop-after", "1")
    assert len(open(os.path.join(part, "metrics.csv")).read().splitlines()) == 2
    run(tmp_path, "part", "--epochs", "3", "--resume")
    a, b = adapter(whole), adapter(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert open(os.path.join(whole, "metrics.json")).read().count("val_top1") == 3


def test_no_gradient_is_alive_during_a_training_forward(tmp_path, monkeypatch):
    """`gift plan` / --memory auto count a step with no gradients alive in its forward: finetune frees them first."""
    real, alive = finetune_module.build_model, []

    def build_with_hook(*args, **kwargs):
        model, gift_model = real(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda m, inputs: alive.append(any(p.grad is not None for p in m.parameters())) if m.training else None)
        return model, gift_model

    monkeypatch.setattr(finetune_module, "build_model", build_with_hook)
    run(tmp_path, "run", "--epochs", "1", "--train-size", "64")
    assert alive == [False, False]


def test_ctrl_c_mid_epoch_saves_and_resume_matches(tmp_path, monkeypatch):
    whole = run(tmp_path, "whole", "--epochs", "2")
    calls = {"n": 0}
    real = finetune_module.batch_of

    def interrupt_in_epoch_two(dataset, indices):
        calls["n"] += 1
        if calls["n"] == 5:  # 3 training batches per epoch: epoch 2, its second step
            raise KeyboardInterrupt
        return real(dataset, indices)

    monkeypatch.setattr(finetune_module, "batch_of", interrupt_in_epoch_two)
    out = str(tmp_path / "cut")
    assert main(["finetune", *TINY, "--epochs", "2", "--output", out]) == 130
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)  # saved mid-epoch: one step of epoch 2 done
    monkeypatch.setattr(finetune_module, "batch_of", real)
    assert main(["finetune", *TINY, "--epochs", "2", "--output", out, "--resume"]) == 0
    a, b = adapter(whole), adapter(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# PaCa's key bias and the FFN's output bias have exactly-zero gradients (a softmax over clusters and the ViT's
# LayerNorms cannot see them), so Adam moves them by rounding noise alone: `same_adapter` compares them through the
# model's outputs, every other tensor directly.
ZERO_GRADIENT = ("attn.k.bias", "mlp.fc2.bias")


def same_adapter(a_out, b_out, rel):
    """The adapters of two runs agree within ``rel`` of each tensor's scale (but the `ZERO_GRADIENT` tensors), and
    the logits of their models (each run's random backbone, rebuilt) on new images within rounding. Returns the
    per-tensor (max abs, relative) errors."""
    a, b = adapter(a_out), adapter(b_out)
    errors = relative_errors({k: v for k, v in b.items() if not k.endswith(ZERO_GRADIENT)},
                             {k: v for k, v in a.items() if not k.endswith(ZERO_GRADIENT)})
    assert max(r for _, r in errors.values()) < rel, sorted(errors.items(), key=lambda kv: -kv[1][1])[:3]
    images = torch.stack([SyntheticShapes(16, seed=9)[i][0] for i in range(16)])
    with torch.no_grad():
        logits = [load_gift_adapter(os.path.join(out, "adapter")).eval()(images) for out in (a_out, b_out)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    return errors


def finetune_on_two_processes(args, output):
    """``gift finetune ARGS --output OUTPUT`` under torchrun with 2 gloo processes; returns the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "gift", "finetune", *args, "--output", output],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    common = [*TINY[:-2], "--drop-path", "0", "--epochs", "2", "--device", "cpu"]
    single, double = str(tmp_path / "single"), str(tmp_path / "ddp")
    assert main(["finetune", *common, "--output", single]) == 0
    proc = finetune_on_two_processes(common, double)
    assert proc.stdout.count("done:") == 1  # only rank 0 prints the summary line
    # Same global batch; only the order of the gradient sums differs (two half batches, all-reduced).
    errors = same_adapter(single, double, rel=1e-3)
    assert max(err for err, _ in errors.values()) > 0  # two processes really ran: sums in another order


# ---------------------------------------------------------------------------------------- gradient accumulation
def test_grad_accum_steps_gives_the_adapter_of_one_batch_per_step(tmp_path):
    """--grad-accum-steps 4: each of the 3 optimizer steps of the epoch accumulates 4 micro-batches of 8 (one
    generator pass); the adapter is that of steps of 32 (drop-path 0: the same sample order, no random masks)."""
    args = ("--epochs", "1", "--drop-path", "0")
    one, four = run(tmp_path, "one", *args), run(tmp_path, "four", *args, "--grad-accum-steps", "4")
    errors = same_adapter(one, four, rel=1e-4)
    assert max(err for err, _ in errors.values()) > 0  # micro-batches really ran: sums in another order
    states = [torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False) for out in (one, four)]
    assert [s["scheduler"]["last_epoch"] for s in states] == [3, 3]  # the schedule counts optimizer steps
    history = [json.load(open(os.path.join(out, "metrics.json"))) for out in (one, four)]
    assert abs(history[0][0]["train_loss"] - history[1][0]["train_loss"]) < 1e-5


def test_ctrl_c_mid_accumulation_saves_the_last_whole_step_and_resume_matches(tmp_path, monkeypatch):
    args = ["--epochs", "2", "--grad-accum-steps", "4"]
    whole = run(tmp_path, "whole", *args)
    real, forwards = finetune_module.build_model, {"n": 0}

    def build_interrupting(*a, **kw):
        model, gift_model = real(*a, **kw)

        def interrupt(module, inputs):
            if module.training and torch.is_grad_enabled():
                forwards["n"] += 1
                if forwards["n"] == 7:  # step 2 of epoch 1, its third micro-batch
                    raise KeyboardInterrupt
        model.register_forward_pre_hook(interrupt)
        return model, gift_model

    monkeypatch.setattr(finetune_module, "build_model", build_interrupting)
    out = str(tmp_path / "cut")
    assert main(["finetune", *TINY, *args, "--output", out]) == 130
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 1)  # the one whole step before the cut
    monkeypatch.setattr(finetune_module, "build_model", real)
    assert main(["finetune", *TINY, *args, "--output", out, "--resume"]) == 0
    a, b = adapter(whole), adapter(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grad_accum_steps_that_do_not_divide_the_batch_are_one_line(tmp_path, capsys, monkeypatch):
    out = ["--output", str(tmp_path / "o")]
    err = _error(capsys, "--grad-accum-steps", "3", *out)
    assert "--batch-size 32 (the global batch of a step) does not split into --grad-accum-steps 3" in err
    from gift.app.runtime import Dist

    monkeypatch.setattr(finetune_module, "init_distributed", lambda device: Dist(0, 2, torch.device("cpu")))
    err = _error(capsys, "--batch-size", "36", "--grad-accum-steps", "4", *out)
    assert "--batch-size 36 (the global batch) is not divisible by --grad-accum-steps 4 x 2 processes" in err


def test_ddp_with_grad_accum_steps_matches_one_process(tmp_path):
    """2 gloo processes, each 2 micro-batches of 8 per step (no_sync() for the first), against one process with
    steps of 32: the same adapter."""
    common = [*TINY[:-2], "--drop-path", "0", "--epochs", "1", "--device", "cpu"]
    single, double = str(tmp_path / "single"), str(tmp_path / "ddp")
    assert main(["finetune", *common, "--output", single]) == 0
    finetune_on_two_processes([*common, "--grad-accum-steps", "2"], double)
    same_adapter(single, double, rel=1e-3)


# ---------------------------------------------------------------------------------------- bad input
def _write_tree(root, classes=("a", "b"), per_class=2, size=16):
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(np.full((size, size, 3), 40 * i, dtype=np.uint8)).save(root / split / c / f"{i}.png")


def _error(capsys, *args):
    capsys.readouterr()
    code = main(["finetune", *TINY, "--epochs", "1", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_give_one_line_and_status_2(tmp_path, capsys):
    out = ["--output", str(tmp_path / "o")]
    assert "does not exist" in _error(capsys, "--data", str(tmp_path / "nowhere"), *out)
    (tmp_path / "empty").mkdir()
    assert "has no train/ folder" in _error(capsys, "--data", str(tmp_path / "empty"), *out)
    os.makedirs(tmp_path / "noclasses" / "train")
    os.makedirs(tmp_path / "noclasses" / "val")
    assert "has no class folders" in _error(capsys, "--data", str(tmp_path / "noclasses"), *out)
    _write_tree(tmp_path / "tree")
    os.makedirs(tmp_path / "tree" / "train" / "c")
    os.makedirs(tmp_path / "tree" / "val" / "c")
    Image.new("RGB", (4, 4)).save(tmp_path / "tree" / "val" / "c" / "x.png")
    err = _error(capsys, "--data", str(tmp_path / "tree"), *out)
    assert "class folder" in err and "train/c" in err and "has no images" in err
    os.rmdir(tmp_path / "tree" / "train" / "c")
    os.remove(tmp_path / "tree" / "val" / "c" / "x.png")
    os.rmdir(tmp_path / "tree" / "val" / "c")
    (tmp_path / "tree" / "train" / "a" / "broken.png").write_bytes(b"not an image at all")
    err = _error(capsys, "--data", str(tmp_path / "tree"), *out)
    assert "cannot read image" in err and "broken.png" in err and "--skip-bad-images" in err
    assert main(["finetune", "--train-size", "4", "--val-size", "4", "--batch-size", "2", "--quiet", "--epochs", "1",
                 "--data", str(tmp_path / "tree"), "--skip-bad-images", "--output", str(tmp_path / "skipped")]) == 0
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().out
    err = _error(capsys, "--model", "vit_smal_patch16_224", *out)
    assert "unknown model 'vit_smal_patch16_224'" in err and "vit_small_patch16_224" in err
    torch.save({"patch_embed.proj.weight": torch.zeros(7, 3, 4, 4)}, tmp_path / "wrong.pth")
    err = _error(capsys, "--pretrained-file", str(tmp_path / "wrong.pth"), *out)
    assert "does not fit VisionTransformer" in err and "patch_embed.proj.weight" in err
    assert "--batch-size must be >= 1 and <= 2147483647, got 0" in _error(capsys, "--batch-size", "0", *out)


def test_resume_from_another_model_or_config_is_refused(tmp_path, capsys):
    out = run(tmp_path, "r", "--epochs", "1")
    err = _error(capsys, "--output", out, "--resume", "--rank", "8")
    assert "is from another model or config" in err and "rank: checkpoint 16 vs now 8" in err
    err = _error(capsys, "--output", out, "--resume", "--lr", "0.5", "--weight-decay", "0.25")
    assert "lr: checkpoint" in err and "vs now 0.5" in err and "weight_decay: checkpoint" in err
    err = _error(capsys, "--output", str(tmp_path / "fresh"), "--resume")
    assert "--resume: no checkpoint at" in err


def test_atomically_written_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(str(tmp_path / "f.txt"), lambda tmp: open(tmp, "w").write("x"))
        run(tmp_path, "run", "--epochs", "1")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "f.txt").st_mode & 0o777) == 0o640
    for f in ("checkpoint.pt", "metrics.json", "adapter/gift_adapter.safetensors", "adapter/gift_config.json"):
        assert (os.stat(tmp_path / "run" / f).st_mode & 0o777) == 0o640, f


# ---------------------------------------------------------------------------------------- nothing lost
def _safetensors_content(path: str) -> tuple[dict, dict[str, bytes]]:
    """A safetensors file's metadata and each tensor's dtype, shape and bytes."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        return f.metadata(), {k: (t.dtype, tuple(t.shape), t.numpy().tobytes()) for k, t in tensors.items()}


def _files(out) -> dict[str, bytes]:
    """Every file of a run folder and its bytes."""
    found = {}
    for root, _, names in os.walk(out):
        for name in names:
            found[os.path.relpath(os.path.join(root, name), out)] = open(os.path.join(root, name), "rb").read()
    return found


def test_overwrite_keeps_the_old_run_when_any_later_check_fails(tmp_path, capsys):
    out = run(tmp_path, "run", "--epochs", "1")
    kept = _files(out)
    _write_tree(tmp_path / "tree")
    jpeg = tmp_path / "tree" / "train" / "a" / "trunc.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:400])
    for args, needle in ((["--data", str(tmp_path / "dataa")], "does not exist"),
                         (["--batch-size", "400"], "is larger than the 96 training images"),
                         (["--pretrained-file", str(tmp_path / "nope.safetensors")], "--pretrained-file"),
                         (["--data", str(tmp_path / "tree")], "trunc.jpg")):
        err = _error(capsys, "--output", out, "--overwrite", *args)
        assert needle in err, err
        assert _files(out) == kept, args  # not a byte of the old run touched


def test_overwrite_removes_every_file_of_the_old_run_and_what_killed_writes_left(tmp_path):
    out = run(tmp_path, "run", "--epochs", "1", "--model-ema")
    assert os.path.isdir(os.path.join(out, "adapter_ema"))
    open(os.path.join(out, ".tmp-abcdcheckpoint.pt"), "wb").write(b"half a checkpoint")
    open(os.path.join(out, "adapter", ".tmp-efghgift_config.json"), "w").write("{")
    run(tmp_path, "run", "--epochs", "1", "--overwrite")
    assert sorted(os.listdir(out)) == ["adapter", "checkpoint.pt", "curves.png", "metrics.csv", "metrics.json"]
    assert sorted(os.listdir(os.path.join(out, "adapter"))) == ["gift_adapter.safetensors", "gift_config.json"]


def test_resume_refuses_other_data_or_another_schedule_with_one_line(tmp_path, capsys):
    out = run(tmp_path, "r", "--epochs", "2", "--stop-after", "1")
    err = _error(capsys, "--output", out, "--epochs", "2", "--resume", "--train-size", "64")
    assert "train_data: checkpoint '96 images, sha256" in err and "vs now '64 images, sha256" in err
    err = _error(capsys, "--output", out, "--epochs", "2", "--resume", "--data-seed", "5")  # same size, other images
    assert "train_data: checkpoint '96 images" in err and "vs now '96 images" in err
    assert "warmup: checkpoint 0.1 vs now 0.5" in _error(capsys, "--output", out, "--resume", "--warmup", "0.5")
    assert "amp: checkpoint None vs now 'bfloat16'" in _error(capsys, "--output", out, "--resume", "--amp", "bf16")
    # an image folder with the same class names but other images is other data too
    _write_tree(tmp_path / "tree", per_class=4)
    first = tmp_path / "tree" / "train" / "a" / "0.png"
    Image.open(first).save(first, compress_level=0)  # uncompressed: its size does not depend on its pixels
    folder = run(tmp_path, "f", "--data", str(tmp_path / "tree"), "--batch-size", "2", "--epochs", "2",
                 "--stop-after", "1")
    Image.fromarray(np.full((16, 16, 3), 7, dtype=np.uint8)).save(tmp_path / "tree" / "train" / "a" / "extra.png")
    err = _error(capsys, "--output", folder, "--data", str(tmp_path / "tree"), "--batch-size", "2", "--epochs", "2",
                 "--resume")
    assert "train_data: checkpoint '8 images" in err and "vs now '9 images" in err
    os.remove(tmp_path / "tree" / "train" / "a" / "extra.png")
    # the same names and byte sizes, other pixels: other data (the content is hashed)
    pixels = np.asarray(Image.open(first)).copy()
    pixels[0, 0] ^= 1
    size = first.stat().st_size
    Image.fromarray(pixels).save(first, compress_level=0)
    assert first.stat().st_size == size  # else the test would not test what it says
    err = _error(capsys, "--output", folder, "--data", str(tmp_path / "tree"), "--batch-size", "2", "--epochs", "2",
                 "--resume")
    assert "train_content: checkpoint '8 images" in err and "vs now '8 images" in err, err


def test_resume_of_a_finished_run_rewrites_a_lost_or_stale_adapter_and_metrics(tmp_path):
    out = run(tmp_path, "r", "--epochs", "2")
    kept = _files(out)
    os.remove(os.path.join(out, "adapter", "gift_adapter.safetensors"))  # lost
    with open(os.path.join(out, "metrics.csv"), "w") as f:
        f.write(kept["metrics.csv"].decode().splitlines()[0] + "\n")  # a row short, as after a kill
    weights = os.path.join(out, "adapter", "gift_adapter.safetensors")
    with open(tmp_path / "kept.safetensors", "wb") as f:
        f.write(kept["adapter/gift_adapter.safetensors"])
    run(tmp_path, "r", "--epochs", "2", "--resume")
    now = _files(out)
    # the same tensors and metadata (safetensors writes its metadata map in no fixed order: not the same bytes)
    assert _safetensors_content(weights) == _safetensors_content(str(tmp_path / "kept.safetensors"))
    assert now["metrics.csv"] == kept["metrics.csv"] and now["metrics.json"] == kept["metrics.json"]


def _flip_a_bit_inside(path: str, tensor: torch.Tensor) -> None:
    """Flip the top exponent bit of the middle element of ``tensor``'s bytes where they lie in the file."""
    data = bytearray(open(path, "rb").read())
    raw = tensor.contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0  # found once: that is the tensor's record
    data[at + 4 * (tensor.numel() // 2) + 3] ^= 0x40
    open(path, "wb").write(bytes(data))


def test_a_flipped_bit_in_the_checkpoint_or_the_adapter_is_one_line_not_a_nan_model(tmp_path, capsys):
    out = run(tmp_path, "r", "--epochs", "2", "--stop-after", "1")
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    _flip_a_bit_inside(os.path.join(out, "checkpoint.pt"), state["trainable"]["backbone.head.weight"])
    err = _error(capsys, "--output", out, "--epochs", "2", "--resume")
    assert "checkpoint.pt' is damaged: its content does not match the checksum" in err
    tensors = adapter(out)
    model = load_adapter_model(os.path.join(out, "adapter"))[0]
    _flip_a_bit_inside(os.path.join(out, "adapter", "gift_adapter.safetensors"), tensors["backbone.head.weight"])
    with pytest.raises(ValueError, match="gift_adapter.safetensors' is damaged: its tensors do not match"):
        model.load_gift_state_dict(os.path.join(out, "adapter", "gift_adapter.safetensors"))  # the library call too
    for command in (["eval", "--adapter", os.path.join(out, "adapter")],
                    ["explain", "--adapter", os.path.join(out, "adapter"), "--image", __file__, "--out",
                     str(tmp_path / "maps")]):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "gift_adapter.safetensors' is damaged: its tensors do not match" in err
