"""bench/gpu_check.sh, on CPU: its plan (--dry-run), and the runner's records of steps that pass, fail, time out
or cannot run, the later steps running all the same."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from bench import gpu_check

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), "--dry-run"], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert done.returncode == 0, done.stderr
    warm, main = done.stdout.split("\nmain:\n")
    expected = ["paca_vit_h_fp32_bf16_fp16", "paca_ragged_splits", "residual_even_and_ragged", "dispatch_on_cuda",
                "dispatch_verdicts_vit_h", "fast_gift_triton_vs_reference", "memcheck", "racecheck", "bench_vit_h_bf16"]
    lines = main.splitlines()
    assert [line.split(" [")[0].strip() for line in lines] == expected
    assert all("PYTORCH_NO_CUDA_MEMORY_CACHING=1" in line and "gpu_check_cases.py sanitize" in line
               for line in lines if line.strip().startswith(("memcheck", "racecheck")))
    assert "--tool memcheck" in main and "--tool racecheck" in main and "vit_huge_patch14_224:8" in main
    assert "sanitize_cases" in warm and "memcheck" not in warm            # the sanitizers' kernels compile first
    assert f"verdicts {out}/scratch/warm-verdicts" in warm and f"verdicts {out}\n" in main + "\n"
    assert not out.exists()


def test_the_plan_fits_the_window():
    steps = gpu_check.plan(Path("/tmp/out"))
    assert gpu_check.DEADLINE_S < 8 * 60 and gpu_check.WARM_S <= gpu_check.DEADLINE_S / 2
    assert all(0 < s.timeout_s < gpu_check.DEADLINE_S for s in steps)
    # the sanitizers (run first after the warm-up) fit the window even after a full warm-up
    reserved = [s for s in steps if s.main and s.reserved]
    assert {s.name for s in reserved} == {"memcheck", "racecheck"}
    warm_at_most = min(gpu_check.WARM_S, gpu_check.DEADLINE_S / 2)
    assert sum(s.timeout_s for s in reserved) <= gpu_check.DEADLINE_S - warm_at_most - gpu_check.RESERVE_S
    assert {s.name for s in steps if s.main} - {s.name for s in steps if s.warm_argv() is not None} == \
        {"memcheck", "racecheck"}


def _steps(tmp_path):
    test_file = tmp_path / "test_two.py"
    test_file.write_text("def test_passes():\n    pass\n\n\ndef test_fails():\n    assert False\n")
    py = sys.executable
    return [
        gpu_check.Step("passes", [py, "-c", "print('fine')"], 60),
        gpu_check.Step("fails", [py, "-c", "raise SystemExit(3)"], 60, warm=False),
        gpu_check.Step("hangs", [py, "-c", "import time; time.sleep(120)"], 1, warm=False),
        gpu_check.Step("no_tool", ["/nonexistent/compute-sanitizer", "--tool", "memcheck"], 60,
                       needs="/nonexistent/compute-sanitizer"),
        gpu_check.Step("pytest_counts", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)], 120,
                       pytest=True, warm=False),
        gpu_check.Step("after_all_that", [py, "-c", "print('still ran')"], 60, warm=False),
    ]


def test_a_failing_timed_out_or_unrunnable_step_is_recorded_and_the_next_still_runs(tmp_path):
    out = tmp_path / "out"
    summary = gpu_check.run(_steps(tmp_path), out, deadline_s=400, warm_s=60, device={"device": "none"})
    assert summary["status"] == {"passes": "passed", "fails": "failed", "hangs": "timed_out", "no_tool": "skipped",
                                 "pytest_counts": "failed", "after_all_that": "passed"}
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["fails"]["rc"] == 3 and steps["hangs"]["rc"] == "timeout" and "not found" in steps["no_tool"]["why"]
    assert steps["passes"]["tail"] == "fine" and steps["after_all_that"]["tail"] == "still ran"
    counts = steps["pytest_counts"]["pytest"]
    assert (counts["tests"], counts["failures"], len(counts["failed"])) == (2, 1, 1)
    assert "test_fails" in counts["failed"][0]
    assert [w["name"] for w in summary["warm_up"]] == ["passes"] and summary["warm_up"][0]["status"] == "passed"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.json"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"logs/passes.log", "logs/warm-passes.log", "logs/pytest_counts.xml"} <= set(tar.getnames())


def test_steps_past_the_deadline_are_skipped_and_recorded(tmp_path):
    out = tmp_path / "out"
    summary = gpu_check.run(_steps(tmp_path)[:2], out, deadline_s=gpu_check.RESERVE_S, warm_s=0,
                            device={"device": "none"}, keep_logs=True)
    assert summary["status"] == {"passes": "skipped", "fails": "skipped"}
    assert all(s["why"] == "no time left before the deadline" for s in summary["steps"])
    assert (out / "logs" / "passes.log").exists()


def test_the_sanitized_cases_take_the_triton_kernels_on_a_gpu():
    """The sanitizers run these with the Triton backend forced: a shape the launchers send to torch on GPUs would
    raise before any kernel launched, and the sanitizers would check nothing."""
    from bench.gpu_check_cases import SANITIZE_PACA
    from gift_kernels.launch import ARCH_PROPS, paca_triton_unsupported

    _, _, M, r, _ = SANITIZE_PACA
    for arch in ("sm_80", "sm_86", "sm_90", "sm_100"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert paca_triton_unsupported(M, r, dtype, ARCH_PROPS[arch]) is None, (arch, dtype)


def test_reserved_steps_run_first_and_leave_the_others_what_they_do_not_use(tmp_path):
    py = sys.executable
    steps = [gpu_check.Step("hangs", [py, "-c", "import time; time.sleep(120)"], 100, warm=False),
             gpu_check.Step("quick", [py, "-c", "print('ran')"], 30, warm=False),
             gpu_check.Step("reserved", [py, "-c", "print('ran')"], 100, warm=False, reserved=True)]
    # a deadline far below the reserved step's timeout: only its few seconds of use are gone, not its 100 s
    summary = gpu_check.run(steps, tmp_path / "out", deadline_s=gpu_check.RESERVE_S + 12, warm_s=0,
                            device={"device": "none"})
    assert [s["name"] for s in summary["steps"]] == ["reserved", "hangs", "quick"]
    assert summary["status"] == {"reserved": "passed", "hangs": "timed_out", "quick": "skipped"}
    steps = [steps[1], steps[2]]
    summary = gpu_check.run(steps, tmp_path / "out2", deadline_s=gpu_check.RESERVE_S + 30, warm_s=0,
                            device={"device": "none"})
    assert summary["status"] == {"reserved": "passed", "quick": "passed"}


def test_a_pytest_step_whose_tests_all_skip_is_skipped(tmp_path):
    test_file = tmp_path / "test_skips.py"
    test_file.write_text("import pytest\n\n\ndef test_a():\n    pytest.skip('no GPU')\n\n\n"
                         "def test_b():\n    pytest.skip('no GPU')\n")
    step = gpu_check.Step("all_skip", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                          120, pytest=True, warm=False)
    summary = gpu_check.run([step], tmp_path / "out", deadline_s=200, warm_s=0, device={"device": "none"})
    record, = summary["steps"]
    assert (record["status"], record["rc"], record["why"]) == ("skipped", 0, "all 2 selected tests skipped")
