"""Ahead-of-time compile check for real GPUs, on CPU: every gift_kernels Triton kernel at every launch
configuration the launchers choose for a table of ViT shapes, compiled to cubin for each arch.

    python -m gift_kernels.dev.compile_check --arch sm_80,sm_86,sm_90 [--json FILE] [--largest | --sample K]
                                             [--jobs 2] [--ptx-dir DIR] [--count]

The launchers run forward and backward on ``meta`` tensors under `launch.emulate_device` (the arch's SM
count, shared memory, capability) while `kernel_launches.record_triton_launches` records every launch
without running it. Launches that reach the compiler identically (same constexprs, argument types with the
JIT's own specialisations: equal to 1, divisible by 16, unless the kernel opts out; same options) are compiled
once, in ``--jobs`` processes; a PTX text that ptxas already compiled in the run is not compiled again.

What each compile uses is read from the compiler's own reports: ptxas' ``-v`` log (registers, stack frame,
spill stores and loads of the entry function) and cuobjdump's STACK and LOCAL of the kernel's own Function
block; shared bytes from Triton's metadata. Before the table, the gate is proved on `spill_probe`'s kernel
built to spill (flagged) and a clean one (passed). Rows at the register cap are marked; each row says how many
programs fit on an SM (registers, shared memory, warps: `launch.resident_programs`). Exit status 1 on a
compile error, any spill, shared memory over the arch's limit or over the launchers' estimate
(`launch.paca_kernel_shared_bytes`), fewer resident programs than the launchers split for, or a compile over
``COMPILE_SECONDS_LIMIT`` (compiles over it are timed again alone before they count); 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from ..dispatch import TRITON_DTYPE_NAMES
from ..files import atomic_write_text, write_marked_block
from ..launch import (
    ARCH_PROPS,
    MAX_REGISTERS,
    PACA_SHARED_SLACK,
    TRITON_DEFAULT_STAGES,
    TRITON_DEFAULT_WARPS,
    emulate_device,
    paca_kernel_shared_bytes,
    paca_triton_unsupported,
    resident_programs,
)
from ..residual import LowRankResidualLinear
from .kernel_launches import innermost_kernel, record_triton_launches, triton_kernels, triton_modules
from .resources import cuobjdump_usage, parse_ptxas_log

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
# masked specialisations at the largest tiles (BLOCK_M 64 or 32, BLOCK_R 64): N = 197 ragged, 768 even; M or r or
# both masked (both: the torch path, `launch.paca_triton_unsupported`)
RAGGED_PACA_LARGE = tuple((12, N, M, r, heads) for N in (197, 768) for heads in (1, 2)
                          for M, r in ((50, 40), (50, 60), (50, 64), (64, 40), (24, 40), (24, 64), (32, 40)))
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
    maxnreg: int | None = None

    def key(self):
        return (self.kernel, self.signature, self.constexprs, self.num_warps, self.num_stages, self.maxnreg)

    def config(self) -> str:
        short = {k: v for k, v in self.constexprs if not k.startswith("EVEN") and k not in ("F32_DOT",)}
        even = "".join(k[-1] for k, v in self.constexprs if k.startswith("EVEN") and v)
        dtype = next((t[1:].split(":")[0] for _, t in self.signature if t.startswith("*")), "?")
        ones = ",".join(n for n, t in self.signature if t.endswith(":1"))
        div16 = ",".join(n for n, t in self.signature if t.startswith("i") and t.endswith(":D"))
        regs = f" r{self.maxnreg}" if self.maxnreg else ""
        return (f"{dtype} " + " ".join(f"{k}={v}" for k, v in short.items() if k != "DT")
                + f" even={even or '-'} w{self.num_warps}{regs} s{self.num_stages} one={ones or '-'} "
                  f"div16={div16 or '-'}")


def _arg_type(value, specialize: bool = True, align: bool = True) -> str:
    """Triton signature type of one runtime argument, specialised as the JIT specialises a real launch (its own
    rule, `native_specialize_impl`): a pointer carries its 16-byte alignment (":D"), an integer equal to 1 becomes
    the constant 1 (":1") and one divisible by 16 carries the divisibility-16 attribute (":D"), unless the kernel
    lists the argument in ``do_not_specialize`` (``specialize`` False) or ``do_not_specialize_on_alignment``."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    if isinstance(value, torch.Tensor) and value.dtype not in TRITON_DTYPE_NAMES:
        raise TypeError(f"compile_check: cannot type a kernel argument of dtype {value.dtype}")
    if not isinstance(value, (torch.Tensor, bool, int, float)):
        raise TypeError(f"compile_check: cannot type a kernel argument {value!r}")
    kind, flag = native_specialize_impl(BaseBackend, value, False, specialize, align)
    if kind == "constexpr":
        return f"i32:{flag}"
    return kind + (":D" if flag == "D" else "")


