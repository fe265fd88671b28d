"""Triton path of `lowrank_residual_linear`: a GEMM with a fused low-rank epilogue, used by
`residual.LowRankResidualLinear` for its two full-size products.

    out = A @ B + P @ Q^T (+ bias)        A: (M, K)  B: (K, N)  P: (M, R)  Q: (N, R)

forward:  y  = x W^T + b + (x psi) T^T     A = x, B = W^T (strided view), P = x psi, Q = T
backward: dx = g W + (g T) psi^T           A = g, B = W,                  P = g T,   Q = psi
The skinny products x psi, g T, x^T (g T) and g^T (x psi) stay with the vendor BLAS. The low-rank
term is accumulated on chip as more steps of the main loop, so y (or dx) is written once. x and W may be
16-bit while psi and T are fp32: P and Q are cast to the GEMM's operand dtype for those steps. Tiles:
`launch.residual_launch`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import F32_DOT_PRECISION, device_props, residual_launch, residual_triton_unsupported


@triton.heuristics({
    "EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0,
    "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
    "EVEN_R": lambda a: a["R"] % a["BLOCK_R"] == 0,
})
@triton.jit(do_not_specialize=["M"])
def _matmul_lowrank_epilogue(A, B, P, Q, BIAS, OUT, M, N, K, R,
                             stride_am, stride_ak, stride_bk, stride_bn, stride_pm, stride_qn, stride_om,
                             HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                             GROUP_M: tl.constexpr,
                             EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, EVEN_R: tl.constexpr):
    """One (BLOCK_M x BLOCK_N) tile of ``A B + P Q^T (+ bias)``: the low-rank term runs as more steps of the same
    accumulation, BLOCK_R of its R columns at a time, so it holds no more on chip than a step of the main loop.
    Row and column offsets are 64-bit: rows x row stride may pass 2^31 elements."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)                  # grouped ordering: neighbouring programs share B tiles
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_n)) // group_size
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_M and EVEN_N and EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (k0 + offs_k[None, :] < K), other=0.0)
            b = tl.load(b_ptrs, mask=(k0 + offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        if A.dtype.element_ty == tl.float32:
            acc += tl.dot(a, b, input_precision=F32_DOT)
        else:
            acc += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    offs_r = tl.arange(0, BLOCK_R)
    p_ptrs = P + offs_m[:, None] * stride_pm + offs_r[None, :]
    q_ptrs = Q + offs_n[None, :] * stride_qn + offs_r[:, None]                 # Q^T: (BLOCK_R, BLOCK_N)
    for r0 in range(0, R, BLOCK_R):
        if EVEN_M and EVEN_N and EVEN_R:
            p = tl.load(p_ptrs)
            q = tl.load(q_ptrs)
        else:
            p = tl.load(p_ptrs, mask=(offs_m[:, None] < M) & (r0 + offs_r[None, :] < R), other=0.0)
            q = tl.load(q_ptrs, mask=(r0 + offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)
        if A.dtype.element_ty == tl.float32:
            acc += tl.dot(p.to(tl.float32), q.to(tl.float32), input_precision=F32_DOT)
        else:
            acc += tl.dot(p.to(A.dtype.element_ty), q.to(A.dtype.element_ty))
        p_ptrs += BLOCK_R
        q_ptrs += BLOCK_R
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = OUT + offs_m[:, None] * stride_om + offs_n[None, :]
    if EVEN_M and EVEN_N:
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty))
    else:
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


KERNELS = (_matmul_lowrank_epilogue,)  # what the launcher launches


def matmul_lowrank_epilogue(a, b, p, q, bias=None):
    """``a @ b + p @ q^T (+ bias)`` in one kernel; ``b`` may be any 2-D strided view. Returns (M, N) in a's dtype.
    Refuses (``ValueError``) operands of 2^31 elements or more (`launch.residual_triton_unsupported`)."""
    M, K = a.shape
    N = b.shape[1]
    R = p.shape[1]
    reason = residual_triton_unsupported(M, K, N, R)
    if reason:
        raise ValueError(f"matmul_lowrank_epilogue: {reason}; use the torch path (matmul_lowrank_torch).")
    if a.stride(1) != 1 and a.stride(0) != 1:
        a = a.contiguous()
    p, q = p.contiguous(), q.contiguous()
    out = torch.empty(M, N, device=a.device, dtype=a.dtype)
    cfg = residual_launch(M, N, K, R, a.dtype, device_props(a.device))
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _matmul_lowrank_epilogue[grid](
        a, b, p, q, bias if bias is not None else out, out, M, N, K, R,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), p.stride(0), q.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, F32_DOT=F32_DOT_PRECISION, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    return out
