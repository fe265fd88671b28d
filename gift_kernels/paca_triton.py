"""Triton kernels for `paca_attention` (sigmoid or softmax assignment), forward and backward.

Launches (per call, all L layers at once):
  forward   1. `_paca_cluster_fwd`: programs over (layer, block of clusters); one pass over N pools the
               cluster tokens (logits, sigmoid / N or an online softmax over N, C^T U accumulated on chip,
               l2 over r), then derives the folded cluster keys Kq, biases cq and values Vp (see
               `paca_math.cluster_side`; a loop over heads, one (r x r) weight on chip at a time).
            2. `_paca_attn_fwd`: programs over (layer, block of N rows): logits U Kq^T + cq, softmax over
               the M clusters on chip, A Vp + bp + T in the epilogue; the fp32 log-sum-exp is saved.
  backward  3. `_paca_attn_bwd`: programs over (layer x head, split of N): probabilities recomputed from
               the log-sum-exp; dU (attention path) per row and head, per-split partial sums of dVp, dKq, dcq.
            4. `_paca_cluster_side_bwd`: one program per layer: the split partials summed in split order,
               the (M x r)-sized cluster-side backward (dK, dV, dZ, the l2 backward to dP) and the layer's
               partial gradients of Wq, bq, Wk, bk, Wv, bv, Wp.
            5. `_paca_cluster_bwd`: programs over (layer, split of N): dU summed over heads, dC = U dP^T, the
               sigmoid/softmax backward, dU (cluster path), the l2 backward to dT, partials of dWc, dbc, dbp.
            6-7. `_sum_rows` twice: the partial gradients summed in row order, written in the parameters' dtype.
Every reduction over N is a fixed-order loop or a fixed-order sum of per-split partials: no atomics,
so two runs give bitwise equal results. Tiles, warps and splits: `launch.paca_launch`.
fp32 dots run at ``input_precision=F32_DOT`` (tf32x3: three TF32 tensor-core products, fp32 accuracy).

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

from .dispatch import TRITON_DTYPE_NAMES
from .launch import F32_DOT_PRECISION, PacaLaunch, device_props, paca_launch
from .paca_math import EPS, PacaParams

_EPS = tl.constexpr(EPS)  # `paca_math.EPS`, as a constant the kernels can read

# masks only where a length is not a multiple of its block (N, M) or not a power of two (r)
_EVEN_M_R = {
    "EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0,
    "EVEN_R": lambda a: a["R"] == a["BLOCK_R"],
}
_even_sizes = triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0, **_EVEN_M_R})
_even_m_r = triton.heuristics(_EVEN_M_R)


@triton.jit
def _dot(a, b, DT: tl.constexpr, F32_DOT: tl.constexpr):
    """``a @ b`` accumulated in fp32: 16-bit operands when ``DT`` is 16-bit, else fp32 operands at
    ``input_precision=F32_DOT`` (see `launch.F32_DOT_PRECISION`)."""
    if DT == tl.float32:
        return tl.dot(a, b, input_precision=F32_DOT)
    return tl.dot(a.to(DT), b.to(DT))


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
    """``x W^T + b`` in fp32 for an (r x r) weight ``W`` (out, in) and its bias ``B`` (r,); W is loaded right
    before its one dot."""
    b = tl.load(B + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    return _dot(x, tl.trans(_load_rows(W, offs_r, offs_r, R, R, R, EVEN_R, EVEN_R)), tl.float32, F32_DOT) + b[None, :]


@_even_sizes
@triton.jit
def _paca_cluster_fwd(T, Wc, Bc, Wq, Bq, Wk, Bk, Wv, Bv, Wp, Z, PNORM, LSE_C, KQ, CQ, VP,
                      N, M, R, inv_n, scale, H, D,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_R: tl.constexpr, DT: tl.constexpr, F32_DOT: tl.constexpr, SOFTMAX: tl.constexpr,
                      EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_R: tl.constexpr):
    """Programs over (layer, block of BLOCK_M clusters): every cluster row is independent. ``SOFTMAX``: the
    assignment is a softmax over the N tokens (online, like flash attention; its log-sum-exp goes to LSE_C),
    else sigmoid / N."""
    layer = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    wc = _load_rows(Wc, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)                  # (BLOCK_M, R)
    if EVEN_M:
        bc = tl.load(Bc + offs_m).to(tl.float32)
    else:
        bc = tl.load(Bc + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)
    pooled = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)      # softmax: running max and sum over N
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_layer = T + layer * N * R
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        u, _ = _l2_rows(_load_rows(t_layer, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R))
        logits = _dot(u, tl.trans(wc), DT, F32_DOT) + bc[None, :]
        if SOFTMAX:
            if not EVEN_N:
                logits = tl.where(offs_n[:, None] < N, logits, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=0))
            c = tl.exp(logits - new_max[None, :])
            rescale = tl.exp(run_max - new_max)
            run_sum = run_sum * rescale + tl.sum(c, axis=0)
            pooled = pooled * rescale[:, None]
            run_max = new_max
        else:
            c = tl.sigmoid(logits) * inv_n
            if not EVEN_N:
                c = tl.where(offs_n[:, None] < N, c, 0.0)
        pooled += _dot(tl.trans(c), u, DT, F32_DOT)
    if SOFTMAX:
        pooled = pooled / run_sum[:, None]
        tl.store(LSE_C + layer * M + offs_m, run_max + tl.log(run_sum), mask=offs_m < M)
    z, pnorm = _l2_rows(pooled)
    _store_rows(Z + layer * M * R, z, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    if EVEN_M:
        tl.store(PNORM + layer * M + offs_m, pnorm)
    else:
        tl.store(PNORM + layer * M + offs_m, pnorm, mask=offs_m < M)
    # cluster side (fp32 whatever the input dtype): K, V, then per head the folded keys/values. Each (r x r)
    # weight is loaded right before its one dot, so that at most one of them is on chip at a time.
    offs_rr = tl.arange(0, BLOCK_R)
    k = _linear_rows(z, Wk, Bk, offs_r, R, F32_DOT, EVEN_R)
    v = _linear_rows(z, Wv, Bv, offs_r, R, F32_DOT, EVEN_R)
    bq = tl.load(Bq + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    for j in range(0, H):          # a loop (H is a runtime argument): code size does not grow with H
        in_head = (offs_r >= j * D) & (offs_r < (j + 1) * D)
        kj = tl.where(in_head[None, :], k, 0.0)
        vj = tl.where(in_head[None, :], v, 0.0)
        wq = _load_rows(Wq, offs_rr, offs_r, R, R, R, EVEN_R, EVEN_R)             # (out, in)
        kq = _dot(kj, wq, tl.float32, F32_DOT) * scale                             # (BLOCK_M, R)
        cq = tl.sum(kj * bq[None, :], axis=1) * scale                               # (BLOCK_M,)
        wp = _load_rows(Wp, offs_rr, offs_r, R, R, R, EVEN_R, EVEN_R)
        vp = _dot(vj, tl.trans(wp), tl.float32, F32_DOT)                           # (BLOCK_M, R)
        base = (layer * H + j) * M
        _store_rows(KQ + base * R, kq, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
        _store_rows(VP + base * R, vp, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
        tl.store(CQ + base + offs_m, cq, mask=offs_m < M)


@triton.jit
def _head_logits(u, kq, cq, offs_m, M, DT: tl.constexpr, F32_DOT: tl.constexpr, EVEN_M: tl.constexpr):
    logits = _dot(u, tl.trans(kq), DT, F32_DOT) + cq[None, :]
    if not EVEN_M:
        logits = tl.where(offs_m[None, :] < M, logits, float("-inf"))
    return logits


@_even_sizes
@triton.jit
def _paca_attn_fwd(T, KQ, CQ, VP, Bp, OUT, LSE, N, M, R, H,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   DT: tl.constexpr, F32_DOT: tl.constexpr,
                   EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_R: tl.constexpr):
    layer = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    t = _load_rows(T + layer * N * R, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R)
    u, _ = _l2_rows(t)
    bp = tl.load(Bp + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    out = t + bp[None, :]
    for j in range(0, H):
        base = (layer * H + j) * M
        kq = _load_rows(KQ + base * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
        vp = _load_rows(VP + base * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
        cq = tl.load(CQ + base + offs_m, mask=offs_m < M, other=0.0)
        logits = _head_logits(u, kq, cq, offs_m, M, DT, F32_DOT, EVEN_M)
        row_max = tl.max(logits, axis=1)
        e = tl.exp(logits - row_max[:, None])
        row_sum = tl.sum(e, axis=1)
        out += _dot(e / row_sum[:, None], vp, DT, F32_DOT)
        lse_ptrs = LSE + (layer * H + j) * N + offs_n
        if EVEN_N:
            tl.store(lse_ptrs, row_max + tl.log(row_sum))
        else:
            tl.store(lse_ptrs, row_max + tl.log(row_sum), mask=offs_n < N)
    _store_rows(OUT + layer * N * R, out, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R)


@_even_sizes
@triton.jit
def _paca_attn_bwd(T, G, KQ, CQ, VP, LSE, DU, DKQ_PART, DCQ_PART, DVP_PART, N, M, R, H, n_blocks, blocks_per_split,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   DT: tl.constexpr, F32_DOT: tl.constexpr,
                   EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_R: tl.constexpr):
    layer_head = tl.program_id(0)          # layer * H + head
    split = tl.program_id(1)
    layer = layer_head // H
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    base = layer_head * M
    kq = _load_rows(KQ + base * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    vp = _load_rows(VP + base * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    cq = tl.load(CQ + base + offs_m, mask=offs_m < M, other=0.0)
    dkq = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dvp = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dcq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first = split * blocks_per_split                    # blocks [first, last): never one past N
    for block in range(first, tl.minimum(first + blocks_per_split, n_blocks)):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        u, _ = _l2_rows(_load_rows(T + layer * N * R, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R))
        g = _load_rows(G + layer * N * R, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R)
        lse = tl.load(LSE + layer_head * N + offs_n, mask=offs_n < N, other=0.0)
        a = tl.exp(_head_logits(u, kq, cq, offs_m, M, DT, F32_DOT, EVEN_M) - lse[:, None])
        # rows renormalised: exp(logits - lse) alone sums to 1 only to ~ulp(lse), and that error lands on the
        # small, cancellation-heavy Q/K gradients (BLOCK_M spans all M, so this is one row sum)
        a = a / tl.sum(a, axis=1)[:, None]
        if not EVEN_N:
            a = tl.where(offs_n[:, None] < N, a, 0.0)
        da = _dot(g, tl.trans(vp), DT, F32_DOT)                                     # (BLOCK_N, M)
        dlogits = a * (da - tl.sum(da * a, axis=1)[:, None])
        dvp += _dot(tl.trans(a), g, DT, F32_DOT)
        dkq += _dot(tl.trans(dlogits), u, DT, F32_DOT)
        dcq += tl.sum(dlogits, axis=0)
        du = _dot(dlogits, kq, DT, F32_DOT)
        _store_rows(DU + layer_head * N * R, du, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R)
    part = (split * tl.num_programs(0) + layer_head) * M
    _store_rows(DKQ_PART + part * R, dkq, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    _store_rows(DVP_PART + part * R, dvp, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    tl.store(DCQ_PART + part + offs_m, dcq, mask=offs_m < M)


@_even_sizes
@triton.jit
def _paca_cluster_bwd(T, G, DU, DP, Z, PNORM, LSE_C, Wc, Bc, DT_OUT, PART, N, M, R, H, inv_n,
                      n_blocks, blocks_per_split, SOFTMAX: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                      DT: tl.constexpr, F32_DOT: tl.constexpr,
                      EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_R: tl.constexpr):
    """``DU`` holds the attention path's dU per head, summed here in head order. Row ``split * L + layer`` of
    ``PART`` gets this program's partial sums ``[dWc (M x R) | dbc (M) | dbp (R)]``."""
    layer = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    wc = _load_rows(Wc, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    bc = tl.load(Bc + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)
    dp = _load_rows(DP + layer * M * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    if SOFTMAX:  # softmax over N: sum_n C[n, m] dC[n, m] = dP[m] . P[m], with P = Z max(||P||, eps)
        z = _load_rows(Z + layer * M * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
        pnorm = tl.load(PNORM + layer * M + offs_m, mask=offs_m < M, other=0.0)
        lse_c = tl.load(LSE_C + layer * M + offs_m, mask=offs_m < M, other=0.0)
        delta = tl.sum(dp * z, axis=1) * tl.maximum(pnorm, _EPS)
    dwc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dbc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dbp = tl.zeros((BLOCK_R,), dtype=tl.float32)
    first = split * blocks_per_split                    # blocks [first, last): never one past N
    for block in range(first, tl.minimum(first + blocks_per_split, n_blocks)):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        u, norm = _l2_rows(_load_rows(T + layer * N * R, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R))
        g = _load_rows(G + layer * N * R, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R)
        du = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for j in range(0, H):
            du += _load_rows(DU + (layer * H + j) * N * R, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R)
        logits = _dot(u, tl.trans(wc), DT, F32_DOT) + bc[None, :]
        keep = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        dc = _dot(u, tl.trans(dp), DT, F32_DOT)
        if SOFTMAX:
            c = tl.where(keep, tl.exp(logits - lse_c[None, :]), 0.0)
            ds = tl.where(keep, c * (dc - delta[None, :]), 0.0)
        else:
            sig = tl.sigmoid(logits)
            c = tl.where(keep, sig * inv_n, 0.0)
            ds = tl.where(keep, dc * sig * (1.0 - sig) * inv_n, 0.0)
        du += _dot(c, dp, DT, F32_DOT) + _dot(ds, wc, DT, F32_DOT)
        dwc += _dot(tl.trans(ds), u, DT, F32_DOT)
        dbc += tl.sum(ds, axis=0)
        dbp += tl.sum(g, axis=0)
        dt = g + _l2_rows_backward(du, u, norm)
        _store_rows(DT_OUT + layer * N * R, dt, offs_n, offs_r, N, R, R, EVEN_N, EVEN_R)
    row = PART + (split * tl.num_programs(0) + layer) * (M * R + M + R)
    _store_rows(row, dwc, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    tl.store(row + M * R + offs_m, dbc, mask=offs_m < M)
    tl.store(row + M * R + M + offs_r, dbp, mask=offs_r < R)


@_even_m_r
@triton.jit
def _paca_cluster_side_bwd(Z, PNORM, Wq, Bq, Wk, Bk, Wv, Bv, Wp, DKQ_PART, DCQ_PART, DVP_PART, DP, PART,
                           L, M, R, H, D, scale, splits,
                           BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, F32_DOT: tl.constexpr,
                           EVEN_M: tl.constexpr, EVEN_R: tl.constexpr):
    """Backward of the cluster side (`paca_math.cluster_side_backward`), one program per layer: the split partials
    of dKq, dcq, dVp summed in split order, then dK, dV, dZ, the l2 backward to dP (stored), and this layer's
    row of ``PART``: ``[dWq | dWk | dWv | dWp (R x R each) | dbq | dbk | dbv (R each)]``."""
    layer = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_rr = tl.arange(0, BLOCK_R)
    z = _load_rows(Z + layer * M * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    k = _linear_rows(z, Wk, Bk, offs_r, R, F32_DOT, EVEN_R)
    v = _linear_rows(z, Wv, Bv, offs_r, R, F32_DOT, EVEN_R)
    bq = tl.load(Bq + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    dk = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dv = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dwq = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    dwp = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    dbq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for j in range(0, H):
        lh = layer * H + j
        dkq = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        dvp = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        dcq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for s in range(0, splits):                                         # fixed order: deterministic
            part = (s * L * H + lh) * M
            dkq += _load_rows(DKQ_PART + part * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
            dvp += _load_rows(DVP_PART + part * R, offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
            dcq += tl.load(DCQ_PART + part + offs_m, mask=offs_m < M, other=0.0)
        in_head = ((offs_r >= j * D) & (offs_r < (j + 1) * D))[None, :]
        kj = tl.where(in_head, k, 0.0)
        vj = tl.where(in_head, v, 0.0)
        wq = _load_rows(Wq, offs_rr, offs_r, R, R, R, EVEN_R, EVEN_R)             # (out, in)
        dk += tl.where(in_head, _dot(dkq, tl.trans(wq), tl.float32, F32_DOT) + dcq[:, None] * bq[None, :], 0.0)
        dwq += _dot(tl.trans(kj), dkq, tl.float32, F32_DOT)
        dbq += tl.sum(kj * dcq[:, None], axis=0)
        wp = _load_rows(Wp, offs_rr, offs_r, R, R, R, EVEN_R, EVEN_R)
        dv += tl.where(in_head, _dot(dvp, wp, tl.float32, F32_DOT), 0.0)
        dwp += _dot(tl.trans(dvp), vj, tl.float32, F32_DOT)
    dk = dk * scale
    dz = _dot(dk, _load_rows(Wk, offs_rr, offs_r, R, R, R, EVEN_R, EVEN_R), tl.float32, F32_DOT) + \
        _dot(dv, _load_rows(Wv, offs_rr, offs_r, R, R, R, EVEN_R, EVEN_R), tl.float32, F32_DOT)
    pnorm = tl.load(PNORM + layer * M + offs_m, mask=offs_m < M, other=0.0)
    _store_rows(DP + layer * M * R, _l2_rows_backward(dz, z, pnorm), offs_m, offs_r, M, R, R, EVEN_M, EVEN_R)
    row = PART + layer * (4 * R * R + 3 * R)
    _store_rows(row, dwq * scale, offs_rr, offs_r, R, R, R, EVEN_R, EVEN_R)
    _store_rows(row + R * R, _dot(tl.trans(dk), z, tl.float32, F32_DOT), offs_rr, offs_r, R, R, R, EVEN_R, EVEN_R)
    _store_rows(row + 2 * R * R, _dot(tl.trans(dv), z, tl.float32, F32_DOT), offs_rr, offs_r, R, R, R, EVEN_R, EVEN_R)
    _store_rows(row + 3 * R * R, dwp, offs_rr, offs_r, R, R, R, EVEN_R, EVEN_R)
    tl.store(row + 4 * R * R + offs_r, dbq * scale, mask=offs_r < R)
    tl.store(row + 4 * R * R + R + offs_r, tl.sum(dk, axis=0), mask=offs_r < R)
    tl.store(row + 4 * R * R + 2 * R + offs_r, tl.sum(dv, axis=0), mask=offs_r < R)


@triton.jit
def _sum_rows(X, OUT, P, K, BLOCK_K: tl.constexpr):
    """``OUT[k] = sum_p X[p, k]`` in row order (deterministic), stored in OUT's dtype."""
    offs = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for p in range(0, P):
        acc += tl.load(X + p * K + offs, mask=offs < K, other=0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=offs < K)


KERNELS = (_paca_cluster_fwd, _paca_attn_fwd, _paca_attn_bwd, _paca_cluster_side_bwd, _paca_cluster_bwd,
           _sum_rows)  # what the launchers launch


# ------------------------------------------------------------------------------------------ launchers
def _launch_config(t: torch.Tensor, M: int, num_heads: int) -> PacaLaunch:
    L, N, R = t.shape
    return paca_launch(L, N, M, R, num_heads, t.dtype, device_props(t.device))


def _launch_kwargs(cfg: PacaLaunch, dtype: torch.dtype) -> dict:
    """The constexprs and options every PaCa kernel launch takes."""
    return dict(BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r,
                DT=tl.dtype(TRITON_DTYPE_NAMES[dtype]), F32_DOT=F32_DOT_PRECISION, num_stages=cfg.num_stages)


def _require_contiguous(launcher: str, **tensors: torch.Tensor) -> None:
    """The kernels index rows as ``base + row * width``: a strided view would be read as if it were row-major."""
    strided = [name for name, x in tensors.items() if not x.is_contiguous()]
    if strided:
        raise ValueError(f"{launcher} takes contiguous tensors; not contiguous: {', '.join(strided)}. Call "
                         f".contiguous() on them first (PacaAttentionTriton does so itself).")


def paca_triton_forward(t: torch.Tensor, p: PacaParams, num_heads: int, activation: str = "sigmoid"):
    """Launch the forward kernels on contiguous tokens ``t`` (L, N, r) and parameters ``p``.

    Returns ``(out, saved, cfg)``: ``out`` (L, N, r) in t's dtype; ``saved``, what `paca_triton_backward` needs
    (fp32): Z (L, M, r), ||P|| (L, M), the assignment's log-sum-exp over N (L, M; softmax, else unused), Kq
    (L, hM, r), cq (L, hM), Vp (L, hM, r) and the attention's log-sum-exp (L, h, N); ``cfg``, the launch
    configuration (`launch.paca_launch`), which the backward reuses."""
    _require_contiguous("paca_triton_forward", t=t, **p._asdict())
    L, N, R = t.shape
    M = p.cluster_w.shape[0]
    cfg = _launch_config(t, M, num_heads)
    f32 = dict(device=t.device, dtype=torch.float32)
    z, pnorm, lse_c = torch.empty(L, M, R, **f32), torch.empty(L, M, **f32), torch.empty(L, M, **f32)
    kq, vp = torch.empty(L, num_heads * M, R, **f32), torch.empty(L, num_heads * M, R, **f32)
    cq = torch.empty(L, num_heads * M, **f32)
    lse = torch.empty(L, num_heads, N, **f32)
    out = torch.empty_like(t)
    scale = 1.0 / math.sqrt(R // num_heads)
    tiles = _launch_kwargs(cfg, t.dtype)
    cluster_tiles = dict(tiles, num_stages=cfg.num_stages_cluster)
    _paca_cluster_fwd[(L, triton.cdiv(M, cfg.block_m))](
        t, *p[:9], z, pnorm, lse_c, kq, cq, vp, N, M, R, 1.0 / N, scale, num_heads, R // num_heads,
        SOFTMAX=activation == "softmax", num_warps=cfg.num_warps_fwd, **cluster_tiles)
    _paca_attn_fwd[(L, cfg.n_blocks)](t, kq, cq, vp, p.proj_b, out, lse, N, M, R, num_heads,
                                      num_warps=cfg.num_warps_fwd, **tiles)
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
    splits, bps = cfg.splits, cfg.blocks_per_split
    du_heads = torch.empty(L * h, N, R, **f32)
    dkq_part, dvp_part = torch.empty(splits, L * h, M, R, **f32), torch.empty(splits, L * h, M, R, **f32)
    dcq_part = torch.empty(splits, L * h, M, **f32)
    tiles = dict(_launch_kwargs(cfg, t.dtype), num_stages=cfg.num_stages_bwd)
    _paca_attn_bwd[(L * h, splits)](t, grad_out, kq, cq, vp, lse, du_heads, dkq_part, dcq_part, dvp_part, N, M, R, h,
                                    cfg.n_blocks, bps, num_warps=cfg.num_warps_bwd, **tiles)
    dp = torch.empty(L, M, R, **f32)
    side_part = torch.empty(L, 4 * R * R + 3 * R, **f32)
    _paca_cluster_side_bwd[(L,)](z, pnorm, p.q_w, p.q_b, p.k_w, p.k_b, p.v_w, p.v_b, p.proj_w, dkq_part, dcq_part,
                                 dvp_part, dp, side_part, L, M, R, h, R // h, 1.0 / math.sqrt(R // h), splits,
                                 BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, F32_DOT=F32_DOT_PRECISION,
                                 num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages_cluster)
    dt = torch.empty_like(t)
    cluster_part = torch.empty(splits * L, M * R + M + R, **f32)
    _paca_cluster_bwd[(L, splits)](t, grad_out, du_heads, dp, z, pnorm, lse_c, p.cluster_w, p.cluster_b, dt,
                                   cluster_part, N, M, R, h, 1.0 / N, cfg.n_blocks, bps,
                                   SOFTMAX=activation == "softmax", num_warps=cfg.num_warps_bwd, **tiles)
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
    """``part (P, K)`` summed over P in row order, as a (K,) tensor of ``dtype`` (one launch)."""
    out = torch.empty(part.shape[1], device=part.device, dtype=dtype)
    _sum_rows[(triton.cdiv(part.shape[1], cfg.block_sum),)](part, out, part.shape[0], part.shape[1],
                                                            BLOCK_K=cfg.block_sum, num_warps=cfg.num_warps_fwd)
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
    @ensure_contiguous
    def backward(ctx, grad_out):
        t, *rest = ctx.saved_tensors
        params, saved = PacaParams(*rest[:len(PacaParams._fields)]), tuple(rest[len(PacaParams._fields):])
        dt, grads = paca_triton_backward(grad_out, t, params, saved, ctx.num_heads, ctx.activation, ctx.cfg)
        return (dt, None, None, *grads)
