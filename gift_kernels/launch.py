"""Launch configurations as data: tiles, warps, stages and splits of every Triton kernel, decided by one
pure function per op from the shapes, the dtype and the device's properties.

``GIFT_SM_COUNT=132`` overrides the SM count. Under ``TRITON_INTERPRET=1`` (CPU tensors) the launchers
use small interpreter tiles and one split, unless ``GIFT_SM_COUNT`` is set: then they use exactly the
configuration a CUDA device of that SM count (compute capability 9.0, 227 KiB shared memory per block)
would get, so the tiles and split arithmetic of a real GPU run on CPU (warps and stages mean nothing
to the interpreter).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .dispatch import TRITON_DTYPES

TL_DOT_MIN = 16                  # tl.dot needs every side of both operands >= 16
INTERPRETER_BLOCK = 16           # tile side under the interpreter: small tiles keep it quick
SPLIT_OVERHEAD_BLOCKS = 1        # a split program's fixed work (its tiles in, its partial sums out), in N-blocks
PACA_OPERAND_BYTES = 4           # the PaCa dots take fp32 operands (tf32x3) whatever the inputs' dtype
# N-rows per block of each N-row kernel. Their dots chain (one's result feeds the next), so Triton gives each warp
# whole 16-row slabs of every (rows x M) and (rows x r) tile and every warp the whole second operand of each
# dot: more rows cost registers, more warps do not save them there. These are the largest rows that compile
# without spills at every (M, r) the kernels take (compile_check); the pooling kernel takes its weight as the
# first operand (Wc U^T) and affords 32.
PACA_BLOCK_N = {"_paca_cluster_pool": 32, "_paca_attn_fwd": 16, "_paca_attn_bwd": 16, "_paca_cluster_bwd": 16}
PACA_BWD_MIN_BLOCK_R = 32        # the backward's N-row kernels pad r = 16 to 32: at (M, r) = (64, 16) every tiling
                                 # of `_paca_cluster_bwd` spills, some of `_paca_attn_bwd` do
PACA_SIDE_BLOCK_M = 16           # cluster rows per program of the cluster-side kernels (rows are independent there)
PACA_STAGES = 2                  # software pipelining of the pooling loop over N-blocks
PACA_MAX_BLOCK_M = 64            # padded M at most: (rows x 256) tiles spill in every N-row kernel
PACA_MAX_R = 64                  # padded r at most: the cluster-side kernels' (r x r) weight tiles
PACA_MASKED_SPILL_TILE = 64      # r masked at 64 (r in 33..63) spills on sm_80 (compile_check): `_paca_attn_bwd` at
                                 # 64 x 64 (16-192 B), `_paca_cluster_side_bwd` (fp32, 264 B) whatever M; the cluster-
                                 # side forward with M masked (36-168 B): those shapes take the torch path on a GPU
PACA_SHARED_MARGIN = 0.10        # the estimated shared memory must fit the device's limit with this much to spare
PACA_UNCHECKED_MAJORS = (12,)    # compute capabilities whose compile check still finds spills (sm_120: the backward
                                 # at (M, r) = (64, 32)): the torch path there
PACA_SUM_BLOCK_ROWS = 16         # the final fixed-order sums of partial gradients: rows per step of a program,
PACA_SUM_BLOCK_COLS = 64         # columns per program
PACA_KERNELS = ("_paca_cluster_pool", "_paca_cluster_side_fwd", "_paca_attn_fwd", "_paca_attn_bwd",
                "_paca_cluster_side_bwd", "_paca_cluster_bwd", "_sum_rows")
RESIDUAL_BLOCK_M = 128          # the residual GEMM's tiles by element size, the largest that compile without
RESIDUAL_BLOCK_N = {4: 64, 2: 64}     # spills with every edge masked on sm_80 .. sm_120 (compile_check)
RESIDUAL_BLOCK_K = {4: 16, 2: 64}
RESIDUAL_BLOCK_R = 16            # low-rank columns per step: 32 spills at some shapes, 16 at none
RESIDUAL_WARPS = {4: 8, 2: 8}
RESIDUAL_MAX_STAGES = {4: 2, 2: 3}    # by itemsize; fp32: a third stage spills on sm_120
RESIDUAL_MAX_STAGES_BY_MAJOR = {12: {4: 1}}   # sm_120 fp32: a second stage spills the ragged no-bias GEMM (24 B)
RESIDUAL_GROUP_M = 8             # grouped program order: neighbouring programs share B tiles
TRITON_DEFAULT_WARPS, TRITON_DEFAULT_STAGES = 4, 3   # what Triton gives a launch that names no num_warps / num_stages


def dot_block(n: int) -> int:
    """Smallest power-of-two tile side >= n that tl.dot accepts."""
    return max(TL_DOT_MIN, 1 << max(0, int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class DeviceProps:
    """What a launch configuration depends on: ``interpreter`` True means small interpreter tiles."""

    sm_count: int
    shared_bytes: int                 # shared memory a block may use (opt-in maximum)
    capability: tuple[int, int]
    interpreter: bool = False


ARCH_PROPS = {  # the compile check's targets, with the SM counts of one part each (bundled ptxas accepts all six)
    "sm_80": DeviceProps(sm_count=108, shared_bytes=163 * 1024, capability=(8, 0)),    # A100
    "sm_86": DeviceProps(sm_count=82, shared_bytes=99 * 1024, capability=(8, 6)),      # RTX 3090 (A10: 72)
    "sm_89": DeviceProps(sm_count=128, shared_bytes=99 * 1024, capability=(8, 9)),     # RTX 4090 (L4: 58)
    "sm_90": DeviceProps(sm_count=132, shared_bytes=227 * 1024, capability=(9, 0)),    # H100 / H200 SXM
    "sm_100": DeviceProps(sm_count=148, shared_bytes=227 * 1024, capability=(10, 0)),  # B200
    "sm_120": DeviceProps(sm_count=170, shared_bytes=99 * 1024, capability=(12, 0)),   # RTX 5090
}


@dataclass(frozen=True)
class SMLimits:
    """What bounds the programs resident on one SM (CUDA programming guide, per compute capability)."""

    max_warps: int
    max_programs: int
    shared_bytes: int                 # shared memory of one SM, all its resident programs together
    registers: int = 64 * 1024        # 32-bit registers of one SM


SM_LIMITS = {
    (8, 0): SMLimits(max_warps=64, max_programs=32, shared_bytes=164 * 1024),
    (8, 6): SMLimits(max_warps=48, max_programs=16, shared_bytes=100 * 1024),
    (8, 9): SMLimits(max_warps=48, max_programs=24, shared_bytes=100 * 1024),
    (9, 0): SMLimits(max_warps=64, max_programs=32, shared_bytes=228 * 1024),
    (10, 0): SMLimits(max_warps=64, max_programs=32, shared_bytes=228 * 1024),
    (12, 0): SMLimits(max_warps=48, max_programs=32, shared_bytes=100 * 1024),
}
SM_LIMITS_UNKNOWN = SMLimits(max_warps=48, max_programs=16, shared_bytes=100 * 1024)  # the least of the above
REGISTER_UNIT = 256               # registers are allocated to a warp in units of this many
SHARED_UNIT = 128                 # shared memory is allocated to a program in units of this many bytes
SHARED_RESERVED = 1024            # bytes of shared memory the system reserves per program (compute capability >= 8)
MAX_REGISTERS = 255               # per thread, what ptxas may use at most


def resident_programs(capability: tuple[int, int], num_warps: int, registers: int, shared_bytes: int) -> int:
    """Programs of one kernel resident on an SM at once, from its warps, registers per thread and shared bytes
    (the CUDA occupancy calculator's rule); at least 1 when the program fits at all, else 0."""
    limits = SM_LIMITS.get(tuple(capability), SM_LIMITS_UNKNOWN)
    per_warp = cdiv(max(1, registers) * 32, REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (limits.registers // per_warp) // num_warps
    by_warps = limits.max_warps // num_warps
    shared = cdiv(shared_bytes + SHARED_RESERVED, SHARED_UNIT) * SHARED_UNIT
    by_shared = limits.shared_bytes // shared
    return min(by_registers, by_warps, by_shared, limits.max_programs)
INTERPRETER_PROPS = DeviceProps(sm_count=1, shared_bytes=1 << 30, capability=(0, 0), interpreter=True)
_EMULATED: list[DeviceProps] = []


def sm_count_override() -> int | None:
    value = os.environ.get("GIFT_SM_COUNT", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"GIFT_SM_COUNT={value!r} is not a positive integer SM count; unset it or give e.g. 132.")
    return int(value)


@contextlib.contextmanager
def emulate_device(props: DeviceProps):
    """Within the block, `device_props` returns ``props`` for every device (the compile check uses it)."""
    _EMULATED.append(props)
    try:
        yield props
    finally:
        _EMULATED.pop()


def device_props(device: torch.device) -> DeviceProps:
    """The properties launch configurations are computed from, for tensors on ``device``."""
    if _EMULATED:
        return _EMULATED[-1]
    override = sm_count_override()
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        shared = getattr(p, "shared_memory_per_block_optin", 0) or 48 * 1024
        return DeviceProps(override or p.multi_processor_count, shared, (p.major, p.minor))
    if override is not None:
        return DeviceProps(override, ARCH_PROPS["sm_90"].shared_bytes, ARCH_PROPS["sm_90"].capability)
    return INTERPRETER_PROPS


# input_precision of every fp32 tl.dot: three TF32 tensor-core products (fp32 accuracy). "ieee" lowers to
# scalar FMA loops that ptxas unrolls (minutes of compile at M = r = 64); the interpreter ignores it.
F32_DOT_PRECISION = "tf32x3"


@dataclass(frozen=True)
class KernelLaunch:
    """How one kernel is launched: warps, software-pipelining stages and the register cap ``maxnreg`` per
    thread (ptxas spills rather than exceed it; the compile check fails any spill), which with the warps and
    the estimated shared memory fixes how many programs are resident on an SM (`resident_programs`)."""

    num_warps: int
    num_stages: int
    maxnreg: int | None = None          # None: ptxas' own choice (it may pick fewer registers and spill to fit
                                        # more programs on an SM); MAX_REGISTERS: all ptxas may use

    def options(self) -> dict:
        """The launch options Triton takes (``num_warps``, ``num_stages``, ``maxnreg``)."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages,
                    **({"maxnreg": self.maxnreg} if self.maxnreg else {}))

    def registers(self) -> int:
        """Registers per thread at most: ``maxnreg``, else what ptxas may use at these warps."""
        return min(self.maxnreg or MAX_REGISTERS, MAX_REGISTERS, 64 * 1024 // (32 * self.num_warps))


@dataclass(frozen=True)
class Split:
    """A reduction over ``n_blocks`` N-blocks run by ``splits`` programs per (layer[, head]): split ``s`` handles
    the blocks ``[s * blocks_per_split, min((s + 1) * blocks_per_split, n_blocks))`` (never one past N) and
    writes one row of partial sums, which a fixed-order sum then reduces (deterministic)."""

    n_blocks: int
    splits: int
    blocks_per_split: int

    def ranges(self) -> list[range]:
        """The N-blocks each split's program visits, as the kernels compute them."""
        return [range(s * self.blocks_per_split, min((s + 1) * self.blocks_per_split, self.n_blocks))
                for s in range(self.splits)]


@dataclass(frozen=True)
class PacaLaunch:
    """Launch configuration of the PaCa kernels for tokens (L, N, r), M clusters, ``heads`` heads: tiles
    (``block_ms`` is the cluster rows of one program of the two cluster-side kernels), the splits of the three
    reductions over N (`Split`) and each kernel's `KernelLaunch` (``kernels``, by kernel name)."""

    block_n: int                # N-rows per block of the attention kernels (forward and backward)
    block_n_pool: int           # of `_paca_cluster_pool`
    block_n_cluster: int        # of `_paca_cluster_bwd`
    block_m: int
    block_r: int
    block_r_bwd: int            # the backward N-row kernels' padded r (PACA_BWD_MIN_BLOCK_R at least)
    block_ms: int
    n_blocks: int               # of block_n rows: the forward attention's programs per layer
    pool: Split                 # `_paca_cluster_pool`: L programs per split
    attn: Split                 # `_paca_attn_bwd`: L * heads programs per split
    cluster: Split              # `_paca_cluster_bwd`: L programs per split
    kernels: dict
    sum_block_rows: int
    sum_block_cols: int

    def launch(self, kernel: str) -> dict:
        """The launch options of ``kernel``."""
        return self.kernels[kernel].options()

    def splits(self) -> dict[str, Split]:
        return {"_paca_cluster_pool": self.pool, "_paca_attn_bwd": self.attn, "_paca_cluster_bwd": self.cluster}


def best_split(n_blocks: int, programs_per_split: int, resident: int, props: DeviceProps) -> Split:
    """The split of a reduction over ``n_blocks`` N-blocks, run by ``programs_per_split`` programs per split, for a
    kernel of which ``resident`` programs fit on one SM at once: the one whose waves of ``resident * sm_count``
    programs take the fewest block-steps, ``waves * (blocks_per_split + SPLIT_OVERHEAD_BLOCKS)`` (the overhead:
    a program's fixed work, loading its tiles and writing its partial sums), the fewest splits on a tie.
    One split under the interpreter or for one block."""
    if props.interpreter or n_blocks <= 1:
        return Split(max(1, n_blocks), 1, max(1, n_blocks))
    wave = max(1, resident) * props.sm_count

    def cost(splits):
        return cdiv(programs_per_split * splits, wave) * (cdiv(n_blocks, splits) + SPLIT_OVERHEAD_BLOCKS), splits

    splits = min(range(1, n_blocks + 1), key=cost)
    per_split = cdiv(n_blocks, splits)
    return Split(n_blocks, cdiv(n_blocks, per_split), per_split)


# Shared memory per block of each PaCa kernel, estimated from its tiles (every dot takes fp32 operands):
#     bytes <= 4 * (a * BLOCK_M * BLOCK_R + b * BLOCK_N * BLOCK_M + c * BLOCK_N * BLOCK_R)
# The two cluster-side kernels take (BLOCK_MS x r) row tiles and (r x r) weights: for them BLOCK_M reads
# BLOCK_MS and BLOCK_N reads BLOCK_R. The (a, b, c) are fitted to the shared bytes `compile_check` measures
# (cuobjdump SHARED, Triton's metadata.shared) over its full shape table on all six targets (1,317 compiles:
# bench/results/compile_check.json), each an upper bound on every measurement without PACA_SHARED_SLACK (the
# pool's refitted there, on a grid of 1/4, for the smallest largest ratio to it; the others were bounds already);
# compile_check fails any compile that needs more than the fit alone, so the slack is a margin for tiles off the
# table. "mma": compute capability 8.x and 12.x
# (A100, A10, RTX 30xx/40xx/50xx, L4: sm_80, sm_86, sm_89 measured, the mma.sync dots; sm_120 takes torch,
# PACA_UNCHECKED_MAJORS); "any": the others
# (sm_90's wgmma and sm_100's tcgen05 dots stage operands differently; sm_90 and sm_100 measured).
PACA_SHARED_FIT = {
    "mma": {
        "_paca_cluster_pool": (3.0, 0.0, 3.0),
        "_paca_cluster_side_fwd": (0.0, 1.25, 0.75),
        "_paca_attn_fwd": (1.0, 0.0, 2.0),
        "_paca_attn_bwd": (5.5, 2.0, 4.0),
        "_paca_cluster_side_bwd": (0.0, 0.0, 0.5),
        "_paca_cluster_bwd": (7.5, 2.0, 4.0),
    },
    "any": {
        "_paca_cluster_pool": (1.0, 0.25, 5.0),
        "_paca_cluster_side_fwd": (0.0, 1.25, 0.75),
        "_paca_attn_fwd": (1.0, 0.0, 2.0),
        "_paca_attn_bwd": (6.25, 2.0, 3.25),
        "_paca_cluster_side_bwd": (0.0, 0.625, 0.375),
        "_paca_cluster_bwd": (7.5, 2.0, 4.0),
    },
}
PACA_SIDE_KERNELS = ("_paca_cluster_side_fwd", "_paca_cluster_side_bwd")
PACA_SHARED_SLACK = 2048         # bytes added to every fitted estimate: a margin for tiles off the fitted table


def paca_kernel_shared_bytes(kernel: str, block_m: int, block_n: int, block_r: int, capability: tuple[int, int],
                             block_ms: int | None = None) -> int | None:
    """Estimated shared bytes per block of PaCa ``kernel`` at these tiles, the fit plus ``PACA_SHARED_SLACK`` (None:
    not a fitted kernel); the cluster-side kernels read ``block_ms`` (their cluster rows per program) and ignore
    BLOCK_N/M."""
    fit = PACA_SHARED_FIT["mma" if capability[0] in (8, 12) else "any"].get(kernel)
    if fit is None:
        return None
    if kernel in PACA_SIDE_KERNELS:
        block_m, block_n = block_ms or block_m, block_r
    a, b, c = fit
    return int(PACA_OPERAND_BYTES * (a * block_m * block_r + b * block_n * block_m + c * block_n * block_r)
               + PACA_SHARED_SLACK)


def paca_shared_bytes(cfg: PacaLaunch, capability: tuple[int, int]) -> dict[str, int]:
    """Per PaCa kernel, its estimated shared bytes per block at the launch configuration ``cfg``."""
    rows = {"_paca_cluster_pool": cfg.block_n_pool, "_paca_cluster_bwd": cfg.block_n_cluster}
    padded_r = {"_paca_attn_bwd": cfg.block_r_bwd, "_paca_cluster_bwd": cfg.block_r_bwd}
    return {k: paca_kernel_shared_bytes(k, cfg.block_m, rows.get(k, cfg.block_n), padded_r.get(k, cfg.block_r),
                                        capability, cfg.block_ms)
            for k in PACA_SHARED_FIT["any"]}


def paca_triton_unsupported(M: int, r: int, dtype: torch.dtype = torch.float32,
                            props: DeviceProps | None = None) -> str | None:
    """Why the Triton PaCa kernels cannot take M clusters at rank r in ``dtype`` on a device with ``props``
    (None: they can; ``props`` None or the interpreter's: the tile limits only). The estimated shared memory
    must fit the device's per-block limit with ``PACA_SHARED_MARGIN`` to spare."""
    if dot_block(M) > PACA_MAX_BLOCK_M or dot_block(r) > PACA_MAX_R:
        return (f"the Triton PaCa kernels take M <= {PACA_MAX_BLOCK_M} clusters and r <= {PACA_MAX_R} (padded to "
                f"powers of two), and M={M}, r={r} pads to {dot_block(M)} x {dot_block(r)}")
    if props is None or props.interpreter or dtype not in TRITON_DTYPES:
        return None
    if props.capability[0] in PACA_UNCHECKED_MAJORS:
        major, minor = props.capability
        return (f"the Triton PaCa kernels do not yet compile without spills for compute capability {major}.x "
                f"(this GPU: {major}.{minor}; see python -m gift_kernels.dev.compile_check --arch sm_{major}0)")
    tile = PACA_MASKED_SPILL_TILE
    if dot_block(r) == tile and r % tile:
        return (f"the Triton PaCa kernels spill registers when r is masked at their largest tiles (M={M}, r={r}: r "
                f"pads to {tile}; see python -m gift_kernels.dev.compile_check); r={tile} or r <= 32 avoids it")
    need = paca_shared_bytes(paca_launch(1, 1, M, r, 1, dtype, props), props.capability)
    kernel = max(need, key=need.get)
    allowed = int(props.shared_bytes / (1 + PACA_SHARED_MARGIN))
    if need[kernel] > allowed:
        major, minor = props.capability
        return (f"the Triton PaCa kernels need about {need[kernel]} B of shared memory per block ({kernel} at M={M}, "
                f"r={r}, {str(dtype).replace('torch.', '')}) and this GPU (compute capability {major}.{minor}) "
                f"allows {props.shared_bytes} B, {allowed} B with a {PACA_SHARED_MARGIN:.0%} margin")
    return None


def _paca_kernel_launches(props: DeviceProps) -> dict[str, KernelLaunch]:
    """Warps and stages of each PaCa kernel (the same for every input dtype: the dots take fp32 operands): 8 warps
    where the accumulators are (M x r) tiles split between them (pooling, the backward) and in the cluster-side
    forward (at 4, its M- and r-masked (16 x 64) tiles spill 48-56 B in fp32 on sm_80), one stage where a loop
    carries no loads to overlap (a head loop) or its buffers would cost registers (compile_check)."""
    if props.interpreter:
        return {k: KernelLaunch(1, 1) for k in PACA_KERNELS}
    cap = MAX_REGISTERS  # named: left to itself, ptxas may cap registers for occupancy and spill a few bytes
    return {
        "_paca_cluster_pool": KernelLaunch(8, PACA_STAGES, cap),
        "_paca_cluster_side_fwd": KernelLaunch(8, 1, cap),
        "_paca_attn_fwd": KernelLaunch(4, 1, cap),
        "_paca_attn_bwd": KernelLaunch(8, 1, cap),
        "_paca_cluster_side_bwd": KernelLaunch(8, 1, cap),
        "_paca_cluster_bwd": KernelLaunch(8, 1, cap),
        "_sum_rows": KernelLaunch(4, PACA_STAGES, cap),
    }


def paca_launch(L: int, N: int, M: int, r: int, heads: int, dtype: torch.dtype, props: DeviceProps) -> PacaLaunch:
    """The launch configuration of the PaCa kernels for tokens (L, N, r) in ``dtype``, M clusters, ``heads`` heads
    on a device with ``props``: tiles, the splits of the reductions over N from the kernels' residency
    (`resident_programs` of their warps, register cap and estimated shared memory), warps and stages."""
    block_m, block_r = dot_block(M), dot_block(r)
    rows = {k: INTERPRETER_BLOCK if props.interpreter else n for k, n in PACA_BLOCK_N.items()}
    block_r_bwd = max(block_r, PACA_BWD_MIN_BLOCK_R)
    block_ms = min(block_m, PACA_SIDE_BLOCK_M)
    kernels = _paca_kernel_launches(props)

    def split(kernel, programs_per_split, kernel_block_r=block_r):
        shared = paca_kernel_shared_bytes(kernel, block_m, rows[kernel], kernel_block_r, props.capability, block_ms)
        k = kernels[kernel]
        return best_split(cdiv(N, rows[kernel]), programs_per_split,
                          resident_programs(props.capability, k.num_warps, k.registers(), shared), props)

    return PacaLaunch(block_n=rows["_paca_attn_fwd"], block_n_pool=rows["_paca_cluster_pool"],
                      block_n_cluster=rows["_paca_cluster_bwd"], block_m=block_m, block_r=block_r,
                      block_r_bwd=block_r_bwd, block_ms=block_ms, n_blocks=cdiv(N, rows["_paca_attn_fwd"]),
                      pool=split("_paca_cluster_pool", L), attn=split("_paca_attn_bwd", L * heads, block_r_bwd),
                      cluster=split("_paca_cluster_bwd", L, block_r_bwd), kernels=kernels,
                      sum_block_rows=INTERPRETER_BLOCK if props.interpreter else PACA_SUM_BLOCK_ROWS,
                      sum_block_cols=INTERPRETER_BLOCK if props.interpreter else PACA_SUM_BLOCK_COLS)


@dataclass(frozen=True)
class ResidualLaunch:
    """Launch configuration of the GEMM with low-rank epilogue ``(M, K) @ (K, N) + (M, R) @ (N, R)^T``;
    ``block_r`` is the low-rank term's columns per step."""

    block_m: int
    block_n: int
    block_k: int
    block_r: int
    group_m: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None


INDEX_LIMIT = 2 ** 31            # elements: a tensor this large or larger is not handed to the Triton kernels


def _index_limit_reason(kernels: str, sizes: dict[str, int], shape: str) -> str | None:
    """The refusal naming the largest of ``sizes`` (elements by tensor name) at ``INDEX_LIMIT`` or more, else None."""
    big = {k: v for k, v in sizes.items() if v >= INDEX_LIMIT}
    if not big:
        return None
    name, size = max(big.items(), key=lambda kv: kv[1])
    return f"the Triton {kernels} take{'s' if kernels.endswith('GEMM') else ''} tensors of fewer than 2^31 " \
           f"elements, and {name} has {size} ({shape})"


def residual_triton_unsupported(M: int, K: int, N: int, R: int) -> str | None:
    """Why the Triton residual GEMM ``(M, K) @ (K, N) + (M, R) @ (N, R)^T`` refuses these sizes (None: it takes
    them): an operand or the output of ``INDEX_LIMIT`` (2^31) elements or more. Its offsets are 64-bit, but no
    test reaches that size, so such calls take the torch path."""
    return _index_limit_reason("residual GEMM", {"x": M * K, "the output": M * N, "W": K * N, "x psi": M * R},
                               f"{M} rows, d_in {K}, d_out {N}, r {R}")


def paca_triton_index_unsupported(L: int, N: int, r: int, heads: int) -> str | None:
    """Why the Triton PaCa kernels refuse tokens (L, N, r) with ``heads`` heads (None: they take them): a tensor of
    ``INDEX_LIMIT`` (2^31) elements or more (the tokens, or the backward's per-head (L h, N, r) buffer), or one
    layer's ``N x r`` past the 32-bit offsets the kernels use inside a layer."""
    sizes = {"one layer's tokens (N x r)": N * r, "the tokens (L x N x r)": L * N * r,
             "the backward's per-head buffer (L x heads x N x r)": L * heads * N * r}
    reason = _index_limit_reason("PaCa kernels", sizes, f"L {L}, N {N}, r {r}, heads {heads}")
    return reason and reason + "; split the layers or tokens into smaller calls"


def residual_launch(M: int, N: int, K: int, R: int, dtype: torch.dtype, props: DeviceProps) -> ResidualLaunch:
    if props.interpreter:
        return ResidualLaunch(INTERPRETER_BLOCK, INTERPRETER_BLOCK, INTERPRETER_BLOCK, RESIDUAL_BLOCK_R, 4, 1, 1)
    size = dtype.itemsize
    bm, bn, bk = RESIDUAL_BLOCK_M, RESIDUAL_BLOCK_N[size], RESIDUAL_BLOCK_K[size]
    per_stage = (bm * bk + bk * bn) * size
    most = RESIDUAL_MAX_STAGES_BY_MAJOR.get(props.capability[0], {}).get(size, RESIDUAL_MAX_STAGES[size])
    stages = max(1, min(most, props.shared_bytes // per_stage))
    return ResidualLaunch(bm, bn, bk, RESIDUAL_BLOCK_R, RESIDUAL_GROUP_M, RESIDUAL_WARPS[size], stages, MAX_REGISTERS)
