"""The command line as a user meets it: every bad input is one line and exit status 2 (in a
subprocess), help without torch, the right backbone for every adapter, exact resume after a Ctrl-C
inside the forward pass, no accidental overwrite, hidden folders, umask permissions, packaging, eval."""
import glob
import json
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import setuptools
import torch
from PIL import Image
from safetensors.torch import load_file

import gift
from gift.app.cli import main
from gift.app.run_config import FinetuneConfig
from gift.config import GIFTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--train-size", "96", "--val-size", "32", "--batch-size", "32", "--quiet"]


def gift_command(*args, env=None) -> subprocess.CompletedProcess:
    """``python -m gift ARGS`` in a fresh process."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    **(env or {}))
    return subprocess.run([sys.executable, "-m", "gift", *args], capture_output=True, text=True, env=full_env,
                          timeout=600, cwd=ROOT)


def cli_in_one_process(argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Each argv through ``gift.app.cli.main`` as the console script runs it (``SystemExit`` from
    argparse included), all in one fresh process (one torch import instead of one per case)."""
    code = """
import contextlib, io, json, sys
from gift.app.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [subprocess.CompletedProcess(argv, code, out, err)
            for argv, (code, out, err) in zip(argvs, json.loads(proc.stdout.strip().splitlines()[-1]))]


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "frame #" not in err and "Exception raised from" not in err, err  # no C++ stack frames of torch's
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def run(tmp, name, *extra):
    out = str(tmp / name)
    assert main(["finetune", *TINY, "--output", out, *extra]) == 0
    return out


def write_tree(root, classes=("a", "b"), per_class=2, size=16):
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(np.full((size, size, 3), 40 * i + 100 * (c == "b"), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")


# ---------------------------------------------------------------------------------- bad input
def test_every_bad_input_is_one_line_and_status_2_before_training(tmp_path):
    (tmp_path / "afile").write_text("x")
    afile = str(tmp_path / "afile")
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "metrics.json").write_text("[]")
    out = ["--output", str(tmp_path / "o")]
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(image)
    fine = ["finetune", *TINY, "--epochs", "1"]
    cases = [
        ([*fine, "--output", afile], ["is a file, not a folder"]),
        ([*fine, "--output", os.path.join(afile, "sub")], ["which is a file"]),
        ([*fine, "--lr", "-1", *out], ["--lr must be > 0, got -1.0"]),
        ([*fine, "--lr", "nan", *out], ["--lr must be > 0, got nan"]),
        ([*fine, "--rank", "0", *out], ["--rank must be >= 1, got 0"]),
        ([*fine, "--num-clusters", "0", *out], ["--num-clusters must be >= 1, got 0"]),
        ([*fine, "--drop-path", "2", *out], ["--drop-path must be >= 0 and < 1, got 2.0"]),
        ([*fine, "--warmup", "-0.5", *out], ["--warmup must be >= 0 and < 1, got -0.5"]),
        (
            [*fine, "--model", "resnet18", "--train-size", "8", "--val-size", "8", "--batch-size", "4", *out],
            ["--method gift on resnet18", "attn.proj", "matches no module"],
        ),
        ([*fine, "--device", "tpu", *out], ["--device must be cpu, cuda or cuda:N, got 'tpu'"]),
        ([*fine, "--amp", "fp16", "--device", "cpu", *out], ["--amp fp16 needs a CUDA device"]),
        ([*fine, "--data", afile, *out], ["is a file, not a folder"]),
        (
            [*fine, "--output", str(tmp_path / "held")],
            ["already holds a run (metrics.json)", "--resume", "--overwrite"],
        ),
        ([*fine, "--resume", "--overwrite", *out], ["give one"]),
        ([*fine, "--pretrained", "--pretrained-file", afile, *out], ["not both"]),
        (
            ["explain", "--adapter", str(tmp_path), "--image", str(image), "--layers", "a,b"],
            ["--layers", "comma-separated layer indices"],
        ),
        (["explain", "--adapter", str(tmp_path), "--image", str(image), "--out", afile], ["--out", "is a file"]),
        (
            ["explain", "--adapter", str(tmp_path), "--image", str(image), "--top-k", "0"],
            ["--top-k", "positive integer"],
        ),
        (["eval", "--adapter", str(tmp_path)], ["gift_config.json", "does not exist"]),
        ([*fine, "--pretrained-file", str(tmp_path / "nope.safetensors"), *out],
         ["--pretrained-file", "nope.safetensors' does not exist"]),
        (["plan", "--device-memory", "0"], ["--device-memory '0' is 0 bytes, too little for a device", "24GiB"]),
        (["plan", "--device-memory", "24"], ["--device-memory '24' is 24 bytes"]),
        ([*fine, "--memory", "auto", "--max-memory", "0.5", *out], ["--max-memory '0.5' is 0 bytes"]),
        (["plan", "--batch-size", str(10 ** 30)], ["Overflow"]),  # torch's own words, without its C++ frames
    ]
    if not torch.cuda.is_available():
        cases.append(([*fine, "--device", "cuda", *out], ["torch sees no CUDA GPU"]))
    if sys.platform.startswith("linux"):  # sysfs is read-only, even for root
        cases.append(([*fine, "--output", "/sys/gift-test-output"], ["is not writable"]))
    for (args, needles), proc in zip(cases, cli_in_one_process([args for args, _ in cases])):
        assert_one_line_error(proc, *needles)
    assert_one_line_error(gift_command(*cases[0][0]), *cases[0][1])  # and one through `python -m gift` itself
    layers = next(case for case in cases if "--layers" in case[0])  # an argparse-level error
    assert_one_line_error(gift_command(*layers[0]), *layers[1])
    assert not os.path.exists(tmp_path / "o" / "checkpoint.pt")  # nothing trained


def test_pretrained_offline_names_the_file_timm_wanted(tmp_path):
    proc = gift_command("finetune", "--model", "vit_tiny_patch16_224", "--pretrained", "--train-size", "4",
                        "--val-size", "4", "--batch-size", "2", "--output", str(tmp_path / "o"),
                        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(proc, "timm/vit_tiny_patch16_224", "--pretrained-file")


def test_missing_extras_are_named_in_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("peft", "matplotlib") else real(name, *a)
    )
    assert main(["finetune", *TINY, "--method", "lora", "--output", str(tmp_path / "lora")]) == 2
    assert "pip install 'gift[lora]'" in capsys.readouterr().err
    out = run(tmp_path, "nocurves", "--epochs", "1")
    assert "pip install 'gift[plots]'" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "curves.png")) and os.path.isfile(os.path.join(out, "metrics.csv"))


# ---------------------------------------------------------------------------------- help
def test_help_answers_without_torch_or_timm_and_shows_defaults():
    code = ("import sys\nfrom gift.app.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'numpy'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0 and "finetune" in proc.stdout and "LOADED []" in proc.stdout, proc.stdout + proc.stderr
    proc = gift_command("finetune", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert f"GIFT clusters M of PaCa (default: {GIFTConfig().num_clusters})" in text
    assert "(default: 0.001)" in text and "(default: gift_vit_micro_patch4_32)" in text
    assert FinetuneConfig().num_clusters == GIFTConfig().num_clusters and FinetuneConfig().rank == GIFTConfig().rank
    assert gift_command("--version").stdout.strip() == f"gift {gift.__version__}"


# ---------------------------------------------------------------------------------- adapters
def test_adapter_on_a_random_backbone_explains_identically_and_evaluates_to_its_val_accuracy(tmp_path, capsys):
    out = run(tmp_path, "run", "--epochs", "1")
    assert "starts from a random initialisation" in capsys.readouterr().err  # the warning line
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    for name in ("png1", "png2"):
        torch.manual_seed(len(name) + (name == "png2"))  # another global RNG state each time: must not matter
        assert main(["explain", "--adapter", os.path.join(out, "adapter"), "--image", str(image),
                     "--out", str(tmp_path / name)]) == 0
    files = sorted(os.listdir(tmp_path / "png1"))
    assert files and files == sorted(os.listdir(tmp_path / "png2"))
    assert all((tmp_path / "png1" / f).read_bytes() == (tmp_path / "png2" / f).read_bytes() for f in files)
    # gift eval on the saved adapter: exactly the last epoch's validation accuracy
    assert main(["eval", "--adapter", os.path.join(out, "adapter"), "--eval-split", "val"]) == 0
    result = json.load(open(os.path.join(out, "eval.json")))
    history = json.load(open(os.path.join(out, "metrics.json")))
    assert result["top1"] == history[-1]["val_top1"] and result["top5"] == history[-1]["val_top5"] == 1.0
    assert result["num_images"] == 32 and result["split"] == "val"
    # an adapter whose recorded backbone has other shapes is refused in one line
    wrong = tmp_path / "wrong"
    shutil.copytree(os.path.join(out, "adapter"), wrong)
    meta = json.loads((wrong / "gift_config.json").read_text())
    meta["run"]["backbone"]["timm_name"] = "vit_tiny_patch16_224"
    (wrong / "gift_config.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["eval", "--adapter", str(wrong)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wrong backbone model" in err


def test_lora_run_saves_a_peft_adapter_that_evaluates_to_its_val_accuracy(tmp_path):
    out = run(tmp_path, "lora", "--epochs", "1", "--method", "lora", "--rank", "4")
    assert {"adapter_model.safetensors", "adapter_config.json", "gift_run.json"} <= set(
        os.listdir(os.path.join(out, "adapter"))
    )
    assert main(["eval", "--adapter", os.path.join(out, "adapter")]) == 0
    result = json.load(open(os.path.join(out, "eval.json")))
    assert result["top1"] == json.load(open(os.path.join(out, "metrics.json")))[-1]["val_top1"]
    assert result["method"] == "lora" and result["trainable_parameters"] > 0


def test_adapter_on_a_pretrained_file_needs_that_file(tmp_path, capsys):
    from safetensors.torch import save_file

    from gift.backbones import create_backbone

    weights = tmp_path / "w.safetensors"
    save_file(
        {k: v.contiguous() for k, v in create_backbone("gift_vit_micro_patch4_32", 4).state_dict().items()}, weights
    )
    out = run(tmp_path, "run", "--epochs", "1", "--pretrained-file", str(weights))
    assert "random initialisation" not in capsys.readouterr().err
    adapter = os.path.join(out, "adapter")
    moved = tmp_path / "moved.safetensors"
    os.replace(weights, moved)
    assert main(["eval", "--adapter", adapter]) == 2
    err = capsys.readouterr().err
    assert "'w.safetensors'" in err and "--pretrained-file" in err
    assert main(["eval", "--adapter", adapter, "--pretrained-file", str(moved)]) == 0
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    assert main(["eval", "--adapter", adapter, "--pretrained-file", str(tmp_path / "other.pt")]) == 2
    assert "is not the file the adapter was trained on" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_resume_after_ctrl_c_inside_forward_or_backward_with_drop_path_is_bitwise_exact(tmp_path, monkeypatch, where):
    from timm.models.vision_transformer import Block

    args = ["--epochs", "2", "--drop-path", "0.1"]
    whole = run(tmp_path, "whole", *args)
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
    out = run(tmp_path, "r", "--epochs", "1")
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


# ---------------------------------------------------------------------------------- files and data
def test_hidden_folders_and_files_are_not_classes(tmp_path):
    write_tree(tmp_path / "tree")
    for split in ("train", "val"):
        os.makedirs(tmp_path / "tree" / split / ".ipynb_checkpoints")
        (tmp_path / "tree" / split / ".DS_Store").write_bytes(b"\0\0")
        (tmp_path / "tree" / split / "a" / "._0.png").write_bytes(b"AppleDouble")
    out = str(tmp_path / "o")
    assert main(["finetune", "--data", str(tmp_path / "tree"), "--batch-size", "2", "--epochs", "1", "--quiet",
                 "--output", out]) == 0
    meta = json.load(open(os.path.join(out, "adapter", "gift_config.json")))
    assert meta["run"]["classes"] == ["a", "b"]


def test_packaging_declares_extras_license_version_and_types():
    captured = {}
    real_setup = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        runpy.run_path(os.path.join(ROOT, "setup.py"))
    finally:
        setuptools.setup = real_setup
        os.chdir(cwd)
    requires = captured["install_requires"]
    assert "torch>=2.3" in requires and not any(r.startswith(("triton", "peft", "matplotlib")) for r in requires)
    extras = captured["extras_require"]
    assert (
        extras["lora"] == ["peft>=0.10"]
        and extras["plots"] == ["matplotlib>=3.6"]
        and extras["triton"][0].startswith("triton")
    )
    assert set(extras["lora"] + extras["plots"] + extras["triton"]) <= set(extras["dev"])
    assert captured["version"] == gift.__version__ and captured["license"] == "MIT"
    assert captured["author"] and captured["url"]
    assert captured["entry_points"]["console_scripts"] == ["gift=gift.app.cli:main"]
    assert "py.typed" in captured["package_data"]["gift"] and os.path.isfile(os.path.join(ROOT, "gift", "py.typed"))
    assert "MIT License" in open(os.path.join(ROOT, "LICENSE")).read()
    from gift.app.recipes import recipe_names  # the recipes ship inside the package, and what reads them

    assert {f"recipes/{n}.yaml" for n in recipe_names()} <= {os.path.relpath(p, os.path.join(ROOT, "gift")) for pat in
                                                             captured["package_data"]["gift"]
                                                             for p in glob.glob(os.path.join(ROOT, "gift", pat))}
    assert any(r.startswith("pyyaml") for r in requires)
    assert hasattr(torch.amp, "GradScaler")  # the loop's torch.amp.GradScaler(device): why torch>=2.3


@pytest.mark.parametrize("readme", [os.path.join(ROOT, "README.md")])
def test_readme_says_how_to_get_a_local_weights_file(readme):
    text = open(readme, encoding="utf-8").read()
    assert "Getting a local weights file for a timm model" in text and "--pretrained-file" in text


def test_demo_sentences_claim_only_what_the_spreads_support_and_fill_the_readme_markers():
    from gift.app.commands.demo import (
        README_END,
        README_START,
        compare,
        explainer_verdict,
        mean_and_spread,
        method_verdict,
        readme_with_demo,
    )

    assert mean_and_spread([0.5, 0.7]) == pytest.approx((0.6, 2 * 0.1414213562))  # 2 sample standard deviations
    assert compare((0.60, 0.05), (0.50, 0.05)) == "ties"  # the intervals touch: no claim
    assert compare((0.61, 0.05), (0.50, 0.05)) == "beats" and compare((0.39, 0.05), (0.50, 0.05)) == "falls below"
    scores = {"GIFT explainer (adapted outputs)": (0.52, 0.04), "GIFT explainer (pre-delta outputs)": (0.67, 0.03),
              "baseline: CLS-token attention of the frozen model": (0.50, 0.05),
              "baseline: random cluster weights": (0.51, 0.02)}
    text = explainer_verdict(scores)
    assert "ties the random-cluster baseline (0.520 ± 0.040 vs 0.510 ± 0.020)" in text
    assert "ties the CLS-attention baseline (0.500 ± 0.050)" in text
    assert "Best: GIFT explainer (pre-delta outputs) (0.670 ± 0.030)." in text
    scores["GIFT explainer (adapted outputs)"] = (0.64, 0.02)  # now within the pre-delta maps' reach
    text = explainer_verdict(scores)
    assert "beats the random-cluster baseline" in text and "beats the CLS-attention baseline" in text
    assert "No single best: GIFT explainer (pre-delta outputs) (0.670 ± 0.030) ties GIFT explainer (adapted" in text
    rows = {"gift": {"top1": (0.97, 0.02)}, "linear": {"top1": (0.70, 0.08)}, "lora": {"top1": (0.98, 0.01)}}
    assert method_verdict(rows) == ("GIFT beats the linear probe (0.970 ± 0.020 vs 0.700 ± 0.080) and ties LoRA "
                                    "(0.970 ± 0.020 vs 0.980 ± 0.010).")
    readme = f"a\n{README_START}\nold\n{README_END}\nb"
    assert readme_with_demo(readme, "new\n") == f"a\n{README_START}\nnew\n{README_END}\nb"


def test_demo_publish_writes_docs_and_the_readme_section(tmp_path):
    from gift.app.commands.demo import README_END, README_START, publish

    (tmp_path / "README.md").write_text(f"# x\n{README_START}\nold\n{README_END}\nrest\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "grid.png")
    publish("| table |\n", str(tmp_path / "grid.png"), str(tmp_path))
    assert (tmp_path / "docs" / "demo_results.md").read_text() == "| table |\n"
    assert (tmp_path / "docs" / "explainer_grid.png").read_bytes() == (tmp_path / "grid.png").read_bytes()
    assert (tmp_path / "README.md").read_text() == f"# x\n{README_START}\n| table |\n{README_END}\nrest\n"


def test_readme_demo_section_is_the_demo_output():
    from gift.app.commands.demo import README_END, README_START

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index(README_START) + len(README_START):readme.index(README_END)]
    assert section.strip() == open(os.path.join(ROOT, "docs", "demo_results.md"), encoding="utf-8").read().strip()
    assert "generated by `gift demo`" in section


def test_hub_weights_are_pinned_by_their_tag_in_the_identity():
    from timm.models import get_pretrained_cfg

    from gift.backbones import backbone_identity

    identity = backbone_identity("vit_tiny_patch16_224", 3, 0.1, 0, pretrained=True)
    default_tag = get_pretrained_cfg("vit_tiny_patch16_224").tag  # augreg_in21k_ft_in1k in timm 1.0
    assert identity["timm_name"] == f"vit_tiny_patch16_224.{default_tag}" and identity["pretrained"] == "hub"
    assert backbone_identity("vit_tiny_patch16_224", 3, 0.1, 0)["timm_name"] == "vit_tiny_patch16_224"
