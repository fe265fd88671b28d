"""gift.app.cli, the command line as a user meets it: every bad input is one line and exit status 2 (in a
subprocess), and help without torch."""
import json
import os
import subprocess
import sys

import torch
from PIL import Image

import gift
from gift.app.run_config import FinetuneConfig
from gift.config import GIFTConfig
from tests.helpers import ROOT, TINY


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
        (["plan", "--batch-size", str(10 ** 30)], ["--batch-size must be", "2147483647", str(10 ** 30)]),
        ([*fine, "--lr", "1e39", *out], ["--lr 1e+39 is beyond 1e+30, where AdamW's float32 update overflows"]),
        ([*fine, "--lr", "1e20", "--weight-decay", "1e18", *out], ["--lr 1e+20 x --weight-decay 1e+18 is beyond"]),
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
    assert FinetuneConfig().num_clusters == GIFTConfig().num_clusters
    assert FinetuneConfig().method_rank == GIFTConfig().rank
    assert gift_command("--version").stdout.strip() == f"gift {gift.__version__}"
