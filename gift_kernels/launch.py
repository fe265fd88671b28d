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
PROGRAMS_PER_SM = 2              # split the N-reductions until about this many programs per SM
PACA_BLOCK_N_MAX = 64            # PaCa rows per program, at most
PACA_ROW_TILE_BYTES = 16 * 1024  # most bytes of one program's (BLOCK_N x (M + r)) row tiles, in the dots' operand
                                 # dtype: fp32 (64, 64) gets BLOCK_N = 32, 16-bit 64 (shared memory, compile_check)
PACA_STAGES = 2                  # software pipelining of the loops over N-blocks (16-bit backward, forward)
PACA_STAGES_BWD_FP32 = 1         # fp32 backward: no double-buffered row tiles (A100 shared memory)
PACA_STAGES_CLUSTER = 1          # the cluster-side loop over heads: no double-buffered (r x r) weights
PACA_MAX_TILE = 64 * 64          # most elements of the padded (M x r) tiles a PaCa program holds: larger ones
                                 # overflow an A100's shared memory in the backward (see compile_check)
PACA_MAX_R = 64                  # padded r at most: the cluster-side backward's (r x r) tiles at r = 128 take
                                 # over 60 s in ptxas for sm_80
PACA_SUM_BLOCK = 1024            # elements per program of the final fixed-order sums of partial gradients
PACA_WARPS_FWD = 4
PACA_WARPS_BWD = 8               # backward holds two (M x r) accumulators beside its (BLOCK_N x M) tiles
RESIDUAL_BLOCK_M = 128
RESIDUAL_BLOCK_N = {4: 64, 2: 128}     # by element size: fp32 tiles are half as wide
RESIDUAL_BLOCK_K = {4: 32, 2: 64}
RESIDUAL_WARPS = {4: 4, 2: 8}
RESIDUAL_GROUP_M = 8             # grouped program order: neighbouring programs share B tiles
MAX_STAGES = 3
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


ARCH_PROPS = {  # the compile check's targets; SM counts of the A100, RTX 3090 (A10, RTX 4090, L4: 99 KiB too), H100
    "sm_80": DeviceProps(sm_count=108, shared_bytes=163 * 1024, capability=(8, 0)),
    "sm_86": DeviceProps(sm_count=82, shared_bytes=99 * 1024, capability=(8, 6)),
    "sm_90": DeviceProps(sm_count=132, shared_bytes=227 * 1024, capability=(9, 0)),
}
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
class PacaLaunch:
    """Launch configuration of the PaCa kernels for tokens (L, N, r), M clusters, ``heads`` heads.

    The backward kernels reduce over N in ``splits`` programs per (layer[, head]); split ``s`` handles the
    N-blocks ``[s * blocks_per_split, min((s + 1) * blocks_per_split, n_blocks))`` (never one past N)."""

    block_n: int
    block_m: int
    block_r: int
    n_blocks: int
    splits: int
    blocks_per_split: int
    num_warps_fwd: int
    num_warps_bwd: int
    num_stages: int
    num_stages_bwd: int
    num_stages_cluster: int
    block_sum: int

    def split_ranges(self) -> list[range]:
        """The N-blocks each split's program visits, as the kernels compute them."""
        return [range(s * self.blocks_per_split, min((s + 1) * self.blocks_per_split, self.n_blocks))
                for s in range(self.splits)]


def split_blocks(n_blocks: int, programs_per_split: int, props: DeviceProps) -> tuple[int, int]:
    """``(splits, blocks_per_split)`` for a reduction over ``n_blocks`` blocks run by ``programs_per_split``
    programs per split: about PROGRAMS_PER_SM programs per SM, and no split without a block."""
    if props.interpreter or n_blocks <= 1:
        return 1, max(1, n_blocks)
    wanted = cdiv(PROGRAMS_PER_SM * props.sm_count, programs_per_split)
    splits = max(1, min(n_blocks, wanted))
    blocks_per_split = cdiv(n_blocks, splits)
    return cdiv(n_blocks, blocks_per_split), blocks_per_split


# Shared memory per block of each PaCa kernel, estimated from its tiles:
#     bytes <= size * (a * BLOCK_M * BLOCK_R + b * BLOCK_N * BLOCK_M + c * BLOCK_N * BLOCK_R)
# with ``size`` the dots' operand bytes (fp32 always for `_paca_cluster_side_bwd`, whose (r x r) weight tiles
# stand in for the (BLOCK_N x ...) row tiles: there BLOCK_N reads BLOCK_R). The (a, b, c) are fitted to the
# shared bytes `compile_check` measures (cuobjdump SHARED, Triton's metadata.shared) over its shape table,
# each at or above every measurement; compile_check fails any compile that needs more than this estimate.
# "mma": compute capability 8.x (A100, A10, RTX 30xx/40xx, L4: sm_80 and sm_86 measured); "any": others
# (sm_90's wgmma dots stage more operands in shared memory; fitted to all measured archs).
PACA_SHARED_FIT = {
    "mma": {
        "_paca_cluster_fwd": {4: (0.5, 1.5, 3.5), 2: (0.0, 1.0, 1.0)},
        "_paca_attn_fwd": {4: (4.0, 0.0, 2.5), 2: (4.5, 0.0, 1.0)},
        "_paca_attn_bwd": {4: (7.5, 1.0, 3.0), 2: (4.5, 1.5, 2.5)},
        "_paca_cluster_side_bwd": {4: (0.0, 6.0, 0.0)},
        "_paca_cluster_bwd": {4: (6.25, 3.625, 4.0), 2: (4.5, 1.5, 1.5)},
    },
    "any": {
        "_paca_cluster_fwd": {4: (0.5, 1.5, 3.5), 2: (0.0, 1.0, 3.0)},
        "_paca_attn_fwd": {4: (4.0, 0.0, 2.5), 2: (5.0, 0.0, 1.0)},
        "_paca_attn_bwd": {4: (7.5, 1.5, 3.0), 2: (4.5, 1.5, 2.5)},
        "_paca_cluster_side_bwd": {4: (0.0, 9.0, 0.0)},
        "_paca_cluster_bwd": {4: (6.25, 3.625, 4.0), 2: (4.5, 1.5, 2.0)},
    },
}


