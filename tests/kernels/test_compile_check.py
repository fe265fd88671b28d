"""Ahead-of-time compile of the Triton kernels for real GPUs on this CPU (`python -m gift_kernels.dev.compile_check`).

The resource gate reads ptxas' own report and cuobjdump's numbers of the kernel's own Function block; it is
proved on a kernel built to spill. A representative sample of the launch configurations compiles here (every
kernel's largest tiles per dtype on sm_80 and sm_90, a spread sample on sm_86); the full table runs in
`make bench`. In subprocesses: the test suite runs the kernels under TRITON_INTERPRET=1, the compile check needs
real @triton.jit functions.
"""
import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gift_kernels.dev.resources import PtxasUsage, parse_cuobjdump_usage, parse_ptxas_log
from gift_kernels.launch import ARCH_PROPS, PACA_SHARED_SLACK, resident_programs

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))

# what Triton's ptxas -v prints for two entry functions (the first one spills): the numbers of one must not
# fill in the other's
PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_kernel_a' for 'sm_80'
ptxas info    : Function properties for _kernel_a
    8160 bytes stack frame, 16256 bytes spill stores, 19272 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 8160 bytes cumulative stack size, 440 bytes cmem[0]
ptxas-blackwell info    : Compiling entry function '_kernel_b' for 'sm_100a'
ptxas-blackwell info    : Function properties for _kernel_b
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers
"""
CUOBJDUMP = """
Resource usage:
 Common:
  GLOBAL:0
 Function _kernel_a:
  REG:32 STACK:8160 SHARED:0 LOCAL:0 CONSTANT[0]:440 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _kernel_b:
  REG:255 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:408 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_ptxas_report_is_read_per_entry_function():
    usage = parse_ptxas_log(PTXAS_LOG)
    assert usage == {"_kernel_a": PtxasUsage(32, 8160, 16256, 19272), "_kernel_b": PtxasUsage(255, 0, 0, 0)}
    assert usage["_kernel_a"].spills() and not usage["_kernel_b"].spills()
    assert parse_ptxas_log(PTXAS_LOG.split("ptxas-blackwell")[0]) == {"_kernel_a": PtxasUsage(32, 8160, 16256, 19272)}


def test_cuobjdump_usage_is_read_from_each_functions_own_block():
    usage = parse_cuobjdump_usage(CUOBJDUMP)
    assert usage["_kernel_a"]["STACK"] == 8160 and usage["_kernel_a"]["REG"] == 32
    assert usage["_kernel_b"] == {"REG": 255, "STACK": 0, "SHARED": 0, "LOCAL": 0, "CONSTANT": 408, "TEXTURE": 0,
                                  "SURFACE": 0, "SAMPLER": 0}


def test_resident_programs_follow_registers_warps_and_shared_memory():
    assert resident_programs((8, 0), 8, 255, 0) == 1                 # 256 threads x 256 registers: the whole file
    assert resident_programs((8, 0), 4, 128, 0) == 4
    assert resident_programs((8, 0), 4, 32, 0) == 16                 # 64 warps per SM
    assert resident_programs((8, 6), 4, 32, 0) == 12                 # 48 warps per SM
    assert resident_programs((9, 0), 4, 64, 100 * 1024) == 2         # 228 KiB per SM, 1 KiB reserved per program
    assert resident_programs((8, 0), 4, 64, 100 * 1024) == 1
    assert resident_programs((8, 6), 4, 64, 99 * 1024) == 1


