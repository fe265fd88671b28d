"""Ahead-of-time compile check for real GPUs, on CPU: every gift_kernels Triton kernel at every launch
configuration the launchers choose for a table of ViT shapes, compiled to cubin for each arch.

    python -m gift_kernels.dev.compile_check --arch sm_80,sm_90 [--json FILE] [--sample K]

The launchers run forward and backward on ``meta`` tensors under `launch.emulate_device` (the arch's SM
count, shared memory, capability) while `kernel_launches.record_triton_launches` records every launch
without running it. Launches that reach the compiler identically (same constexprs, argument types with
the JIT's integer specialisations: equal to 1, divisible by 16; same options) are compiled once. For each
compile it reports registers, spill (local) bytes, shared bytes and compile seconds, and exits with status
1 on a compile error, any spill, shared memory over the arch's limit or over the launchers' estimate
(`launch.paca_kernel_shared_bytes`), or a compile over ``COMPILE_SECONDS_LIMIT``; 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from ..dispatch import TRITON_DTYPE_NAMES
from ..files import atomic_write_text, write_marked_block
from ..launch import (
    ARCH_PROPS,
    TRITON_DEFAULT_STAGES,
    TRITON_DEFAULT_WARPS,
    emulate_device,
    paca_kernel_shared_bytes,
    paca_triton_unsupported,
)
from ..residual import LowRankResidualLinear
from .kernel_launches import innermost_kernel, record_triton_launches, triton_kernels, triton_modules

COMPILE_SECONDS_LIMIT = 60.0
README_COMPILE_START, README_COMPILE_END = "<!-- compile-check:start -->", "<!-- compile-check:end -->"
# ViT-Ti/S/B/L/H/g/G: (depth L, width N)
VIT_SHAPES = {"Ti": (12, 192), "S": (12, 384), "B": (12, 768), "L": (24, 1024), "H": (32, 1280), "g": (40, 1408),
              "G": (48, 1664)}
RANKS = (8, 16, 64, 128)
CLUSTERS = (16, 64, 256)
HEADS = (1, 2, 4)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTIVATIONS = ("sigmoid", "softmax")
TOKENS = (197, 256)            # tokens per image: ragged and even row counts of the residual projection
RAGGED_PACA = (12, 200, 48, 24, 2)      # (L, N, M, r, heads): no length a multiple of its tile (EVEN_* False)
RAGGED_RESIDUAL = (197, 200, 136, 24)   # (tokens, d_in, d_out, r): likewise
BATCH = 8


@dataclass(frozen=True)
class CompileSpec:
    """What reaches the compiler: kernel, argument types, constexprs, options (and one shape that uses it)."""

    kernel: str
    signature: tuple
    constexprs: tuple
    num_warps: int
    num_stages: int
    example: str

    def key(self):
        return (self.kernel, self.signature, self.constexprs, self.num_warps, self.num_stages)

    def config(self) -> str:
        short = {k: v for k, v in self.constexprs if not k.startswith("EVEN") and k not in ("F32_DOT",)}
        even = "".join(k[-1] for k, v in self.constexprs if k.startswith("EVEN") and v)
        dtype = next((t[1:].split(":")[0] for _, t in self.signature if t.startswith("*")), "?")
        ones = ",".join(n for n, t in self.signature if t.endswith(":1"))
        div16 = ",".join(n for n, t in self.signature if t.startswith("i") and t.endswith(":D"))
        return (f"{dtype} " + " ".join(f"{k}={v}" for k, v in short.items() if k != "DT")
                + f" even={even or '-'} w{self.num_warps} s{self.num_stages} one={ones or '-'} div16={div16 or '-'}")


def _arg_type(value) -> str:
    """Triton signature type of one runtime argument, specialised as the JIT specialises a real launch:
    pointers carry its 16-byte alignment (":D"), an integer equal to 1 becomes the constant 1 (":1") and one
    divisible by 16 carries the divisibility-16 attribute (":D")."""
    if isinstance(value, torch.Tensor) and value.dtype in TRITON_DTYPE_NAMES:
        return "*" + TRITON_DTYPE_NAMES[value.dtype] + ":D"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        kind = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        return kind + (":1" if value == 1 else ":D" if value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"compile_check: cannot type a kernel argument {value!r}")


def compile_spec(launch, example: str) -> CompileSpec:
    """The compiler-visible part of one recorded launch."""
    kwargs = dict(launch.kwargs)
    num_warps = kwargs.pop("num_warps", TRITON_DEFAULT_WARPS)
    num_stages = kwargs.pop("num_stages", TRITON_DEFAULT_STAGES)
    signature = [(name, _arg_type(value)) for name, value in zip(launch.arg_names, launch.args)]
    signature += [(name, "constexpr") for name in launch.arg_names[len(launch.args):]]
    return CompileSpec(launch.name, tuple(signature), tuple(sorted((k, _const(v)) for k, v in kwargs.items())),
                       num_warps, num_stages, example)


def _const(v):
    return str(v) if type(v).__name__ == "dtype" else v


def _paca_launches(L, N, M, r, heads, dtype, activation):
    paca_triton, _ = triton_modules()
    meta = dict(device="meta", dtype=dtype)
    t = torch.empty(L, N, r, **meta, requires_grad=True)
    params = [torch.empty(*s, **meta, requires_grad=True) for s in
              [(M, r), (M,)] + [(r, r), (r,)] * 4]
    out = paca_triton.PacaAttentionTriton.apply(t, heads, activation, *params)
    torch.autograd.grad(out, [t, *params], torch.empty_like(out))


def _residual_launches(rows, d_in, d_out, r, bias, dtype):
    _, residual_triton = triton_modules()
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(rows, d_in, **meta, requires_grad=True)
    psi, tokens = (torch.empty(d, r, **meta, requires_grad=True) for d in (d_in, d_out))
    out = LowRankResidualLinear.apply(x, torch.empty(d_out, d_in, **meta), torch.empty(d_out, **meta) if bias else None,
                                      psi, tokens, residual_triton.matmul_lowrank_epilogue)
    torch.autograd.grad(out, [x, psi, tokens], torch.empty_like(out))


def shape_table(arch: str = "sm_80"):
    """``(description, function, args, torch_reason)`` for every op call of the table; ``torch_reason`` (else
    None) says why the launchers take the torch path there, so there is nothing to compile."""
    for (model, (L, N)), r, M, heads, dtype, activation in itertools.product(
            VIT_SHAPES.items(), RANKS, CLUSTERS, HEADS, DTYPES, ACTIVATIONS):
        name = TRITON_DTYPE_NAMES[dtype]
        yield (f"paca ViT-{model} L={L} N={N} M={M} r={r} h={heads} {name} {activation}", _paca_launches,
               (L, N, M, r, heads, dtype, activation), paca_triton_unsupported(M, r, dtype, ARCH_PROPS[arch]))
    for dtype, activation in itertools.product(DTYPES, ACTIVATIONS):
        L, N, M, r, heads = RAGGED_PACA
        yield (f"paca ragged L={L} N={N} M={M} r={r} h={heads} {TRITON_DTYPE_NAMES[dtype]} {activation}",
               _paca_launches,
               (L, N, M, r, heads, dtype, activation), paca_triton_unsupported(M, r, dtype, ARCH_PROPS[arch]))
    for dtype in DTYPES:
        tokens, d_in, d_out, r = RAGGED_RESIDUAL
        yield (f"residual ragged rows={BATCH * tokens} {d_in}->{d_out} r={r} {TRITON_DTYPE_NAMES[dtype]}",
               _residual_launches, (BATCH * tokens, d_in, d_out, r, True, dtype), None)
    for (model, (_, N)), tokens, r, dtype in itertools.product(VIT_SHAPES.items(), TOKENS, RANKS, DTYPES):
        for d_in, d_out in ((N, 3 * N), (N, N), (N, 4 * N), (4 * N, N)):
            yield (f"residual ViT-{model} rows={BATCH * tokens} {d_in}->{d_out} r={r} {TRITON_DTYPE_NAMES[dtype]}",
                   _residual_launches, (BATCH * tokens, d_in, d_out, r, True, dtype), None)


def planned_specs(arch: str) -> tuple[list[CompileSpec], list[str]]:
    """The distinct compiles of the shape table's launches for ``arch`` in first-seen order, and the
    table's rows that run on the torch path (with the reason)."""
    specs: dict = {}
    torch_rows = []
    with emulate_device(ARCH_PROPS[arch]), record_triton_launches(execute=False) as launches:
        for example, fn, args, torch_reason in shape_table(arch):
            if torch_reason:
                torch_rows.append(f"{example}: {torch_reason}")
                continue
            start = len(launches)
            fn(*args)
            for launch in launches[start:]:
                spec = compile_spec(launch, example)
                specs.setdefault(spec.key(), spec)
    return list(specs.values()), torch_rows