def compile_spec(launch, example: str) -> CompileSpec:
    """The compiler-visible part of one recorded launch."""
    kwargs = dict(launch.kwargs)
    num_warps = kwargs.pop("num_warps", TRITON_DEFAULT_WARPS)
    num_stages = kwargs.pop("num_stages", TRITON_DEFAULT_STAGES)
    maxnreg = kwargs.pop("maxnreg", None)
    params = {p.name: p for p in getattr(launch.fn, "params", [])}

    def arg_type(name, value):
        p = params.get(name)
        return _arg_type(value, not (p and p.do_not_specialize), not (p and p.do_not_specialize_on_alignment))

    signature = [(name, arg_type(name, value)) for name, value in zip(launch.arg_names, launch.args)]
    signature += [(name, "constexpr") for name in launch.arg_names[len(launch.args):]]
    return CompileSpec(launch.name, tuple(signature), tuple(sorted((k, _const(v)) for k, v in kwargs.items())),
                       num_warps, num_stages, example, maxnreg)


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
    for (L, N, M, r, heads), dtype, activation in itertools.product(
            (RAGGED_PACA,) + RAGGED_PACA_LARGE, DTYPES, ACTIVATIONS):
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
    """Per kernel, operand dtype and code-changing constexpr (SOFTMAX, DT, F32_DOT...: every one but the tiles and
    the EVEN_* masks), the specs with the largest ``BLOCK_M * BLOCK_R`` (where limits bite): one per
    (BLOCK_M, BLOCK_R, BLOCK_N), the one with the most masks."""
    def c(s):
        return dict(s.constexprs)

    def tile(s):
        return c(s).get("BLOCK_M", c(s).get("BLOCK_MS", 1)) * c(s).get("BLOCK_R", 1)

    def group(s):
        code = tuple((k, v) for k, v in s.constexprs if not k.startswith(("BLOCK_", "EVEN_")))
        return (s.kernel, next(t for _, t in s.signature if t.startswith("*"))) + code

    best: dict = {}
    for s in specs:
        best[group(s)] = max(best.get(group(s), 0), tile(s))
    chosen: dict = {}
    for s in specs:
        if tile(s) == best[group(s)]:
            key = group(s) + (c(s).get("BLOCK_M"), c(s).get("BLOCK_MS"), c(s).get("BLOCK_R"), c(s).get("BLOCK_N"))
            masks = sum(1 for k, v in s.constexprs if k.startswith("EVEN") and not v)
            if key not in chosen or masks > chosen[key][0]:
                chosen[key] = (masks, s)
    return [s for _, s in chosen.values()]


