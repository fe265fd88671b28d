"""One prepared check for a lent GPU machine (``bash bench/gpu_check.sh OUT_DIR [--dry-run]``), designed for under
8 minutes on an H200 (16 CPU cores) with nothing but this repo and a Python with torch, triton, timm, peft, pytest
and pytest-benchmark.

1. Warm: every later step that launches Triton kernels runs once, all at once, as separate processes sharing one
   Triton cache, so the compiles (single-threaded each) run in parallel; their results count too if a later
   step runs out of time.
2. The ``reserved`` steps, short and never crowded out: one ``compute-sanitizer --tool memcheck`` and one
   ``--tool racecheck`` run on small ragged shapes with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (the caching
   allocator hides out-of-bounds accesses inside its blocks).
3. The cases that matter, one at a time, in the time the sanitizers left: the ViT-H PaCa shape in
   fp32/bf16/fp16, the ragged-split PaCa shapes, an even and a ragged residual shape, the self-verifying dispatch
   on CUDA (injected failures, and auto's verdicts at the ViT-H shapes, into OUT_DIR/kernels.json), FastGIFT with
   the Triton kernels against the reference; then the ViT-H bench rows (bf16, into OUT_DIR/bench).

Every step has a timeout and the whole run a deadline (`DEADLINE_S`): a step that fails, times out or finds no
time left is recorded and the next one runs. The sanitizer runs are ``reserved``: they run first after the warm-up,
so that no earlier step can leave them without time, and only the time they take is gone. A pytest
step whose selected tests all skip is recorded as "skipped".
Everything lands in OUT_DIR/summary.json (one record per step:
command, status, return code, seconds, pytest counts, the log's tail; the device, versions and auto's verdicts),
with kernels.json (the verdicts), bench/ (the bench's results) and logs.tar.gz (every log and junit file) beside
it: few files, as a lent machine hands back at most 8. ``--dry-run`` prints the plan and runs nothing;
``--keep-logs`` leaves logs/ unpacked.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEADLINE_S = 470                 # the whole run, warm-up included: under 8 minutes
WARM_S = 210                     # the warm-up's share at most
RESERVE_S = 10                   # kept back for writing the summary
TAIL_LINES = 40


@dataclass
class Step:
    """One command of the check; ``pytest`` steps get a junit file and their counts in the summary. ``warm``: run
    in the warm-up as it is (True), with other arguments (a list), or not (False); ``main``: run after it."""

    name: str
    argv: list[str]
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)
    pytest: bool = False
    warm: bool | list[str] = True
    main: bool = True
    needs: str | None = None     # an executable that must exist, else the step is skipped
    reserved: bool = False       # runs right after the warm-up, before every other step

    def warm_argv(self) -> list[str] | None:
        return None if self.warm is False else (list(self.argv) if self.warm is True else list(self.warm))


def _pytest(name: str, timeout_s: int, *selection: str, **kw) -> Step:
    return Step(name, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection], timeout_s,
                pytest=True, **kw)


def plan(out: Path) -> list[Step]:
    """The steps, most important first."""
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    no_caching = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    cases = [sys.executable, str(REPO / "bench" / "gpu_check_cases.py")]
    bench = ["bench", "--bench-device", "cuda", "--bench-dtype", "bfloat16", "-k", "model0 or (test_op and 2-)"]
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    return [
        _pytest("paca_vit_h_fp32_bf16_fp16", 120, "tests/kernels/test_launch.py", "-k", "vit_h and cuda"),
        _pytest("paca_ragged_splits", 120, "tests/kernels/test_launch.py", "-k", "gpu_splits and cuda"),
        _pytest("residual_even_and_ragged", 90, "tests/kernels/test_launch.py", "tests/kernels/test_residual.py",
                "-k", "(residual_with_gpu_tiles or even_gpu_tiles) and cuda"),
        _pytest("dispatch_on_cuda", 120, "tests/kernels/test_dispatch.py", "-k", "cuda"),
        # the verdicts are made (timed) in the main run, alone on the GPU; the warm-up's go to scratch
        Step("dispatch_verdicts_vit_h", [*cases, "verdicts", str(out)], 150,
             warm=[*cases, "verdicts", str(out / "scratch" / "warm-verdicts")]),
        _pytest("fast_gift_triton_vs_reference", 90, "tests/model/test_gpu.py"),
        # reserved: run right after the warm-up (their timeouts fit the window after a full warm-up)
        Step("memcheck", [sanitizer, "--tool", "memcheck", "--error-exitcode", "9", "--print-limit", "20",
                          *cases, "sanitize"], 90, env=no_caching, warm=False, needs=sanitizer, reserved=True),
        Step("racecheck", [sanitizer, "--tool", "racecheck", "--error-exitcode", "9", "--print-limit", "20",
                           *cases, "sanitize"], 120, env=no_caching, warm=False, needs=sanitizer, reserved=True),
        _pytest("bench_vit_h_bf16", 200, *bench, "--bench-out", str(out / "bench"),
                env={"GIFT_BENCH_MODELS": "vit_huge_patch14_224:8"},
                warm=[*pytest, *bench, "--bench-rounds", "1", "--bench-out", str(out / "scratch" / "warm-bench")]),
        Step("sanitize_cases", [*cases, "sanitize"], 60, main=False),   # warm-up only: compiles what the sanitizers run
    ]


def _env(step: Step, out: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO),
                "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1",
                "TRITON_CACHE_DIR": env.get("TRITON_CACHE_DIR", "/tmp/gift-gpu-check-triton-cache"),
                "GIFT_KERNELS_CACHE": str(out / "scratch" / f"{step.name}-kernels.json")})
    env.update(step.env)
    return env


def _argv(step: Step, junit: Path | None) -> list[str]:
    return [*step.argv, f"--junitxml={junit}"] if junit else list(step.argv)


def _pytest_counts(junit: Path) -> dict | None:
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-TAIL_LINES:])
    except OSError:
        return ""


def _record(step: Step, argv: list[str], status: str, rc, seconds: float, log: Path, junit: Path | None) -> dict:
    """One step's record; a pytest step that passed with every selected test skipped is "skipped": it checked
    nothing."""
    counts = _pytest_counts(junit) if junit else None
    record = {"name": step.name, "command": shlex.join(argv), "timeout_s": step.timeout_s, "status": status, "rc": rc,
              "seconds": round(seconds, 1), "log": str(log.name), "tail": _tail(log), "pytest": counts}
    if status == "passed" and counts and counts["skipped"] >= counts["tests"]:
        record |= {"status": "skipped", "why": f"all {counts['tests']} selected tests skipped"}
    return record


def _status(rc) -> str:
    return "passed" if rc == 0 else ("timed_out" if rc == "timeout" else "failed")


def warm_up(steps: list[Step], out: Path, budget_s: float) -> list[dict]:
    """The warm steps all at once; each killed at ``budget_s``."""
    started, running = time.monotonic(), []
    for step in steps:
        argv = step.warm_argv()
        if argv is None or (step.needs and not Path(step.needs).exists()):
            continue
        log, junit = out / "logs" / f"warm-{step.name}.log", out / "logs" / f"warm-{step.name}.xml"
        argv = [*argv, f"--junitxml={junit}"] if step.pytest else argv
        with open(log, "w") as f:
            proc = subprocess.Popen(argv, cwd=REPO, env=_env(step, out), stdout=f, stderr=subprocess.STDOUT)
        running.append((step, argv, proc, log, junit if step.pytest else None))
    records = []
    for step, argv, proc, log, junit in running:
        try:
            rc = proc.wait(timeout=max(0.01, budget_s - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        records.append(_record(step, argv, _status(rc), rc, time.monotonic() - started, log, junit))
    return records


def run_step(step: Step, out: Path, left_s: float) -> dict:
    """``step`` with its timeout cut to ``left_s``; recorded whatever happens."""
    log, junit = out / "logs" / f"{step.name}.log", (out / "logs" / f"{step.name}.xml") if step.pytest else None
    argv = _argv(step, junit)
    if step.needs and not Path(step.needs).exists():
        log.write_text(f"{step.needs} not found\n")
        return _record(step, argv, "skipped", None, 0.0, log, None) | {"why": f"{step.needs} not found"}
    if left_s < 5:
        log.write_text("no time left\n")
        return _record(step, argv, "skipped", None, 0.0, log, None) | {"why": "no time left before the deadline"}
    start = time.monotonic()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(argv, cwd=REPO, env=_env(step, out), stdout=f, stderr=subprocess.STDOUT,
                                timeout=min(step.timeout_s, left_s)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        except OSError as e:               # e.g. the executable is missing
            f.write(f"{e}\n")
            rc = "oserror"
    return _record(step, argv, _status(rc), rc, time.monotonic() - start, log, junit)


def _device() -> dict:
    probe = ("import json, torch, triton; p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() "
             "else None; print(json.dumps({'torch': torch.__version__, 'triton': triton.__version__, "
             "'cuda': torch.version.cuda, 'device': p.name if p else None, "
             "'capability': f'{p.major}.{p.minor}' if p else None, "
             "'sm_count': p.multi_processor_count if p else None}))")
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return {"error": f"device probe failed: {e}"}


def run(steps: list[Step], out: Path, deadline_s: float = DEADLINE_S, warm_s: float = WARM_S,
        device: dict | None = None, keep_logs: bool = False) -> dict:
    """Warm-up, then every step in order, within ``deadline_s``; returns (and writes) the summary, and packs logs/
    and scratch/ into logs.tar.gz unless ``keep_logs``."""
    start = time.monotonic()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "scratch").mkdir(exist_ok=True)
    summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "deadline_s": deadline_s,
               "device": device if device is not None else _device()}
    summary["warm_up"] = warm_up(steps, out, min(warm_s, deadline_s / 2)) if warm_s > 0 else []
    summary["steps"] = []
    main = [s for s in steps if s.main and s.reserved] + [s for s in steps if s.main and not s.reserved]
    for step in main:
        summary["steps"].append(run_step(step, out, deadline_s - RESERVE_S - (time.monotonic() - start)))
        _write(out, summary)
    verdicts = out / "kernels.json"
    summary["verdicts"] = json.loads(verdicts.read_text()) if verdicts.exists() else None
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["status"] = {s["name"]: s["status"] for s in summary["steps"]}
    _write(out, summary)
    if not keep_logs:
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for folder in ("logs", "scratch"):
                tar.add(out / folder, arcname=folder)
        for folder in ("logs", "scratch"):
            shutil.rmtree(out / folder)
    return summary


def _write(out: Path, summary: dict) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "summary.json")


def dry_run(steps: list[Step], out: Path) -> None:
    print(f"gpu_check plan: warm-up (at most {WARM_S} s, all warm steps at once), then each step in order; "
          f"deadline {DEADLINE_S} s; results in {out}/summary.json")
    for phase, chosen in (("warm-up", [(s, s.warm_argv()) for s in steps if s.warm_argv() is not None]),
                          ("main", [(s, s.argv) for s in steps if s.main])):
        print(f"{phase}:")
        for step, argv in chosen:
            env = " ".join(f"{k}={v}" for k, v in step.env.items())
            needs = (f"; needs {step.needs}" if step.needs else "") + ("; reserved" if step.reserved else "")
            print(f"  {step.name} [timeout {step.timeout_s} s{needs}]: {env + ' ' if env else ''}{shlex.join(argv)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="results folder (summary.json, logs/, bench/, kernels.json)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--keep-logs", action="store_true", help="leave logs/ and scratch/ unpacked")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    steps = plan(out)
    if args.dry_run:
        dry_run(steps, out)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    summary = run(steps, out, keep_logs=args.keep_logs)
    for s in summary["steps"]:
        print(f"{s['name']}: {s['status']} ({s['seconds']} s)")
    print(f"gpu_check finished in {summary['seconds']} s; {out / 'summary.json'}")
    return 0 if all(s["status"] == "passed" for s in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
