"""Triton kernels for `paca_attention` (sigmoid or softmax assignment), forward and backward.

Launches (per call, all L layers at once):
  forward   1. `_paca_cluster_pool`: programs over (layer, split of N): the split's part of the pooled cluster
               tokens C^T U (sigmoid, or an online softmax over the split's tokens with its running max and sum).
            2. `_paca_cluster_side_fwd`: programs over (layer, block of clusters): the parts combined in split order
               (flash-decoding style), Z = l2(P), and the folded cluster keys Kq, biases cq and values Vp
               (`paca_math.cluster_side`).
            3. `_paca_attn_fwd`: programs over (layer, block of N rows): logits U Kq^T + cq, softmax over the
               M clusters on chip, A Vp + bp + T in the epilogue; the fp32 log-sum-exp is saved.
  backward  4. `_paca_attn_bwd`: programs over (layer x head, split of N): probabilities recomputed from the
               log-sum-exp; dU (attention path) per row and head, per-split partial sums of dVp, dKq, dcq.
            5. `_paca_cluster_side_bwd`: programs over (layer, block of clusters, keys or values): the split
               partials summed in split order, the cluster-side backward to dK or dV and its part of dZ, and the
               block's partial gradients of Wq, bq, Wk, bk or of Wv, bv, Wp.
            6. `_paca_cluster_bwd`: programs over (layer, split of N): dP (the l2 backward of dZ), dU summed over
               heads, dC = U dP^T, the sigmoid/softmax backward, dU (cluster path), the l2 backward to dT, partials
               of dWc, dbc, dbp.
            7-8. `_sum_rows` twice: the partial gradients summed in a fixed order, written in the parameters' dtype.
Every reduction over N is a fixed-order loop or a fixed-order sum of per-split partials: no atomics, so two
runs give bitwise equal results (on one device model: the splits depend on its SM count). Tiles, warps and
splits: `launch.paca_launch`. Every dot takes fp32 operands at ``input_precision=F32_DOT`` (tf32x3: three TF32
tensor-core products, fp32 accuracy), 16-bit inputs included, which are loaded as they are and computed in fp32
like the torch path computes them (no 1/N and no O(1/N) gradient is ever rounded to 16 bits). Offsets from a
layer's base are 64-bit; within a layer they stay below N * r.

Layout (Liger-Kernel's): the kernels; the launchers `paca_triton_forward` and `paca_triton_backward`, which
take contiguous tensors; the autograd Function `PacaAttentionTriton`, which makes its tensors contiguous in
both directions (`ensure_contiguous`) and keeps the launch configuration on ``ctx``.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .launch import F32_DOT_PRECISION, PacaLaunch, device_props, paca_launch
from .paca_math import EPS, PacaParams

_EPS = tl.constexpr(EPS)  # `paca_math.EPS`, as a constant the kernels can read

# masks only where a length is not a multiple of its block (N, M) or not a power of two (r)
_EVEN_M_R = {
    "EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0,
    "EVEN_R": lambda a: a["R"] == a["BLOCK_R"],
}
_even_sizes = triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0, **_EVEN_M_R})
# the cluster-side kernels: blocks of BLOCK_MS cluster rows
_even_side = triton.heuristics({"EVEN_M": lambda a: a["M"] % a["BLOCK_MS"] == 0,
                                "EVEN_R": lambda a: a["R"] == a["BLOCK_R"]})


@triton.jit
def _dot(a, b, F32_DOT: tl.constexpr):
    """``a @ b`` of fp32 operands, accumulated in fp32, at ``input_precision=F32_DOT`` (see
    `launch.F32_DOT_PRECISION`), whatever the inputs' dtype: 16-bit inputs are loaded as they are and computed
    in fp32, like the torch path computes them."""
    return tl.dot(a, b, input_precision=F32_DOT)


@triton.jit
def _load_rows(ptr, offs_n, offs_r, N, R, stride_n, EVEN_N: tl.constexpr, EVEN_R: tl.constexpr):
    ptrs = ptr + offs_n[:, None] * stride_n + offs_r[None, :]
    if EVEN_N and EVEN_R:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store_rows(ptr, x, offs_n, offs_r, N, R, stride_n, EVEN_N: tl.constexpr, EVEN_R: tl.constexpr):
    ptrs = ptr + offs_n[:, None] * stride_n + offs_r[None, :]
    if EVEN_N and EVEN_R:
        tl.store(ptrs, x.to(ptr.dtype.element_ty))
    else:
        tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_r[None, :] < R))


@triton.jit
def _l2_rows(t):
    """Rows of ``t`` divided by ``max(||row||, EPS)``, and the row norms (`paca_math.l2`)."""
    norm = tl.sqrt(tl.sum(t * t, axis=1))
    return t / tl.maximum(norm, _EPS)[:, None], norm


@triton.jit
def _l2_rows_backward(grad, y, norm):
    """Gradient through ``y = x / max(||x||, EPS)`` per row, given y and ``||x||`` (`paca_math.l2_backward`)."""
    dot = tl.sum(grad * y, axis=1) * (norm >= _EPS).to(tl.float32)
    return (grad - y * dot[:, None]) / tl.maximum(norm, _EPS)[:, None]


@triton.jit
def _linear_rows(x, W, B, offs_r, R, F32_DOT: tl.constexpr, EVEN_R: tl.constexpr):
    """``x W^T + b`` in fp32 for an (r x r) weight ``W`` (out, in) and its bias ``B`` (r,)."""
    b = tl.load(B + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    return _dot(x, tl.trans(_load_rows(W, offs_r, offs_r, R, R, R, EVEN_R, EVEN_R)), F32_DOT) + b[None, :]


@_even_sizes
@triton.jit(do_not_specialize=["n_blocks", "blocks_per_split"])
def _paca_cluster_pool(T, Wc, Bc, POOL_PART, MAX_PART, SUM_PART, N, M, R, n_blocks, blocks_per_split,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                       F32_DOT: tl.constexpr, SOFTMAX: tl.constexpr,
                       EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_R: tl.constexpr):
    """Programs over (layer, split of N), all M clusters each (BLOCK_M >= M): the split's part of the pooled
    cluster tokens ``C^T U``, row ``split * L + layer`` of ``POOL_PART`` (M x r, fp32). Sigmoid: C is the
    sigmoid itself (the 1/N is applied in fp32 when the parts are combined); ``SOFTMAX``: an online softmax over
    the split's tokens, ``exp(logits - max)``, with its running max and sum per cluster in MAX_PART / SUM_PART.
    The logits are computed transposed, (BLOCK_M x BLOCK_N) = Wc U^T, so that the weight, the one tile every
    step reuses, is the dot's first operand (split between the warps), not its second (held whole by each)."""
    layer = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    wc = _load_rows(Wc, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)                  # (BLOCK_M, R)
    bc = tl.load(Bc + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)
    pooled = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)      # softmax: running max and sum over N
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_layer = T + layer.to(tl.int64) * N * R
    first = split * blocks_per_split                    # blocks [first, last): never one past N
    for block in range(first, tl.minimum(first + blocks_per_split, n_blocks)):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        u, _ = _l2_rows(_load_rows(t_layer, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R))
        logits = _dot(wc, tl.trans(u), F32_DOT) + bc[:, None]                     # (BLOCK_M, BLOCK_N)
        if SOFTMAX:
            if not EVEN_N:
                logits = tl.where(offs_n[None, :] < N, logits, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            c = tl.exp(logits - new_max[:, None])
            rescale = tl.exp(run_max - new_max)
            run_sum = run_sum * rescale + tl.sum(c, axis=1)
            pooled = pooled * rescale[:, None]
            run_max = new_max
        else:
            c = tl.sigmoid(logits)
            if not EVEN_N:
                c = tl.where(offs_n[None, :] < N, c, 0.0)
        pooled += _dot(c, u, F32_DOT)
    part = split * tl.num_programs(0) + layer
    _store_rows(POOL_PART + part * M * R, pooled, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    if SOFTMAX:
        tl.store(MAX_PART + part * M + offs_m, run_max, mask=offs_m < M)
        tl.store(SUM_PART + part * M + offs_m, run_sum, mask=offs_m < M)


@_even_side
@triton.jit(do_not_specialize=["L", "H", "D", "splits"])
def _paca_cluster_side_fwd(POOL_PART, MAX_PART, SUM_PART, Wq, Bq, Wk, Bk, Wv, Bv, Wp, Z, PNORM, LSE_C, KQ, CQ, VP,
                           L, M, R, H, D, inv_n, scale, splits,
                           BLOCK_MS: tl.constexpr, BLOCK_R: tl.constexpr, F32_DOT: tl.constexpr,
                           SOFTMAX: tl.constexpr, EVEN_M: tl.constexpr, EVEN_R: tl.constexpr):
    """Programs over (layer, block of BLOCK_MS clusters): the split parts of `_paca_cluster_pool` combined in split
    order (softmax: rescaled to the largest running max, flash-decoding style), P = C^T U, Z = l2(P), then the
    cluster side in fp32 (`paca_math.cluster_side`): K, V and per head the folded keys Kq, biases cq and values Vp.
    Every cluster row is independent; each (r x r) weight is loaded right before its one dot."""
    layer = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_MS + tl.arange(0, BLOCK_MS)
    offs_r = tl.arange(0, BLOCK_R)
    pooled = tl.zeros((BLOCK_MS, BLOCK_R), dtype=tl.float32)
    if SOFTMAX:
        top = tl.full((BLOCK_MS,), float("-inf"), dtype=tl.float32)
        for s in range(0, splits):
            top = tl.maximum(top, tl.load(MAX_PART + (s * L + layer) * M + offs_m, mask=offs_m < M, other=0.0))
        total = tl.zeros((BLOCK_MS,), dtype=tl.float32)
        for s in range(0, splits):                                         # fixed order: deterministic
            part = s * L + layer
            weight = tl.exp(tl.load(MAX_PART + part * M + offs_m, mask=offs_m < M, other=0.0) - top)
            total += weight * tl.load(SUM_PART + part * M + offs_m, mask=offs_m < M, other=1.0)
            pooled += weight[:, None] * _load_rows(POOL_PART + part * M * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
        pooled = pooled / total[:, None]
        tl.store(LSE_C + layer * M + offs_m, top + tl.log(total), mask=offs_m < M)
    else:
        for s in range(0, splits):
            pooled += _load_rows(POOL_PART + (s * L + layer) * M * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
        pooled = pooled * inv_n
    z, pnorm = _l2_rows(pooled)
    _store_rows(Z + layer * M * R, z, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    tl.store(PNORM + layer * M + offs_m, pnorm, mask=offs_m < M)
    offs_rr = tl.arange(0, BLOCK_R)
    k = _linear_rows(z, Wk, Bk, offs_r, R, F32_DOT, EVEN_R)
    bq = tl.load(Bq + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    for j in range(0, H):          # a loop (H is a runtime argument): code size does not grow with H
        kj = tl.where(((offs_r >= j * D) & (offs_r < (j + 1) * D))[None, :], k, 0.0)
        wq = _load_rows(Wq, offs_rr, offs_r, R, R, R, EVEN_R, EVEN_R)             # (out, in)
        base = (layer * H + j) * M
        _store_rows(KQ + base * R, _dot(kj, wq, F32_DOT) * scale, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
        tl.store(CQ + base + offs_m, tl.sum(kj * bq[None, :], axis=1) * scale, mask=offs_m < M)
    v = _linear_rows(z, Wv, Bv, offs_r, R, F32_DOT, EVEN_R)
    for j in range(0, H):
        vj = tl.where(((offs_r >= j * D) & (offs_r < (j + 1) * D))[None, :], v, 0.0)
        wp = _load_rows(Wp, offs_rr, offs_r, R, R, R, EVEN_R, EVEN_R)
        base = (layer * H + j) * M
        _store_rows(VP + base * R, _dot(vj, tl.trans(wp), F32_DOT), offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)


@triton.jit
def _head_logits(u, kq, cq, offs_m, M, F32_DOT: tl.constexpr, EVEN_M: tl.constexpr):
    logits = _dot(u, tl.trans(kq), F32_DOT) + cq[None, :]
    if not EVEN_M:
        logits = tl.where(offs_m[None, :] < M, logits, float("-inf"))
    return logits


@_even_sizes
@triton.jit(do_not_specialize=["H"])
def _paca_attn_fwd(T, KQ, CQ, VP, Bp, OUT, LSE, N, M, R, H,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   F32_DOT: tl.constexpr,
                   EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_R: tl.constexpr):
    """Programs over (layer, block of N rows): per head, logits U Kq^T + cq, softmax over the M clusters, A Vp;
    ``OUT = T + sum_j A_j Vp_j + bp``, and the fp32 log-sum-exp per row and head in LSE."""
    layer = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows = layer.to(tl.int64) * N * R
    t = _load_rows(T + rows, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R)
    u, _ = _l2_rows(t)
    bp = tl.load(Bp + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    out = t + bp[None, :]
    for j in range(0, H):
        base = (layer * H + j) * M
        kq = _load_rows(KQ + base * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
        vp = _load_rows(VP + base * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
        cq = tl.load(CQ + base + offs_m, mask=offs_m < M, other=0.0)
        logits = _head_logits(u, kq, cq, offs_m, M, F32_DOT, EVEN_M)
        row_max = tl.max(logits, axis=1)
        e = tl.exp(logits - row_max[:, None])
        row_sum = tl.sum(e, axis=1)
        out += _dot(e / row_sum[:, None], vp, F32_DOT)
        lse_ptrs = LSE + (layer * H + j).to(tl.int64) * N + offs_n
        if EVEN_N:
            tl.store(lse_ptrs, row_max + tl.log(row_sum))
        else:
            tl.store(lse_ptrs, row_max + tl.log(row_sum), mask=offs_n < N)
    _store_rows(OUT + rows, out, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R)


@_even_sizes
@triton.jit(do_not_specialize=["H", "n_blocks", "blocks_per_split"])
def _paca_attn_bwd(T, G, KQ, CQ, VP, LSE, DU, DKQ_PART, DCQ_PART, DVP_PART, N, M, R, H, n_blocks, blocks_per_split,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   F32_DOT: tl.constexpr,
                   EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_R: tl.constexpr):
    """Programs over (layer x head, split of N): the attention probabilities recomputed from the log-sum-exp,
    dU of the attention path per row and head (DU, fp32), and the split's partial sums of dKq, dcq, dVp in row
    ``split * L * H + layer * H + head`` of the three PART buffers."""
    layer_head = tl.program_id(0)          # layer * H + head
    split = tl.program_id(1)
    layer = layer_head // H
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    base = layer_head * M
    rows = layer.to(tl.int64) * N * R
    head_rows = layer_head.to(tl.int64) * N * R
    kq = _load_rows(KQ + base * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    vp = _load_rows(VP + base * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    cq = tl.load(CQ + base + offs_m, mask=offs_m < M, other=0.0)
    dkq = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dvp = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dcq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first = split * blocks_per_split                    # blocks [first, last): never one past N
    for block in range(first, tl.minimum(first + blocks_per_split, n_blocks)):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        u, _ = _l2_rows(_load_rows(T + rows, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R))
        g = _load_rows(G + rows, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R)
        lse = tl.load(LSE + layer_head.to(tl.int64) * N + offs_n, mask=offs_n < N, other=0.0)
        a = tl.exp(_head_logits(u, kq, cq, offs_m, M, F32_DOT, EVEN_M) - lse[:, None])
        # rows renormalised: exp(logits - lse) alone sums to 1 only to ~ulp(lse), and that error lands on the
        # small, cancellation-heavy Q/K gradients (BLOCK_M spans all M, so this is one row sum)
        a = a / tl.sum(a, axis=1)[:, None]
        if not EVEN_N:
            a = tl.where(offs_n[:, None] < N, a, 0.0)
        da = _dot(g, tl.trans(vp), F32_DOT)                                     # (BLOCK_N, M)
        dlogits = a * (da - tl.sum(da * a, axis=1)[:, None])
        dvp += _dot(tl.trans(a), g, F32_DOT)
        dkq += _dot(tl.trans(dlogits), u, F32_DOT)
        dcq += tl.sum(dlogits, axis=0)
        _store_rows(DU + head_rows, _dot(dlogits, kq, F32_DOT), offs_n, offs_r, N, R, R, EVEN_N, EVEN_R)
    part = (split * tl.num_programs(0) + layer_head) * M
    _store_rows(DKQ_PART + part * R, dkq, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    _store_rows(DVP_PART + part * R, dvp, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    tl.store(DCQ_PART + part + offs_m, dcq, mask=offs_m < M)


@_even_side
@triton.jit(do_not_specialize=["L", "H", "D", "splits"])
def _paca_cluster_side_bwd(Z, Wq, Bq, Wk, Wv, Bv, Wp, DKQ_PART, DCQ_PART, DVP_PART, DZ, PART,
                           L, M, R, H, D, scale, splits,
                           BLOCK_MS: tl.constexpr, BLOCK_R: tl.constexpr,
                           EVEN_M: tl.constexpr, EVEN_R: tl.constexpr):
    """Backward of the cluster side (`paca_math.cluster_side_backward`) up to dZ, programs over (layer, block of
    BLOCK_MS clusters, side): side 0 the keys, side 1 the values. Per cluster, the split partials of dKq and dcq
    (keys) or dVp (values) summed in split order, then dK or dV, its part of dZ (``DZ[side]``: `_paca_cluster_bwd`
    adds the two and takes the l2 backward to dP), and the block's partial gradients in row
    ``layer * m_blocks + block`` of ``PART``: ``[dWq | dWk | dWv | dWp (R x R each) | dbq | dbk | dbv (R each)]``,
    keys and values in their own columns.

    The clusters are visited one at a time (a runtime loop): (r x r) matrix-vector products and rank-one updates
    of two (r x r) fp32 accumulators per side, plain fp32 multiply-adds. This side is M rows of work against the
    N-row kernels' N rows; as dots its (r x r) operands would not fit in registers."""
    layer = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_MS
    values = tl.program_id(2) == 1
    offs_o = tl.arange(0, BLOCK_R)                 # rows of the (r x r) tiles: a weight's output features
    offs_i = tl.arange(0, BLOCK_R)                 # columns: its input features
    keep = offs_i < R
    head_o = offs_o // D
    head_i = offs_i // D
    row = PART + (layer * tl.num_programs(1) + tl.program_id(1)) * (4 * R * R + 3 * R)
    dz_side = DZ + tl.program_id(2) * L * M * R
    dw_a = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)      # keys: dWq; values: dWp
    dw_b = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)      # keys: dWk; values: dWv
    db_a = tl.zeros((BLOCK_R,), dtype=tl.float32)              # keys: dbq
    db_b = tl.zeros((BLOCK_R,), dtype=tl.float32)              # keys: dbk; values: dbv
    if values:
        b_side = tl.load(Bv + offs_o, mask=offs_o < R, other=0.0).to(tl.float32)
    else:
        b_side = tl.load(Bq + offs_o, mask=offs_o < R, other=0.0).to(tl.float32)
    for m in range(first, tl.minimum(first + BLOCK_MS, M)):
        z = tl.load(Z + (layer * M + m) * R + offs_i, mask=keep, other=0.0)
        if values:
            wv = _load_rows(Wv, offs_o, offs_i, R, R, R, EVEN_R, EVEN_R)
            v = tl.sum(wv * z[None, :], axis=1) + b_side
            dv = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for j in range(0, H):
                dvp = tl.zeros((BLOCK_R,), dtype=tl.float32)
                for s in range(0, splits):                                 # fixed order: deterministic
                    dvp += tl.load(DVP_PART + ((s * L * H + layer * H + j) * M + m) * R + offs_o, mask=offs_o < R,
                                   other=0.0)
                wp = _load_rows(Wp, offs_o, offs_i, R, R, R, EVEN_R, EVEN_R)
                dv += tl.where(head_i == j, tl.sum(wp * dvp[:, None], axis=0), 0.0)       # dV = dVp Wp_j
                dw_a += dvp[:, None] * tl.where(head_i == j, v, 0.0)[None, :]            # dWp
            dw_b += dv[:, None] * z[None, :]                                             # dWv
            db_b += dv
            dz = tl.sum(wv * dv[:, None], axis=0)                                        # dV Wv
        else:
            wk = _load_rows(Wk, offs_o, offs_i, R, R, R, EVEN_R, EVEN_R)
            # K = Z Wk^T without the key bias: each head's dKq and dcq sum to zero over its clusters (every row of
            # the attention's logit gradient does), so bk adds nothing to dWq, dbq but its cancellation's rounding
            kz = tl.sum(wk * z[None, :], axis=1)
            dk = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for j in range(0, H):
                dkq = tl.zeros((BLOCK_R,), dtype=tl.float32)
                dcq = 0.0
                for s in range(0, splits):                                 # fixed order: deterministic
                    part = (s * L * H + layer * H + j) * M + m
                    dkq += tl.load(DKQ_PART + part * R + offs_i, mask=keep, other=0.0)
                    dcq += tl.load(DCQ_PART + part)
                in_head = head_o == j
                wq = _load_rows(Wq, offs_o, offs_i, R, R, R, EVEN_R, EVEN_R)
                dk += tl.where(in_head, tl.sum(wq * dkq[None, :], axis=1) + b_side * dcq, 0.0)
                kj = tl.where(in_head, kz, 0.0)
                dw_a += kj[:, None] * dkq[None, :]                                       # dWq / scale
                db_a += kj * dcq                                                         # dbq / scale
            dk = dk * scale
            dw_b += dk[:, None] * z[None, :]                                             # dWk
            db_b += dk
            dz = tl.sum(wk * dk[:, None], axis=0)                                        # dK Wk
        tl.store(dz_side + (layer * M + m) * R + offs_i, dz, mask=keep)
    if values:
        _store_rows(row + 3 * R * R, dw_a, offs_o, offs_i, R, R, R, EVEN_R, EVEN_R)
        _store_rows(row + 2 * R * R, dw_b, offs_o, offs_i, R, R, R, EVEN_R, EVEN_R)
        tl.store(row + 4 * R * R + 2 * R + offs_o, db_b, mask=offs_o < R)
    else:
        _store_rows(row, dw_a * scale, offs_o, offs_i, R, R, R, EVEN_R, EVEN_R)
        _store_rows(row + R * R, dw_b, offs_o, offs_i, R, R, R, EVEN_R, EVEN_R)
        tl.store(row + 4 * R * R + offs_o, db_a * scale, mask=offs_o < R)
        tl.store(row + 4 * R * R + R + offs_o, db_b, mask=offs_o < R)


@_even_sizes
@triton.jit(do_not_specialize=["L", "H", "n_blocks", "blocks_per_split"])
def _paca_cluster_bwd(T, G, DU, DZ, Z, PNORM, LSE_C, Wc, Bc, DT_OUT, PART, L, N, M, R, H, inv_sqrt_n, log_n,
                      n_blocks, blocks_per_split, SOFTMAX: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                      F32_DOT: tl.constexpr,
                      EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_R: tl.constexpr):
    """Programs over (layer, split of N): dP, the l2 backward of dZ (``DZ`` holds its key and value parts from
    `_paca_cluster_side_bwd`), then dU summed over heads (``DU`` holds the attention path's dU per head, summed
    here in head order), dC = U dP^T, the sigmoid/softmax backward, dU of the cluster path, the l2 backward to dT,
    and row ``split * L + layer`` of ``PART``: this split's partial sums ``[dWc (M x R) | dbc (M) | dbp (R)]``.

    No operand carries a 1/N: C enters the dots as the sigmoid itself (softmax: N times the softmax, both of
    order 1) and dP as dP / sqrt(N), which has the output gradient's magnitude (||P|| is about 1/sqrt(N)); the
    remaining factors are applied to the fp32 results."""
    layer = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows = layer.to(tl.int64) * N * R
    wc = _load_rows(Wc, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    bc = tl.load(Bc + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)
    z = _load_rows(Z + layer * M * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    pnorm = tl.load(PNORM + layer * M + offs_m, mask=offs_m < M, other=0.0)
    dz = _load_rows(DZ + layer * M * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R) + \
        _load_rows(DZ + (L + layer) * M * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    dp = _l2_rows_backward(dz, z, pnorm) * inv_sqrt_n                                 # dP / sqrt(N)
    if SOFTMAX:  # softmax over N: sum_n C[n, m] dC[n, m] = dP[m] . P[m], with P = Z max(||P||, eps)
        lse_c = tl.load(LSE_C + layer * M + offs_m, mask=offs_m < M, other=0.0) - log_n   # N * C = exp(logits - this)
        delta = tl.sum(dp * z, axis=1) * tl.maximum(pnorm, _EPS)                           # / sqrt(N), like dp
    dwc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dbc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dbp = tl.zeros((BLOCK_R,), dtype=tl.float32)
    first = split * blocks_per_split                    # blocks [first, last): never one past N
    for block in range(first, tl.minimum(first + blocks_per_split, n_blocks)):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        u, norm = _l2_rows(_load_rows(T + rows, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R))
        logits = _dot(u, tl.trans(wc), F32_DOT) + bc[None, :]
        keep = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        dc = _dot(u, tl.trans(dp), F32_DOT)                           # U dP^T / sqrt(N)
        if SOFTMAX:
            c = tl.where(keep, tl.exp(logits - lse_c[None, :]), 0.0)    # N * C
            ds = tl.where(keep, c * (dc - delta[None, :]) * inv_sqrt_n, 0.0)
        else:
            c = tl.where(keep, tl.sigmoid(logits), 0.0)                  # N * C
            ds = tl.where(keep, dc * c * (1.0 - c) * inv_sqrt_n, 0.0)
        dwc += _dot(tl.trans(ds), u, F32_DOT)
        dbc += tl.sum(ds, axis=0)
        du = _dot(c, dp, F32_DOT) * inv_sqrt_n + _dot(ds, wc, F32_DOT)  # the cluster path's dU
        for j in range(0, H):                                            # plus the attention path's, head by head
            du += _load_rows(DU + (layer * H + j).to(tl.int64) * N * R, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R)
        g = _load_rows(G + rows, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R)
        dbp += tl.sum(g, axis=0)
        _store_rows(DT_OUT + rows, g + _l2_rows_backward(du, u, norm), offs_n, offs_r, N, R, R, EVEN_N, EVEN_R)
    row = PART + (split * tl.num_programs(0) + layer) * (M * R + M + R)
    _store_rows(row, dwc, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    tl.store(row + M * R + offs_m, dbc, mask=offs_m < M)
    tl.store(row + M * R + M + offs_r, dbp, mask=offs_r < R)


@triton.jit(do_not_specialize=["P"])
def _sum_rows(X, OUT, P, K, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """``OUT[k] = sum_p X[p, k]`` for X (P, K), in a fixed order (deterministic): rows ``i, i + BLOCK_P, ...``
    accumulate in slot i, then the BLOCK_P slots are reduced by one fixed tree; stored in OUT's dtype."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + offs_p
        acc += tl.load(X + rows[:, None] * K + offs_k[None, :], mask=(rows[:, None] < P) & (offs_k[None, :] < K),
                       other=0.0)
    tl.store(OUT + offs_k, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=offs_k < K)


KERNELS = (_paca_cluster_pool, _paca_cluster_side_fwd, _paca_attn_fwd, _paca_attn_bwd, _paca_cluster_side_bwd,
           _paca_cluster_bwd, _sum_rows)  # what the launchers launch


# ------------------------------------------------------------------------------------------ launchers
def _launch_config(t: torch.Tensor, M: int, num_heads: int) -> PacaLaunch:
    L, N, R = t.shape
    return paca_launch(L, N, M, R, num_heads, t.dtype, device_props(t.device))


def _tiles(cfg: PacaLaunch, block_n: int, block_r: int | None = None) -> dict:
    """The constexprs every N-row PaCa kernel takes."""
    return dict(BLOCK_N=block_n, BLOCK_M=cfg.block_m, BLOCK_R=block_r or cfg.block_r, F32_DOT=F32_DOT_PRECISION)


def _require_contiguous(launcher: str, **tensors: torch.Tensor) -> None:
    """The kernels index rows as ``base + row * width``: a strided view would be read as if it were row-major."""
    strided = [name for name, x in tensors.items() if not x.is_contiguous()]
    if strided:
        raise ValueError(f"{launcher} takes contiguous tensors; not contiguous: {', '.join(strided)}. Call "
                         f".contiguous() on them first (PacaAttentionTriton does so itself).")


def paca_triton_forward(t: torch.Tensor, p: PacaParams, num_heads: int, activation: str = "sigmoid"):
    """Launch the forward kernels on contiguous tokens ``t`` (L, N, r) and parameters ``p``.

    Returns ``(out, saved, cfg)``: ``out`` (L, N, r) in t's dtype; ``saved``, what `paca_triton_backward` needs:
    Z (L, M, r), ||P|| (L, M), the assignment's log-sum-exp over N (L, M; softmax, else unused), Kq (L, hM, r),
    cq (L, hM), Vp (L, hM, r) and the attention's log-sum-exp (L, h, N), all fp32 (the dots' operand dtype);
    ``cfg``, the launch configuration (`launch.paca_launch`), which the backward reuses."""
    _require_contiguous("paca_triton_forward", t=t, **p._asdict())
    L, N, R = t.shape
    M = p.cluster_w.shape[0]
    cfg = _launch_config(t, M, num_heads)
    f32 = dict(device=t.device, dtype=torch.float32)
    splits = cfg.pool.splits
    pool_part = torch.empty(splits * L, M, R, **f32)
    max_part, sum_part = torch.empty(splits * L, M, **f32), torch.empty(splits * L, M, **f32)
    z, pnorm, lse_c = torch.empty(L, M, R, **f32), torch.empty(L, M, **f32), torch.empty(L, M, **f32)
    kq = torch.empty(L, num_heads * M, R, **f32)
    vp = torch.empty(L, num_heads * M, R, **f32)
    cq = torch.empty(L, num_heads * M, **f32)
    lse = torch.empty(L, num_heads, N, **f32)
    out = torch.empty_like(t)
    softmax = activation == "softmax"
    _paca_cluster_pool[(L, splits)](t, p.cluster_w, p.cluster_b, pool_part, max_part, sum_part, N, M, R,
                                    cfg.pool.n_blocks, cfg.pool.blocks_per_split, SOFTMAX=softmax,
                                    **_tiles(cfg, cfg.block_n_pool), **cfg.launch("_paca_cluster_pool"))
    _paca_cluster_side_fwd[(L, triton.cdiv(M, cfg.block_ms))](
        pool_part, max_part, sum_part, *p[2:9], z, pnorm, lse_c, kq, cq, vp, L, M, R, num_heads, R // num_heads,
        1.0 / N, 1.0 / math.sqrt(R // num_heads), splits, BLOCK_MS=cfg.block_ms, BLOCK_R=cfg.block_r,
        F32_DOT=F32_DOT_PRECISION, SOFTMAX=softmax, **cfg.launch("_paca_cluster_side_fwd"))
    _paca_attn_fwd[(L, cfg.n_blocks)](t, kq, cq, vp, p.proj_b, out, lse, N, M, R, num_heads,
                                      **_tiles(cfg, cfg.block_n), **cfg.launch("_paca_attn_fwd"))
    return out, (z, pnorm, lse_c, kq, cq, vp, lse), cfg


def paca_triton_backward(grad_out: torch.Tensor, t: torch.Tensor, p: PacaParams, saved: tuple, num_heads: int,
                         activation: str, cfg: PacaLaunch) -> tuple[torch.Tensor, PacaParams]:
    """Launch the backward kernels for the contiguous output gradient ``grad_out`` (L, N, r), given the forward's
    contiguous ``t`` and ``p`` and its ``saved`` and ``cfg`` (see `paca_triton_forward`).

    Returns ``(dt, grads)``: dt (L, N, r) in t's dtype and the gradients of every parameter as a `PacaParams`
    in the parameters' dtype."""
    _require_contiguous("paca_triton_backward", grad_out=grad_out, t=t, **p._asdict())
    z, pnorm, lse_c, kq, cq, vp, lse = saved
    h = num_heads
    L, N, R = t.shape
    M = z.shape[1]
    f32 = dict(device=t.device, dtype=torch.float32)
    attn_splits, cluster_splits = cfg.attn.splits, cfg.cluster.splits
    du_heads = torch.empty(L * h, N, R, **f32)
    dkq_part, dvp_part = torch.empty(attn_splits, L * h, M, R, **f32), torch.empty(attn_splits, L * h, M, R, **f32)
    dcq_part = torch.empty(attn_splits, L * h, M, **f32)
    _paca_attn_bwd[(L * h, attn_splits)](t, grad_out, kq, cq, vp, lse, du_heads, dkq_part, dcq_part, dvp_part,
                                         N, M, R, h, cfg.attn.n_blocks, cfg.attn.blocks_per_split,
                                         **_tiles(cfg, cfg.block_n, cfg.block_r_bwd), **cfg.launch("_paca_attn_bwd"))
    dz = torch.empty(2, L, M, R, **f32)
    m_blocks = triton.cdiv(M, cfg.block_ms)
    side_part = torch.empty(L * m_blocks, 4 * R * R + 3 * R, **f32)
    _paca_cluster_side_bwd[(L, m_blocks, 2)](z, p.q_w, p.q_b, p.k_w, p.v_w, p.v_b, p.proj_w, dkq_part, dcq_part,
                                             dvp_part, dz, side_part, L, M, R, h, R // h, 1.0 / math.sqrt(R // h),
                                             attn_splits, BLOCK_MS=cfg.block_ms, BLOCK_R=cfg.block_r,
                                             **cfg.launch("_paca_cluster_side_bwd"))
    dt = torch.empty_like(t)
    cluster_part = torch.empty(cluster_splits * L, M * R + M + R, **f32)
    _paca_cluster_bwd[(L, cluster_splits)](t, grad_out, du_heads, dz, z, pnorm, lse_c, p.cluster_w, p.cluster_b, dt,
                                           cluster_part, L, N, M, R, h, 1.0 / math.sqrt(N), math.log(N),
                                           cfg.cluster.n_blocks, cfg.cluster.blocks_per_split,
                                           SOFTMAX=activation == "softmax",
                                           **_tiles(cfg, cfg.block_n_cluster, cfg.block_r_bwd),
                                           **cfg.launch("_paca_cluster_bwd"))
    side = _sum_partials(side_part, p.q_w.dtype, cfg)
    cluster = _sum_partials(cluster_part, p.q_w.dtype, cfg)
    rr = R * R
    grads = PacaParams(cluster_w=cluster[:M * R].view(M, R), cluster_b=cluster[M * R:M * R + M],
                       q_w=side[:rr].view(R, R), q_b=side[4 * rr:4 * rr + R],
                       k_w=side[rr:2 * rr].view(R, R), k_b=side[4 * rr + R:4 * rr + 2 * R],
                       v_w=side[2 * rr:3 * rr].view(R, R), v_b=side[4 * rr + 2 * R:],
                       proj_w=side[3 * rr:4 * rr].view(R, R), proj_b=cluster[M * R + M:])
    return dt, grads


def _sum_partials(part: torch.Tensor, dtype: torch.dtype, cfg: PacaLaunch) -> torch.Tensor:
    """``part (P, K)`` summed over P in a fixed order, as a (K,) tensor of ``dtype`` (one launch)."""
    out = torch.empty(part.shape[1], device=part.device, dtype=dtype)
    _sum_rows[(triton.cdiv(part.shape[1], cfg.sum_block_cols),)](
        part, out, part.shape[0], part.shape[1], BLOCK_P=cfg.sum_block_rows, BLOCK_K=cfg.sum_block_cols,
        **cfg.launch("_sum_rows"))
    return out


def ensure_contiguous(fn):
    """Liger-Kernel's rule for an autograd Function's ``forward``/``backward``: every tensor argument is made
    contiguous before ``fn`` sees it (the kernels index rows as ``base + row * width``)."""
    @functools.wraps(fn)
    def wrapper(ctx, *args):
        return fn(ctx, *(x.contiguous() if isinstance(x, torch.Tensor) else x for x in args))

    return wrapper


class PacaAttentionTriton(torch.autograd.Function):
    """Triton path of `paca_attention` (sigmoid or softmax assignment): the launchers above, with contiguous
    tensors both ways; the launch configuration is kept on ``ctx`` for the backward."""

    @staticmethod
    @ensure_contiguous
    def forward(ctx, t, num_heads, activation, *params):
        out, saved, cfg = paca_triton_forward(t, PacaParams(*params), num_heads, activation)
        ctx.save_for_backward(t, *params, *saved)
        ctx.num_heads, ctx.activation, ctx.cfg = num_heads, activation, cfg
        return out

    @staticmethod
    @once_differentiable
    @ensure_contiguous
    def backward(ctx, grad_out):
        t, *rest = ctx.saved_tensors
        params, saved = PacaParams(*rest[:len(PacaParams._fields)]), tuple(rest[len(PacaParams._fields):])
        dt, grads = paca_triton_backward(grad_out, t, params, saved, ctx.num_heads, ctx.activation, ctx.cfg)
        return (dt, None, None, *grads)