def _run(*args, timeout=1800):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_the_gate_flags_a_kernel_built_to_spill_and_passes_a_clean_one(tmp_path):
    script = textwrap.dedent("""
        import json, os, sys
        from dataclasses import asdict
        from gift_kernels.dev.compile_check import CompileSpec, compile_kernel
        from gift_kernels.dev.spill_probe import PROBE_KERNELS, PROBES
        out = []
        for name, constexprs, warps, must_spill in PROBES:
            spec = CompileSpec(name, (("X", "*fp32:D"), ("Y", "*fp32:D"), ("ROWS", "constexpr"), ("COLS", "constexpr")),
                               constexprs, warps, 1, "probe")
            for arch in ("sm_80", "sm_90"):
                r = compile_kernel(PROBE_KERNELS[name], name, spec, arch,
                                   ptx_dir=os.path.join(sys.argv[1], "spills" if must_spill else "clean"))
                out.append(dict(asdict(r), must_spill=must_spill, problems=r.problems(1 << 20)))
        print(json.dumps(out))
    """)
    proc = _run("-c", script, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 4
    # the independent check (ptxas -v run again on the PTX, none of compile_check's parsing) agrees
    spills, clean = _ptxas_spills(tmp_path / "spills"), _ptxas_spills(tmp_path / "clean")
    assert spills.returncode == 1 and spills.stdout.count("SPILL ") == 2, spills.stdout + spills.stderr
    assert "2 PTX files assembled" in spills.stdout and "2 spill or fail" in spills.stdout
    assert clean.returncode == 0 and "2 PTX files assembled" in clean.stdout and "0 spill or fail" in clean.stdout, \
        clean.stdout + clean.stderr
    for r in rows:
        assert r["error"] is None and r["registers"] > 0, r
        if r["must_spill"]:
            assert r["stack_frame_bytes"] > 0 and r["spill_store_bytes"] > 0 and r["cuobjdump_stack_bytes"] > 0, r
            assert any(p.startswith("spills: stack frame") for p in r["problems"]), r
        else:
            assert r["stack_frame_bytes"] == 0 and r["spill_store_bytes"] == 0 and r["problems"] == [], r


def _ptxas_spills(ptx_dir):
    """bench/ptxas_spills.sh on ``ptx_dir``: Triton's bundled ptxas -v on every PTX there, spills reported."""
    return subprocess.run(["bash", str(ROOT / "bench" / "ptxas_spills.sh"), str(ptx_dir), sys.executable], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=1800)


def test_shared_memory_over_the_fit_is_a_problem_even_within_the_slack():
    from gift_kernels.dev.compile_check import CompileResult

    def problems(shared):
        r = CompileResult("sm_80", "_paca_attn_fwd", "cfg", "example", num_warps=4, registers=128,
                          stack_frame_bytes=0, spill_store_bytes=0, spill_load_bytes=0, shared_bytes=shared,
                          estimated_shared_bytes=40960, cuobjdump_registers=128)
        return r.problems(ARCH_PROPS["sm_80"].shared_bytes)

    assert problems(40960 - PACA_SHARED_SLACK) == []
    assert any("less its 2048 B slack" in p for p in problems(40960 - PACA_SHARED_SLACK + 1))
    assert any("> 166912 B" in p for p in problems(200000))


def _compile_check(tmp_path, *args, timeout=1800):
    out = tmp_path / "compile.json"
    proc = _run("-m", "gift_kernels.dev.compile_check", "--json", str(out), *args, timeout=timeout)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_compile_check_of_the_largest_tiles_on_sm80_and_sm90_and_a_sample_on_sm86_passes(tmp_path):
    proc, report = _compile_check(tmp_path, "--arch", "sm_80,sm_90", "--largest", "--ptx-dir", str(tmp_path / "ptx"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    independent = _ptxas_spills(tmp_path / "ptx")
    assert independent.returncode == 0 and "0 spill or fail" in independent.stdout, \
        independent.stdout[-3000:] + independent.stderr[-3000:]
    assert f"{len(set((r['arch'], r['ptx_sha256']) for r in report['results']))} PTX files" in independent.stdout
    assert "spill gate proven on sm_80, sm_90" in proc.stdout
    rows = report["results"]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"} and report["failures"] == []
    kernels = {r["kernel"] for r in rows}
    assert {"_paca_cluster_pool", "_paca_cluster_side_fwd", "_paca_attn_fwd", "_paca_attn_bwd",
            "_paca_cluster_side_bwd", "_paca_cluster_bwd", "_sum_rows", "_matmul_lowrank_epilogue"} <= kernels
    masks = {"_paca_cluster_side_fwd": "MR", "_paca_cluster_side_bwd": "MR", "_matmul_lowrank_epilogue": "MNKR"}
    for kernel in kernels - {"_sum_rows"}:          # a masked specialisation at the largest tiles of every kernel
        evens = [re.search(r" even=(\S+)", r["config"]).group(1) for r in rows if r["kernel"] == kernel]
        assert any(set(masks.get(kernel, "NMR")) - set(e) for e in evens), (kernel, evens)
    for r in rows:
        assert r["error"] is None and r["registers"] > 0 and r["stack_frame_bytes"] == 0, r
        assert r["spill_store_bytes"] == 0 and r["cuobjdump_stack_bytes"] == 0 and r["cuobjdump_local_bytes"] == 0, r
        assert r["resident_programs"] >= 1 and r["shared_bytes"] <= ARCH_PROPS[r["arch"]].shared_bytes, r
        if r["estimated_shared_bytes"] is not None:
            assert r["shared_bytes"] + PACA_SHARED_SLACK <= r["estimated_shared_bytes"], r
            assert r["resident_programs"] >= r["assumed_resident_programs"], r
    proc, report = _compile_check(tmp_path, "--arch", "sm_86", "--sample", "8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(report["results"]) == 8 and report["failures"] == []
    assert "take the torch path" in proc.stdout


def test_largest_keeps_each_code_changing_constexpr_and_the_most_masked_spec_of_the_largest_tiles():
    from gift_kernels.dev.compile_check import CompileSpec, largest

    def spec(block_m, softmax, even_m, even_r):
        constexprs = (("BLOCK_M", block_m), ("BLOCK_N", 32), ("BLOCK_R", 64), ("EVEN_M", even_m), ("EVEN_N", True),
                      ("EVEN_R", even_r), ("F32_DOT", "tf32x3"), ("SOFTMAX", softmax))
        return CompileSpec("_paca_cluster_pool", (("T", "*fp32:D"),), constexprs, 8, 2, f"M={block_m}")

    specs = [spec(bm, sm, em, er) for bm in (32, 64) for sm in (False, True) for em, er in
             ((True, True), (False, True), (False, False))]
    chosen = {(dict(s.constexprs)["SOFTMAX"], dict(s.constexprs)["BLOCK_M"], dict(s.constexprs)["EVEN_M"],
               dict(s.constexprs)["EVEN_R"]) for s in largest(specs)}
    assert chosen == {(False, 64, False, False), (True, 64, False, False)}, chosen
    assert len(largest(specs[:3])) == 1 and dict(largest(specs[:3])[0].constexprs)["BLOCK_M"] == 32


def test_shape_table_covers_masked_largest_tiles_and_sends_r_masked_at_64_to_torch():
    from gift_kernels.dev.compile_check import shape_table

    rows = {example: reason for example, _, _, reason in shape_table("sm_80")}
    for M, r, torch_path in ((50, 40, True), (50, 60, True), (50, 64, False), (64, 40, True), (24, 40, True),
                             (24, 64, False), (32, 40, True)):
        for N, h, dtype, act in itertools.product((197, 768), (1, 2), ("fp32", "fp16", "bf16"),
                                                  ("sigmoid", "softmax")):
            reason = rows[f"paca ragged L=12 N={N} M={M} r={r} h={h} {dtype} {act}"]
            assert (reason is not None and "r is masked" in reason) if torch_path else reason is None


def test_shape_table_sends_what_overflows_99_kib_of_shared_memory_to_torch_on_sm86():
    from gift_kernels.dev.compile_check import shape_table

    def reasons(arch):
        return {example: reason for example, _, _, reason in shape_table(arch)}

    sm86, sm80 = reasons("sm_86"), reasons("sm_80")
    row = "paca ViT-B L=12 N=768 M=64 r=64 h=1 fp32 sigmoid"
    assert "shared memory per block" in sm86[row] and "allows 101376 B" in sm86[row], sm86[row]
    assert sm80[row] is None
    assert sm86["paca ViT-B L=12 N=768 M=64 r=16 h=1 fp32 sigmoid"] is None
    assert sm86["paca ragged L=12 N=200 M=48 r=24 h=2 fp32 softmax"] is None
    assert "M <= 64 clusters" in sm80["paca ViT-B L=12 N=768 M=256 r=16 h=1 fp32 sigmoid"]


@pytest.mark.parametrize("args, message", [
    (["--arch", "sm_75"], "unknown --arch ['sm_75']"),
    (["--sample", "0"], "--sample 0 must be at least 1"),
    (["--jobs", "0"], "--jobs 0 must be at least 1"),
    (["--kernel", "_nope"], "no sm_80 config matches --kernel '_nope'"),
])
def test_compile_check_rejects_bad_arguments(tmp_path, args, message):
    proc, _ = _compile_check(tmp_path, *args)
    assert proc.returncode == 2 and message in proc.stderr


def test_count_prints_the_number_of_compiles_per_arch_and_compiles_nothing(tmp_path):
    proc, report = _compile_check(tmp_path, "--arch", "sm_80,sm_86", "--count")
    assert proc.returncode == 0 and report is None, proc.stderr[-3000:]
    found = re.findall(r"(sm_\d+): (\d+) of (\d+) distinct compiles", proc.stdout)
    per_arch = {a: (int(k), int(n)) for a, k, n in found}
    assert set(per_arch) == {"sm_80", "sm_86"} and all(k == n > 0 for k, n in per_arch.values()), proc.stdout
    assert f"{sum(k for k, _ in per_arch.values())} compiles in all" in proc.stdout
    assert "spill gate proven" not in proc.stdout
    proc, _ = _compile_check(tmp_path, "--arch", "sm_80", "--largest", "--count")
    largest = re.search(r"sm_80: (\d+) of (\d+) distinct compiles", proc.stdout)
    assert proc.returncode == 0 and int(largest.group(2)) == per_arch["sm_80"][1] > int(largest.group(1)) > 0
    assert f"{largest.group(1)} compiles in all" in proc.stdout