def sample(specs: list[CompileSpec], k: int | None) -> list[CompileSpec]:
    """``k`` specs spread evenly over the list (each kernel's first spec first), or all of them."""
    if k is None or k >= len(specs):
        return specs
    firsts = {s.kernel: s for s in reversed(specs)}
    chosen = list(firsts.values())[:k]
    rest = [s for s in specs if s not in chosen]
    step = len(rest) / max(1, k - len(chosen))
    chosen += [rest[int(i * step)] for i in range(k - len(chosen))]
    return chosen


def largest(specs: list[CompileSpec]) -> list[CompileSpec]:
    """Per kernel and operand dtype, the specs with the largest ``BLOCK_M * BLOCK_R`` (where limits bite):
    one per (BLOCK_M, BLOCK_R, BLOCK_N), the one with the most masks."""
    def c(s):
        return dict(s.constexprs)

    def tile(s):
        return c(s).get("BLOCK_M", 1) * c(s).get("BLOCK_R", 1)

    best: dict = {}
    for s in specs:
        group = (s.kernel, c(s).get("DT"), next(t for _, t in s.signature if t.startswith("*")))
        best[group] = max(best.get(group, 0), tile(s))
    chosen: dict = {}
    for s in specs:
        group = (s.kernel, c(s).get("DT"), next(t for _, t in s.signature if t.startswith("*")))
        if tile(s) == best[group]:
            key = group + (c(s).get("BLOCK_M"), c(s).get("BLOCK_R"), c(s).get("BLOCK_N"))
            masks = sum(1 for k, v in s.constexprs if k.startswith("EVEN") and not v)
            if key not in chosen or masks > chosen[key][0]:
                chosen[key] = (masks, s)
    return [s for _, s in chosen.values()]


