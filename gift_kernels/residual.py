"""The residual-weight projection of one adapted linear layer.

    y = x W^T + b + (x psi) T^T          x: (..., d_in)   W: (d_out, d_in)   b: (d_out,)
                                        psi: (d_in, r)   T: (d_out, r)        y: (..., d_out)

which equals ``x (W + T psi^T)^T + b`` without ever building the dense ``d_out x d_in`` residual.
x, W and b share the compute dtype (e.g. bf16); psi and T may be kept in another (e.g. fp32 GIFT
weights): they are cast to the compute dtype for the products and get gradients in their own dtype.
W and b are frozen: backward returns gradients for x, psi and T only, and saves x and ``x psi``
(the same activations a LoRA layer saves), never a copy of W. Under ``auto`` the Triton GEMM is checked on
its first use per shape bucket, dtype and device against the float64 torch path, then timed against cuBLAS
(`dispatch.verified_choice`, `first_use_check`).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .agreement import disagreements, full_precision_matmul, residual_error_floors, residual_own_work
from .dispatch import resolve_backend, verified_choice
from .launch import device_props, residual_launch, residual_triton_unsupported

FIRST_USE_ROWS = 4096  # rows of x the first-use check compares on at least, if the call has them (plus rows % BLOCK_M)


def lowrank_residual_linear_reference(x, weight, bias, psi, tokens):
    """Plain-torch reference: the dense merged weight in one GEMM."""
    return F.linear(x, weight + (tokens @ psi.transpose(0, 1)).to(weight.dtype), bias)


def matmul_lowrank_torch(a, b, p, q, bias=None):
    """``a @ b + p @ q^T (+ bias)`` with the vendor BLAS: two GEMMs, the second accumulated in place."""
    out = torch.addmm(bias, a, b) if bias is not None else a @ b
    return out.addmm_(p, q.t())


class LowRankResidualLinear(torch.autograd.Function):
    """Backward written out by hand; ``matmul_lowrank(a, b, p, q, bias)`` computes the two full-size
    products ``x W^T + (x psi) T^T + b`` and ``g W + (g T) psi^T`` (torch: `matmul_lowrank_torch`;
    Triton: `residual_triton.matmul_lowrank_epilogue`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, psi, tokens, matmul_lowrank):
        ctx.gift_dtypes = (psi.dtype, tokens.dtype)
        psi, tokens = psi.to(x.dtype), tokens.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        x_psi = x2 @ psi                                                   # (B, r)
        y = matmul_lowrank(x2, weight.t(), x_psi, tokens, bias)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[3] else None, x_psi, weight, psi, tokens)
        ctx.x_shape, ctx.matmul_lowrank = x.shape, matmul_lowrank
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x2, x_psi, weight, psi, tokens = ctx.saved_tensors
        # (B, d_out), row-major: the layout the first-use check's gradient has (the verdict key holds x's and W's)
        g = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()
        g_tokens = g @ tokens                                              # (B, r)
        grad_x = grad_psi = grad_tokens = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.matmul_lowrank(g, weight, g_tokens, psi).reshape(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            grad_psi = (x2.t() @ g_tokens).to(ctx.gift_dtypes[0])          # (d_in, r)
        if ctx.needs_input_grad[4]:
            grad_tokens = (g.t() @ x_psi).to(ctx.gift_dtypes[1])           # (d_out, r)
        return grad_x, None, None, grad_psi, grad_tokens, None


def _outputs_and_grads(matmul_lowrank, x, weight, bias, psi, tokens, grad, dtype: torch.dtype | None):
    """Output and the gradients of x, psi and T of `LowRankResidualLinear` on detached copies (all in ``dtype``, or as
    they are for None)."""
    with torch.enable_grad():
        xs, ps, ts = (v.detach().to(dtype or v.dtype).requires_grad_(True) for v in (x, psi, tokens))
        w, b = (None if v is None else v.detach().to(dtype or v.dtype) for v in (weight, bias))
        out = LowRankResidualLinear.apply(xs, w, b, ps, ts, matmul_lowrank)
        dx, dpsi, dt = torch.autograd.grad(out, [xs, ps, ts], grad.to(out.dtype))
    return {"output": out.detach(), "dx": dx, "dpsi": dpsi, "dT": dt}


def first_use_rows(rows: int, block_m: int) -> int:
    """How many of a call's ``rows`` the first-use check compares on: all of them up to ``FIRST_USE_ROWS +
    block_m``, else ``FIRST_USE_ROWS`` plus ``rows % block_m``, so that the check runs the kernel's specialisation of
    the call (``EVEN_M``: whether the last row tile is masked, and the same partial tile)."""
    if rows <= FIRST_USE_ROWS + block_m:
        return rows
    return FIRST_USE_ROWS - FIRST_USE_ROWS % block_m + rows % block_m


def first_use_operands(x, weight, psi, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random ``(psi, T)`` of the call's shapes, dtypes and device for the first-use check, scaled so that the
    low-rank term ``(x psi) T^T`` is as large as ``x W^T``: the call's own psi is zero at the start of GIFT training
    (and T may be too), and a check on those would see nothing of the kernel's low-rank work."""
    gen = torch.Generator(x.device).manual_seed(1)
    d_out, d_in, r = weight.shape[0], weight.shape[1], psi.shape[1]
    w_scale = weight.detach().float().std().item() if weight.numel() > 1 else 0.0
    w_scale = w_scale if math.isfinite(w_scale) and w_scale > 0 else 1.0
    rand_psi = torch.randn(d_in, r, generator=gen, device=x.device) / math.sqrt(d_in)
    rand_tokens = torch.randn(d_out, r, generator=gen, device=x.device) * (w_scale * math.sqrt(d_in / r))
    return rand_psi.to(psi.dtype), rand_tokens.to(tokens.dtype)


def first_use_check(x, weight, bias, psi, tokens) -> str | None:
    """None if the Triton GEMM agrees with the torch path, forward and backward (a seeded random output gradient),
    on `first_use_rows` of x's rows with seeded random psi and T (`first_use_operands`): inputs on which every term
    of the kernel shows, whatever the call's values, with the call's shapes (its ``rows % BLOCK_M``), dtypes and
    device; else how they disagree. The rule is the tests': the Triton results against the float64 torch path, the
    fp32 one rounded to each result's dtype as the baseline, own work and rounding floors included (`agreement`),
    all with torch's fp32 matmuls at full precision (`agreement.full_precision_matmul`). An exception of the kernel
    propagates (`dispatch.verified_choice` reports it)."""
    from .residual_triton import matmul_lowrank_epilogue  # Triton is optional: imported once it is to be checked

    x = x.detach().reshape(-1, x.shape[-1])
    block_m = residual_launch(x.shape[0], weight.shape[0], x.shape[1], psi.shape[1], x.dtype,
                              device_props(x.device)).block_m
    x = x[:first_use_rows(x.shape[0], block_m)]
    psi, tokens = first_use_operands(x, weight, psi, tokens)
    gen = torch.Generator(x.device).manual_seed(0)
    grad = torch.randn(x.shape[0], weight.shape[0], generator=gen, device=x.device, dtype=torch.float32).to(x.dtype)
    inputs = (x, weight, bias, psi, tokens, grad)
    with torch.autocast(x.device.type, enabled=False), full_precision_matmul():
        got = _outputs_and_grads(matmul_lowrank_epilogue, *inputs, None)
        exact = _outputs_and_grads(matmul_lowrank_torch, *inputs, torch.float64)
        baseline = {k: v.to(got[k].dtype) for k, v in
                    _outputs_and_grads(matmul_lowrank_torch, *inputs, torch.float32).items()}
    rounded = [None if v is None else v.double() for v in inputs]
    own = [residual_own_work(r, rounded[0], rounded[1], rounded[2], rounded[5]) for r in (got, exact, baseline)]
    bad = disagreements(*own[:2], x.dtype, baseline=own[2], floors=residual_error_floors(*rounded, x.dtype))
    return "it disagrees with the float64 torch path: " + "; ".join(bad[:3]) if bad else None


def _timed_candidates(x, weight, bias, psi, tokens) -> dict:
    """The two backends' forward GEMMs at the call's real shape, for `dispatch.verified_choice` to time."""
    from .residual_triton import matmul_lowrank_epilogue

    with torch.no_grad():
        x2 = x.detach().reshape(-1, x.shape[-1])
        p, q = x2 @ psi.detach().to(x.dtype), tokens.detach().to(x.dtype)
        w_t = weight.detach().t()
    return {name: functools.partial(fn, x2, w_t, p, q, bias) for name, fn in
            (("torch", matmul_lowrank_torch), ("triton", matmul_lowrank_epilogue))}


def _matrix_layout(stride: tuple[int, int], shape: tuple[int, int]) -> str:
    """``"row-major"`` (unit column stride), ``"column-major"`` (unit row stride) or ``"strided"``; a dim of size 1
    has no stride to speak of."""
    if stride[1] == 1 or shape[1] == 1:
        return "row-major"
    return "column-major" if stride[0] == 1 or shape[0] == 1 else "strided"


def operand_layouts(x, weight) -> str:
    """How x (as the kernel gets it: ``x.reshape(-1, d_in)``, a copy of which is row-major) and W are stored, from
    shapes and strides alone: the Triton kernel's loads (and its stride specialisations) differ by layout, so a
    verdict holds for one layout only."""
    leading = [(n, st) for n, st in zip(x.shape[:-1], x.stride()[:-1]) if n != 1]
    x_layout = "row-major"                         # a unit column stride stays one; a copy (by reshape or kernel) too
    if x.stride(-1) != 1 and x.shape[-1] != 1 and leading:
        merges = all(leading[i][1] == leading[i + 1][1] * leading[i + 1][0] for i in range(len(leading) - 1))
        if merges and leading[-1][1] == 1:         # reshape is a view whose rows are adjacent: the kernel keeps it
            x_layout = "column-major"
    return f"x={x_layout} w={_matrix_layout(weight.stride(), weight.shape)}"


def _verified_backend(x, weight, bias, psi, tokens) -> str:
    """What ``auto`` runs where Triton may: the verdict of `dispatch.verified_choice` (`first_use_check`, then the
    faster of the two forward GEMMs) per shape bucket (rows rounded up to a power of two, and whether they fill
    whole row tiles: ``EVEN_M``, the kernel's specialisation the check runs), dtypes, bias and the layouts of x and W
    (`operand_layouts`; the check runs on the call's x and W, so in their layouts); fp32 also by
    ``torch.get_float32_matmul_precision()``, which sets cuBLAS's speed. The key is built from shapes alone:
    nothing is computed before the lookup."""
    rows = x.numel() // x.shape[-1]
    block_m = residual_launch(rows, weight.shape[0], x.shape[-1], psi.shape[1], x.dtype, device_props(x.device)).block_m
    key = (f"rows<={1 << max(0, rows - 1).bit_length()} d_in={x.shape[-1]} d_out={weight.shape[0]} r={psi.shape[1]} "
           f"{x.dtype} gift={psi.dtype} bias={bias is not None} even_m={rows % block_m == 0} "
           f"{operand_layouts(x, weight)}")
    if x.dtype == torch.float32:
        key += f" matmul={torch.get_float32_matmul_precision()}"
    args = (x, weight, bias, psi, tokens)
    return verified_choice("lowrank_residual_linear", key, x.device, functools.partial(first_use_check, *args),
                           timed=functools.partial(_timed_candidates, *args))


def lowrank_residual_linear(x, weight, bias, psi, tokens, backend: str | None = None):
    """``x W^T + b + (x psi) T^T`` for any leading dims of x; see the module docstring for shapes.

    x, W and b share one dtype; psi and T may be in another. ``backend``: see `dispatch`.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lowrank_residual_linear treats W and b as frozen; call .requires_grad_(False) on them.")
    dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        raise TypeError(f"lowrank_residual_linear needs one dtype for x, W and b, got {sorted(map(str, dtypes))}; "
                        f"cast them (or run under torch.autocast) first.")
    matmul_lowrank = matmul_lowrank_torch
    auto = functools.partial(_verified_backend, x, weight, bias, psi, tokens)
    rows = x.numel() // max(1, x.shape[-1])
    unsupported = residual_triton_unsupported(rows, x.shape[-1], weight.shape[0], psi.shape[1])  # 2^31 elements
    if resolve_backend(x.device, x.dtype, backend, "lowrank_residual_linear", unsupported, auto) == "triton":
        from .residual_triton import matmul_lowrank_epilogue as matmul_lowrank  # once chosen: Triton is optional
    return LowRankResidualLinear.apply(x, weight, bias, psi, tokens, matmul_lowrank)