@dataclass
class CompileResult:
    """One compile: ptxas' report (``ptxas_*``), cuobjdump's numbers of the kernel's own Function block
    (``cuobjdump_*``), shared bytes (what the launch requests), residency and times."""

    arch: str
    kernel: str
    config: str
    example: str
    num_warps: int = 0
    maxnreg: int | None = None
    registers: int | None = None              # ptxas "Used N registers"
    stack_frame_bytes: int | None = None      # ptxas: the kernel's stack frame (spilled registers)
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    cuobjdump_registers: int | None = None
    cuobjdump_stack_bytes: int | None = None
    cuobjdump_local_bytes: int | None = None
    shared_bytes: int | None = None
    estimated_shared_bytes: int | None = None   # what `launch.paca_kernel_shared_bytes` gates the launch with
    resident_programs: int | None = None        # per SM, from the measured registers, shared bytes and warps
    assumed_resident_programs: int | None = None  # per SM, what the launchers split for (`launch.resident_programs`
                                                  # of the launch's maxnreg and the estimated shared bytes)
    seconds: float = 0.0                       # the whole compile (frontend, LLVM, ptxas), with --jobs running
    ptxas_seconds: float = 0.0
    seconds_alone: float | None = None         # re-timed with nothing else of ours running (compiles over the limit)
    ptx_sha256: str = ""
    ptx_reused: bool = False                   # ptxas already compiled this exact PTX in this run: its report reused
    ptx_lines: int = 0
    scalar_fp32_fmas: int = 0                  # fma.rn.f32 in the PTX: unrolled IEEE dots show up here
    error: str | None = None

    def at_register_cap(self) -> bool:
        return self.registers is not None and self.registers >= (self.maxnreg or MAX_REGISTERS)

    def spills(self) -> bool:
        return any(bool(v) for v in (self.stack_frame_bytes, self.spill_store_bytes, self.spill_load_bytes,
                                     self.cuobjdump_stack_bytes, self.cuobjdump_local_bytes))

    def problems(self, shared_limit: int) -> list[str]:
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.registers is None or self.stack_frame_bytes is None:
            out.append("no ptxas report for the kernel (the spill check cannot run)")
        if self.spills():
            out.append(f"spills: stack frame {self.stack_frame_bytes} B, spill stores {self.spill_store_bytes} B, "
                       f"loads {self.spill_load_bytes} B (ptxas); STACK {self.cuobjdump_stack_bytes}, "
                       f"LOCAL {self.cuobjdump_local_bytes} (cuobjdump)")
        if self.cuobjdump_registers is not None and self.cuobjdump_registers != self.registers:
            out.append(f"ptxas reports {self.registers} registers, cuobjdump {self.cuobjdump_registers}")
        if self.shared_bytes is not None and self.shared_bytes > shared_limit:
            out.append(f"shared {self.shared_bytes} B > {shared_limit} B")
        if self.estimated_shared_bytes is not None and \
                (self.shared_bytes or 0) > self.estimated_shared_bytes - PACA_SHARED_SLACK:
            out.append(f"shared {self.shared_bytes} B > the launchers' estimate {self.estimated_shared_bytes} B less "
                       f"its {PACA_SHARED_SLACK} B slack (launch.PACA_SHARED_FIT is not an upper bound here)")
        if self.assumed_resident_programs is not None and self.resident_programs is not None and \
                self.resident_programs < self.assumed_resident_programs:
            out.append(f"{self.resident_programs} programs per SM fit, the launchers split for "
                       f"{self.assumed_resident_programs}")
        seconds = self.seconds if self.seconds_alone is None else self.seconds_alone
        if seconds > COMPILE_SECONDS_LIMIT:
            out.append(f"compile took {seconds:.0f} s > {COMPILE_SECONDS_LIMIT:.0f} s"
                       + (" (re-timed alone)" if self.seconds_alone is not None else ""))
        return out


class _CubinStage:
    """Triton's PTX -> cubin stage, wrapped: it times ptxas, keeps ptxas' own ``-v`` report (Triton runs ptxas
    with -v and prints the log when ``knobs.nvidia.dump_ptxas_log`` is set) and compiles each distinct PTX text
    once per run: a PTX that ptxas already compiled (in any of the run's processes, through files in
    ``reuse_dir``) gets that cubin and report back. ``reuse_dir`` None: always run ptxas."""

    def __init__(self, reuse_dir: str | None):
        self.reuse_dir = reuse_dir
        self.last: dict = {}

    def hook(self, *args):
        if not args:                                     # Triton asks for a cache-key suffix first
            return "gift-compile-check", "gift-compile-check"
        _backend, stages, *_ = args
        original = stages["cubin"]
        stages["cubin"] = lambda src, metadata: self._cubin(original, src, metadata)
        return None

    def _cubin(self, original, src, metadata):
        import contextlib
        import hashlib
        import io

        from triton import knobs

        sha = hashlib.sha256(src.encode()).hexdigest()
        self.last = dict(ptx=src, sha=sha)
        if self.reuse_dir is None:
            return self._run_ptxas(original, src, metadata, contextlib, io, knobs)
        import fcntl

        base = os.path.join(self.reuse_dir, sha)
        with open(base + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)            # a second process with the same PTX waits, then reuses
            if os.path.exists(base + ".json"):
                with open(base + ".json") as f:
                    self.last.update(json.load(f), reused=True)
                with open(base + ".cubin", "rb") as f:
                    return f.read()
            cubin = self._run_ptxas(original, src, metadata, contextlib, io, knobs)
            with open(base + ".cubin", "wb") as f:
                f.write(cubin)
            atomic_write_text(base + ".json", json.dumps(dict(log=self.last["log"], seconds=self.last["seconds"])))
            return cubin

    def _run_ptxas(self, original, src, metadata, contextlib, io, knobs):
        log = io.StringIO()
        start = time.perf_counter()
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            cubin = original(src, metadata)
        self.last.update(log=log.getvalue(), seconds=time.perf_counter() - start, reused=False)
        return cubin