def paca_kernel_shared_bytes(kernel: str, block_m: int, block_n: int, block_r: int, operand_bytes: int,
                             capability: tuple[int, int]) -> int | None:
    """Estimated shared bytes per block of PaCa ``kernel`` at these tiles (None: not a fitted kernel)."""
    fit = PACA_SHARED_FIT["mma" if capability[0] == 8 else "any"].get(kernel)
    if fit is None:
        return None
    if kernel == "_paca_cluster_side_bwd":
        operand_bytes, block_n = 4, block_r
    a, b, c = fit[2 if operand_bytes <= 2 else 4]
    return int(operand_bytes * (a * block_m * block_r + b * block_n * block_m + c * block_n * block_r))


def paca_shared_bytes(cfg: PacaLaunch, dtype: torch.dtype, capability: tuple[int, int]) -> dict[str, int]:
    """Per PaCa kernel, its estimated shared bytes per block at the launch configuration ``cfg``."""
    return {k: paca_kernel_shared_bytes(k, cfg.block_m, cfg.block_n, cfg.block_r, dtype.itemsize, capability)
            for k in PACA_SHARED_FIT["any"]}


def paca_triton_unsupported(M: int, r: int, dtype: torch.dtype = torch.float32,
                            props: DeviceProps | None = None) -> str | None:
    """Why the Triton PaCa kernels cannot take M clusters at rank r in ``dtype`` on a device with ``props``
    (None: they can; ``props`` None or the interpreter's: the tile limits only)."""
    if dot_block(M) * dot_block(r) > PACA_MAX_TILE or dot_block(r) > PACA_MAX_R:
        return (f"the Triton PaCa kernels hold (M x r) tiles of at most {PACA_MAX_TILE} elements with r <= "
                f"{PACA_MAX_R}, and M={M}, r={r} pads to {dot_block(M)} x {dot_block(r)}")
    if props is None or props.interpreter or dtype not in TRITON_DTYPES:
        return None
    need = paca_shared_bytes(paca_launch(1, 1, M, r, 1, dtype, props), dtype, props.capability)
    kernel = max(need, key=need.get)
    if need[kernel] > props.shared_bytes:
        major, minor = props.capability
        return (f"the Triton PaCa kernels need about {need[kernel]} B of shared memory per block ({kernel} at M={M}, "
                f"r={r}, {str(dtype).replace('torch.', '')}) and this GPU (compute capability {major}.{minor}) "
                f"allows {props.shared_bytes} B")
    return None


def paca_launch(L: int, N: int, M: int, r: int, heads: int, dtype: torch.dtype, props: DeviceProps) -> PacaLaunch:
    block_m, block_r = dot_block(M), dot_block(r)
    operand_bytes = dtype.itemsize
    if props.interpreter:
        block_n = INTERPRETER_BLOCK
    else:
        block_n = PACA_BLOCK_N_MAX
        while block_n > TL_DOT_MIN and block_n * (block_m + block_r) * operand_bytes > PACA_ROW_TILE_BYTES:
            block_n //= 2
    n_blocks = cdiv(N, block_n)
    splits, per_split = split_blocks(n_blocks, L * heads, props)
    stages = 1 if props.interpreter else PACA_STAGES
    stages_bwd = PACA_STAGES_BWD_FP32 if dtype == torch.float32 and not props.interpreter else stages
    return PacaLaunch(block_n=block_n, block_m=block_m, block_r=block_r, n_blocks=n_blocks, splits=splits,
                      blocks_per_split=per_split,
                      num_warps_fwd=1 if props.interpreter else PACA_WARPS_FWD,
                      num_warps_bwd=1 if props.interpreter else PACA_WARPS_BWD,
                      num_stages=stages,
                      num_stages_bwd=stages_bwd,
                      num_stages_cluster=1 if props.interpreter else PACA_STAGES_CLUSTER,
                      block_sum=INTERPRETER_BLOCK * 16 if props.interpreter else PACA_SUM_BLOCK)


@dataclass(frozen=True)
class ResidualLaunch:
    """Launch configuration of the GEMM with low-rank epilogue ``(M, K) @ (K, N) + (M, R) @ (N, R)^T``."""

    block_m: int
    block_n: int
    block_k: int
    block_r: int
    group_m: int
    num_warps: int
    num_stages: int


def residual_launch(M: int, N: int, K: int, R: int, dtype: torch.dtype, props: DeviceProps) -> ResidualLaunch:
    block_r = dot_block(R)
    if props.interpreter:
        return ResidualLaunch(INTERPRETER_BLOCK, INTERPRETER_BLOCK, INTERPRETER_BLOCK, block_r, 4, 1, 1)
    size = dtype.itemsize
    bm, bn, bk = RESIDUAL_BLOCK_M, RESIDUAL_BLOCK_N[size], RESIDUAL_BLOCK_K[size]
    per_stage = (bm * bk + bk * bn) * size
    epilogue = (bm + bn) * block_r * size
    stages = max(1, min(MAX_STAGES, (props.shared_bytes - epilogue) // per_stage))
    return ResidualLaunch(bm, bn, bk, block_r, RESIDUAL_GROUP_M, RESIDUAL_WARPS[size], stages)