@dataclass
class CompileResult:
    arch: str
    kernel: str
    config: str
    example: str
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    seconds: float = 0.0
    ptx_lines: int = 0
    scalar_fp32_fmas: int = 0            # fma.rn.f32 in the PTX: unrolled IEEE dots show up here
    estimated_shared_bytes: int | None = None   # what `launch.paca_kernel_shared_bytes` gates the launch with
    error: str | None = None

    def problems(self, shared_limit: int) -> list[str]:
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} bytes per thread")
        if self.shared_bytes is not None and self.shared_bytes > shared_limit:
            out.append(f"shared {self.shared_bytes} B > {shared_limit} B")
        if self.estimated_shared_bytes is not None and (self.shared_bytes or 0) > self.estimated_shared_bytes:
            out.append(f"shared {self.shared_bytes} B > the launchers' estimate {self.estimated_shared_bytes} B "
                       f"(launch.PACA_SHARED_FIT is not conservative here)")
        if self.seconds > COMPILE_SECONDS_LIMIT:
            out.append(f"compile took {self.seconds:.0f} s > {COMPILE_SECONDS_LIMIT:.0f} s")
        return out


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """``(registers, local bytes, shared bytes)`` of the one kernel in ``cubin``, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    values = {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", text)}
    return values.get("REG", 0), values.get("LOCAL", 0), values.get("SHARED", 0)


def compile_one(spec: CompileSpec, arch: str) -> CompileResult:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = innermost_kernel(triton_kernels()[spec.kernel])
    constexprs = {k: tl.dtype(v) if isinstance(v, str) and k == "DT" else v for k, v in spec.constexprs}
    signature, attrs = {}, {}
    for i, (name, kind) in enumerate(spec.signature):
        kind, _, flags = kind.partition(":")
        signature[name] = kind
        if flags == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif flags == "1":                       # the JIT passes an integer argument equal to 1 as a constant
            signature[name], constexprs[name] = "constexpr", 1
    result = CompileResult(arch, spec.kernel, spec.config(), spec.example)
    tiles = dict(spec.constexprs)
    if "BLOCK_M" in tiles and "BLOCK_R" in tiles:
        result.estimated_shared_bytes = paca_kernel_shared_bytes(
            spec.kernel, tiles["BLOCK_M"], tiles.get("BLOCK_N", 0), tiles["BLOCK_R"],
            4 if tiles.get("DT", "fp32") == "fp32" else 2, ARCH_PROPS[arch].capability)
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", int(arch[3:]), 32),
                                  options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
        result.seconds = time.perf_counter() - start
        result.ptx_lines = compiled.asm["ptx"].count("\n")
        result.scalar_fp32_fmas = compiled.asm["ptx"].count("fma.rn.f32")
        result.registers, result.spill_bytes, shared = resource_usage(compiled.asm["cubin"])
        result.shared_bytes = max(shared, int(compiled.metadata.shared))
    except Exception as e:  # noqa: BLE001 - every compiler failure is a finding
        result.seconds = time.perf_counter() - start
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    return result


def summary(results: list[CompileResult]) -> dict[str, dict]:
    """Per arch and kernel: compiles, worst registers, spill, shared bytes and compile seconds."""
    out: dict[str, dict] = {}
    for r in results:
        s = out.setdefault(f"{r.kernel} {r.arch}", dict(compiles=0, max_registers=0, max_spill_bytes=0,
                                                        max_shared_bytes=0, max_seconds=0.0, errors=0))
        s["compiles"] += 1
        s["errors"] += r.error is not None
        s["max_registers"] = max(s["max_registers"], r.registers or 0)
        s["max_spill_bytes"] = max(s["max_spill_bytes"], r.spill_bytes or 0)
        s["max_shared_bytes"] = max(s["max_shared_bytes"], r.shared_bytes or 0)
        s["max_seconds"] = round(max(s["max_seconds"], r.seconds), 1)
    return out


def summary_markdown(results: list[CompileResult]) -> str:
    lines = ["| kernel | arch | compiles | max registers | max spill B | max shared B | max compile s |",
             "|---|---|---|---|---|---|---|"]
    for name, s in sorted(summary(results).items()):
        kernel, arch = name.split()
        lines.append(f"| `{kernel}` | {arch} | {s['compiles']} | {s['max_registers']} | {s['max_spill_bytes']} | "
                     f"{s['max_shared_bytes']} | {s['max_seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gift_kernels.dev.compile_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets among " + ", ".join(ARCH_PROPS))
    parser.add_argument("--json", help="write every compile's row and the per-kernel summary to this file")
    parser.add_argument("--sample", type=int, help="compile only this many configs per arch (spread over the table)")
    parser.add_argument("--largest", action="store_true",
                        help="compile only each kernel's largest tiles per dtype (where shared memory and spills bite)")
    parser.add_argument("--kernel", help="compile only this kernel (e.g. _paca_cluster_fwd)")
    parser.add_argument("--match", help="compile only configs whose description contains this text")
    parser.add_argument("--readme", help="write the per-kernel summary into this file's compile-check block")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCH_PROPS]
    if unknown or not archs:
        print(f"compile_check: unknown --arch {unknown or args.arch!r}; choose from {sorted(ARCH_PROPS)}.",
              file=sys.stderr)
        return 2
    if args.sample is not None and args.sample < 1:
        print(f"compile_check: --sample {args.sample} must be at least 1.", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: TRITON_INTERPRET=1 is set; run it with TRITON_INTERPRET=0 (it compiles for GPUs).",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="gift-compile-check-"))  # time real compiles
    results, failures = [], []
    for arch in archs:
        planned, torch_rows = planned_specs(arch)
        planned = [s for s in planned if (not args.kernel or s.kernel == args.kernel)
                   and (not args.match or args.match in s.config())]
        if not planned:
            print(f"compile_check: no {arch} config matches --kernel {args.kernel!r} --match {args.match!r}.",
                  file=sys.stderr)
            return 2
        specs = sample(largest(planned) if args.largest else planned, args.sample)
        print(f"{arch}: {len(specs)} of {len(planned)} distinct compiles; {len(torch_rows)} table rows take the torch "
              f"path (the Triton kernels do not support them), e.g. {torch_rows[0] if torch_rows else '-'}", flush=True)
        print(f"{'kernel':<26} {'config':<70} {'regs':>5} {'spill':>6} {'shared':>7} {'sec':>6}")
        for spec in specs:
            r = compile_one(spec, arch)
            results.append(r)
            problems = r.problems(ARCH_PROPS[arch].shared_bytes)
            spill = r.spill_bytes if r.spill_bytes is not None else "-"
            print(f"{r.kernel:<26} {r.config:<70} {r.registers or '-':>5} {spill:>6} "
                  f"{r.shared_bytes if r.shared_bytes is not None else '-':>7} {r.seconds:>6.1f}"
                  + (f"  FAIL: {'; '.join(problems)}" if problems else ""), flush=True)
            failures += [f"{arch} {r.kernel} [{r.config}] ({r.example}): {p}" for p in problems]
    print(summary_markdown(results))
    if args.json:
        atomic_write_text(args.json, json.dumps(dict(results=[asdict(r) for r in results], summary=summary(results),
                                                     failures=failures), indent=1))
    if args.readme:
        shown = [f"--arch {args.arch}"] + (["--largest"] if args.largest else []) + \
            [f"--{k} {v!r}" for k, v in (("sample", args.sample), ("kernel", args.kernel), ("match", args.match)) if v]
        command = "python -m gift_kernels.dev.compile_check " + " ".join(shown)
        selection = "the full shape table" if not (args.largest or args.sample or args.kernel or args.match) else \
            "a selection of the shape table (see the command)"
        body = (f"Produced by `{command}` on {selection}: {len(results)} compiles, {len(failures)} problems.\n\n"
                + summary_markdown(results))
        write_marked_block(args.readme, README_COMPILE_START, README_COMPILE_END, body)
    if failures:
        print(f"{len(failures)} problems:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