def _signature_for_triton(spec_signature, constexprs):
    signature, attrs = {}, {}
    for i, (name, kind) in enumerate(spec_signature):
        kind, _, flags = kind.partition(":")
        signature[name] = kind
        if flags == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif flags == "1":                       # the JIT passes an integer argument equal to 1 as a constant
            signature[name], constexprs[name] = "constexpr", 1
    return signature, attrs


def compile_kernel(fn, name: str, spec: CompileSpec, arch: str, reuse_dir: str | None = None,
                   ptx_dir: str | None = None) -> CompileResult:
    """Compile the @triton.jit function ``fn`` as ``spec`` says for ``arch`` and read what it uses."""
    import triton
    import triton.language as tl
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {k: tl.dtype(v) if isinstance(v, str) and k == "DT" else v for k, v in spec.constexprs}
    signature, attrs = _signature_for_triton(spec.signature, constexprs)
    result = CompileResult(arch, name, spec.config(), spec.example, num_warps=spec.num_warps, maxnreg=spec.maxnreg)
    tiles = dict(spec.constexprs)
    if ("BLOCK_M" in tiles or "BLOCK_MS" in tiles) and "BLOCK_R" in tiles:
        result.estimated_shared_bytes = paca_kernel_shared_bytes(
            name, tiles.get("BLOCK_M", 0), tiles.get("BLOCK_N", 0), tiles["BLOCK_R"], ARCH_PROPS[arch].capability,
            tiles.get("BLOCK_MS"))
    stage = _CubinStage(reuse_dir)
    options = dict(num_warps=spec.num_warps, num_stages=spec.num_stages)
    if spec.maxnreg:
        options["maxnreg"] = spec.maxnreg
    start = time.perf_counter()
    try:
        with knobs.runtime.scope(), knobs.compilation.scope():
            knobs.runtime.add_stages_inspection_hook = stage.hook
            knobs.compilation.always_compile = True      # every compile runs (the PTX reuse above is ours)
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", int(arch[3:]), 32), options=options)
        result.seconds = time.perf_counter() - start
        ptx = compiled.asm["ptx"]
        result.ptx_lines, result.scalar_fp32_fmas = ptx.count("\n"), ptx.count("fma.rn.f32")
        result.ptx_sha256, result.ptx_reused = stage.last.get("sha", ""), bool(stage.last.get("reused"))
        result.ptxas_seconds = 0.0 if result.ptx_reused else stage.last.get("seconds", 0.0)
        entry = compiled.metadata.name
        usage = parse_ptxas_log(stage.last.get("log", "")).get(entry)
        if usage is not None:
            result.registers, result.stack_frame_bytes = usage.registers, usage.stack_frame_bytes
            result.spill_store_bytes, result.spill_load_bytes = usage.spill_store_bytes, usage.spill_load_bytes
        dump = cuobjdump_usage(compiled.asm["cubin"]).get(entry, {})
        result.cuobjdump_registers, result.cuobjdump_stack_bytes = dump.get("REG"), dump.get("STACK")
        result.cuobjdump_local_bytes = dump.get("LOCAL")
        result.shared_bytes = max(dump.get("SHARED", 0), int(compiled.metadata.shared))
        cap = ARCH_PROPS[arch].capability
        if result.registers is not None:
            result.resident_programs = resident_programs(cap, spec.num_warps, result.registers, result.shared_bytes)
        if result.estimated_shared_bytes is not None:
            result.assumed_resident_programs = resident_programs(
                cap, spec.num_warps, spec.maxnreg or MAX_REGISTERS, result.estimated_shared_bytes)
        if ptx_dir:
            atomic_write_text(os.path.join(ptx_dir, f"{arch}-{name}-{result.ptx_sha256[:16]}.ptx"), ptx)
    except Exception as e:  # noqa: BLE001 - every compiler failure is a finding
        result.seconds = time.perf_counter() - start
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    return result


def compile_one(spec: dict, arch: str, reuse_dir: str | None = None, ptx_dir: str | None = None) -> dict:
    """`compile_kernel` of one gift_kernels kernel; ``spec`` and the result as dicts (they cross processes)."""
    spec = CompileSpec(**{k: tuple(tuple(x) for x in v) if k in ("signature", "constexprs") else v
                          for k, v in spec.items()})
    fn = innermost_kernel(triton_kernels()[spec.kernel])
    return asdict(compile_kernel(fn, spec.kernel, spec, arch, reuse_dir, ptx_dir))


