"""Ahead-of-time compile of the Triton kernels for sm_80/sm_90 on this CPU (`python -m gift_kernels.dev.compile_check`).

A sample of the launch configurations here (the full table runs in `make bench`), in a subprocess: the test
suite runs the kernels under TRITON_INTERPRET=1, the compile check needs real @triton.jit functions.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gift_kernels.launch import ARCH_PROPS, paca_launch

ROOT = Path(__file__).resolve().parents[2]


def _compile_check(tmp_path, *args):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, "-m", "gift_kernels.dev.compile_check", "--json", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_sampled_compile_check_passes_for_sm80_and_sm90(tmp_path):
    proc, report = _compile_check(tmp_path, "--arch", "sm_80,sm_90", "--sample", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = report["results"]
    assert len(rows) == 6 and {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert all(r["error"] is None and r["spill_bytes"] == 0 and r["registers"] > 0 for r in rows)
    assert report["failures"] == []


def test_fp32_cluster_kernel_at_vit_h_shape_has_no_unrolled_scalar_dots(tmp_path):
    """Issue fault 3: IEEE fp32 tl.dots unrolled into ~100k scalar FMAs (134k PTX lines, minutes of ptxas)."""
    cfg = paca_launch(32, 1280, 64, 64, 1, torch.float32, ARCH_PROPS["sm_90"])
    proc, report = _compile_check(tmp_path, "--arch", "sm_90", "--kernel", "_paca_cluster_fwd",
                                  "--match", f"fp32 BLOCK_M=64 BLOCK_N={cfg.block_n} BLOCK_R=64 SOFTMAX=False even=MNR "
                                             f"w{cfg.num_warps_fwd} s{cfg.num_stages_cluster} one=H ")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = report["results"]
    assert row["scalar_fp32_fmas"] < 5000 and row["ptx_lines"] < 40000, row


def test_shape_table_sends_what_overflows_99_kib_of_shared_memory_to_torch_on_sm86():
    from gift_kernels.dev.compile_check import shape_table

    def reasons(arch):
        return {example: reason for example, _, _, reason in shape_table(arch)}

    sm86, sm80 = reasons("sm_86"), reasons("sm_80")
    for row in ("paca ViT-B L=12 N=768 M=64 r=64 h=1 fp32 sigmoid",
                "paca ViT-B L=12 N=768 M=256 r=16 h=1 fp32 softmax"):
        assert "shared memory per block" in sm86[row] and "allows 101376 B" in sm86[row], row
        assert sm80[row] is None, row
    assert sm86["paca ViT-B L=12 N=768 M=64 r=16 h=1 fp32 sigmoid"] is None
    assert sm86["paca ragged L=12 N=200 M=48 r=24 h=2 fp32 softmax"] is None


def test_compile_check_for_sm86_measures_no_more_shared_memory_than_the_launchers_estimate(tmp_path):
    proc, report = _compile_check(tmp_path, "--arch", "sm_86", "--kernel", "_paca_cluster_bwd", "--sample", "1",
                                  "--match", "fp32 BLOCK_M=64 BLOCK_N=32 BLOCK_R=16 SOFTMAX=True even=MN")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = report["results"]
    assert row["error"] is None and row["shared_bytes"] <= min(row["estimated_shared_bytes"], 101376), row
    assert "take the torch path" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--arch", "sm_75"], "unknown --arch ['sm_75']"),
    (["--sample", "0"], "--sample 0 must be at least 1"),
    (["--kernel", "_nope"], "no sm_80 config matches --kernel '_nope'"),
])
def test_compile_check_rejects_bad_arguments(tmp_path, args, message):
    proc, _ = _compile_check(tmp_path, *args)
    assert proc.returncode == 2 and message in proc.stderr