def prove_spill_gate(arch: str) -> list[str]:
    """Compile the `spill_probe` kernels for ``arch``: empty if the gate flags the one built to spill and passes the
    clean one, else what went wrong (the gate is then not to be trusted)."""
    from .spill_probe import PROBE_KERNELS, PROBES

    wrong = []
    for name, constexprs, warps, must_spill in PROBES:
        spec = CompileSpec(name, (("X", "*fp32:D"), ("Y", "*fp32:D")) + tuple((k, "constexpr") for k, _ in constexprs),
                           constexprs, warps, 1, "spill probe")
        r = compile_kernel(PROBE_KERNELS[name], name, spec, arch)
        flagged = any(p.startswith("spills") for p in r.problems(ARCH_PROPS[arch].shared_bytes))
        if r.error or r.registers is None or flagged != must_spill:
            wrong.append(f"{arch} {name} {dict(constexprs)}: built {'to' if must_spill else 'not to'} spill, the gate "
                         f"{'flags' if flagged else 'passes'} it (registers {r.registers}, stack "
                         f"{r.stack_frame_bytes}, error {r.error})")
    return wrong


def summary(results: list[CompileResult]) -> dict[str, dict]:
    """Per arch and kernel: compiles, worst registers, spills, shared bytes, residency and compile seconds."""
    out: dict[str, dict] = {}
    for r in results:
        s = out.setdefault(f"{r.kernel} {r.arch}", dict(compiles=0, max_registers=0, at_register_cap=0,
                                                        max_spill_store_bytes=0, max_stack_bytes=0,
                                                        max_shared_bytes=0, min_resident_programs=None,
                                                        max_seconds=0.0, errors=0))
        s["compiles"] += 1
        s["errors"] += r.error is not None
        s["max_registers"] = max(s["max_registers"], r.registers or 0)
        s["at_register_cap"] += r.at_register_cap()
        s["max_spill_store_bytes"] = max(s["max_spill_store_bytes"], r.spill_store_bytes or 0)
        s["max_stack_bytes"] = max(s["max_stack_bytes"], r.stack_frame_bytes or 0, r.cuobjdump_stack_bytes or 0)
        s["max_shared_bytes"] = max(s["max_shared_bytes"], r.shared_bytes or 0)
        if r.resident_programs is not None:
            s["min_resident_programs"] = min(r.resident_programs, s["min_resident_programs"] or r.resident_programs)
        s["max_seconds"] = round(max(s["max_seconds"], r.seconds if r.seconds_alone is None else r.seconds_alone), 1)
    return out


def summary_markdown(results: list[CompileResult]) -> str:
    lines = ["| kernel | arch | compiles | max registers | at the cap | max spill stores B | max stack B | "
             "max shared B | min programs per SM | max compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    def by_kernel_then_arch(item):
        kernel, arch = item[0].split()
        return kernel, int(arch.removeprefix("sm_"))

    for name, s in sorted(summary(results).items(), key=by_kernel_then_arch):
        kernel, arch = name.split()
        lines.append(f"| `{kernel}` | {arch} | {s['compiles']} | {s['max_registers']} | {s['at_register_cap']} | "
                     f"{s['max_spill_store_bytes']} | {s['max_stack_bytes']} | {s['max_shared_bytes']} | "
                     f"{s['min_resident_programs'] if s['min_resident_programs'] is not None else '-'} | "
                     f"{s['max_seconds']} |")
    return "\n".join(lines)


def _row(r: CompileResult, problems: list[str]) -> str:
    def v(x):
        return "-" if x is None else x

    cap = "*" if r.at_register_cap() else " "
    return (f"{r.kernel:<26} {r.config:<78} {v(r.registers):>4}{cap} {v(r.stack_frame_bytes):>6} "
            f"{v(r.shared_bytes):>7} {v(r.resident_programs):>3} {r.seconds:>6.1f}"
            + (" (reused)" if r.ptx_reused else "")
            + (f"  FAIL: {'; '.join(problems)}" if problems else ""))


def run_compiles(jobs: list[tuple[dict, str]], workers: int, reuse_dir: str, ptx_dir: str | None, on_result):
    """``compile_one`` of every ``(spec, arch)`` in ``workers`` processes; ``on_result(index, result)`` as each ends."""
    import importlib

    module = importlib.import_module("gift_kernels.dev.compile_check")   # by name: picklable as __main__ is not
    if workers <= 1:
        for i, (spec, arch) in enumerate(jobs):
            on_result(i, module.compile_one(spec, arch, reuse_dir, ptx_dir))
        return
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(module.compile_one, spec, arch, reuse_dir, ptx_dir): i
                   for i, (spec, arch) in enumerate(jobs)}
        for future in concurrent.futures.as_completed(futures):
            on_result(futures[future], future.result())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gift_kernels.dev.compile_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets among " + ", ".join(ARCH_PROPS))
    parser.add_argument("--json", help="write every compile's row and the per-kernel summary to this file")
    parser.add_argument("--sample", type=int, help="compile only this many configs per arch (spread over the table)")
    parser.add_argument("--largest", action="store_true",
                        help="compile only each kernel's largest tiles per dtype (where shared memory and spills bite)")
    parser.add_argument("--kernel", help="compile only this kernel (e.g. _paca_cluster_pool)")
    parser.add_argument("--match", help="compile only configs whose description contains this text")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--ptx-dir", help="write each compiled PTX here (for an independent ptxas -v)")
    parser.add_argument("--readme", help="write the per-kernel summary into this file's compile-check block")
    parser.add_argument("--count", action="store_true",
                        help="print how many compiles the selection takes per arch and stop (compiles nothing)")
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
    if args.jobs < 1:
        print(f"compile_check: --jobs {args.jobs} must be at least 1.", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: TRITON_INTERPRET=1 is set; run it with TRITON_INTERPRET=0 (it compiles for GPUs).",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="gift-compile-check-"))
    jobs, failures = [], []
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
        jobs += [(asdict(s), arch) for s in specs]
    if args.count:
        print(f"{len(jobs)} compiles in all")
        return 0
    for arch in archs:
        wrong = prove_spill_gate(arch)
        if wrong:
            print("compile_check: the spill gate failed its own proof:\n  " + "\n  ".join(wrong), file=sys.stderr)
            return 1
    print(f"spill gate proven on {', '.join(archs)}: a kernel built to spill is flagged, a clean one passes")
    print(f"{'kernel':<26} {'config':<78} {'regs':>5} {'stack':>6} {'shared':>7} {'/SM':>3} {'sec':>6}  "
          f"(* at the register cap)", flush=True)
    results: list[CompileResult | None] = [None] * len(jobs)
    reuse_dir = tempfile.mkdtemp(prefix="gift-compile-check-ptx-")

    def on_result(i, row):
        r = results[i] = CompileResult(**row)
        print(_row(r, r.problems(ARCH_PROPS[r.arch].shared_bytes)), flush=True)

    if args.ptx_dir:
        os.makedirs(args.ptx_dir, exist_ok=True)
    try:
        run_compiles(jobs, args.jobs, reuse_dir, args.ptx_dir, on_result)
    finally:
        shutil.rmtree(reuse_dir, ignore_errors=True)
    slow = [i for i, r in enumerate(results) if r.error is None and r.seconds > COMPILE_SECONDS_LIMIT]
    if slow:
        print(f"re-timing {len(slow)} compiles over {COMPILE_SECONDS_LIMIT:.0f} s alone (no PTX reuse)", flush=True)
    for i in slow:
        spec, arch = jobs[i]
        again = CompileResult(**compile_one(spec, arch))
        results[i].seconds_alone = again.seconds
        print(_row(results[i], results[i].problems(ARCH_PROPS[arch].shared_bytes)) + " [alone]", flush=True)
    for r in results:
        failures += [f"{r.arch} {r.kernel} [{r.config}] ({r.example}): {p}"
                     for p in r.problems(ARCH_PROPS[r.arch].shared_bytes)]
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
        ptxas_runs = sum(1 for r in results if not r.ptx_reused and r.error is None)
        body = (f"Produced by `{command}` on {selection}: {len(results)} compiles ({ptxas_runs} distinct PTX), "
                f"{len(failures)} problems. Registers, stack and spills from ptxas' own `-v` report and "
                f"cuobjdump's STACK/LOCAL of the kernel's Function block; programs per SM from registers, shared "
                f"memory and warps; compile seconds with {args.jobs} compile processes on a shared machine.\n\n"
                + summary_markdown(results))
        write_marked_block(args.readme, README_COMPILE_START, README_COMPILE_END, body)
    if failures:
        print(f"{len(failures)} problems:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
