"""The PaCa attention-to-cluster step of a hyper-Transformer block, for L layers at once: the dispatcher and
the torch path.

    paca_attention(T, params) = T + PaCa(l2(T))                 T: (L, N, r) -> (L, N, r)

with PaCa as in GIFT_SPEC.md section 3 (the formulas, parameters and reference: `paca_math`). Parameters are
passed as ``PacaParams`` (weights ``(out, in)`` like ``nn.Linear``). The torch path saves only T and the
(M x r) cluster tokens Z with their norms; backward recomputes the rest. Wq is folded into the cluster keys
and Wp into the cluster values (see `paca_math.cluster_side`), so the N-row side costs 4 GEMMs forward and
10 backward. The Triton path: `paca_triton`; under ``auto`` it is checked on its first use per shape, dtype and
device (`dispatch.verified_choice`, `first_use_check`).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .agreement import disagreements, full_precision_matmul, paca_error_floors, paca_own_work, paca_zero_gradients
from .dispatch import resolve_backend, verified_choice
from .launch import device_props, paca_triton_index_unsupported, paca_triton_unsupported
from .paca_math import EPS, PacaParams, cluster_side, cluster_side_backward, l2, l2_backward


def _assignment(u, p: PacaParams, activation: str):
    logits = F.linear(u, p.cluster_w, p.cluster_b)
    if activation == "softmax":
        return torch.softmax(logits, dim=-2), None
    sig = torch.sigmoid(logits)
    return sig / u.shape[-2], sig


def _probs(u, kq, cq, num_heads):
    """Attention probabilities ``(L, N, h, M)``: softmax over the M clusters of each head."""
    return torch.softmax(torch.baddbmm(cq, u, kq.transpose(-1, -2)).unflatten(-1, (num_heads, -1)), dim=-1)


class PacaAttentionTorch(torch.autograd.Function):
    """Torch path: hand-written backward, probabilities recomputed from the saved log-sum-exp."""

    @staticmethod
    def forward(ctx, t, num_heads, activation, *params):
        p = PacaParams(*params)
        scale = 1.0 / math.sqrt(t.shape[-1] // num_heads)
        u, t_norm = l2(t)
        c, _ = _assignment(u, p, activation)
        z, p_norm = l2(c.transpose(-1, -2) @ u)                          # (L, M, r)
        _, _, _, _, kq, cq, vp = cluster_side(z, p, num_heads, scale)
        a = _probs(u, kq, cq, num_heads)                                  # (L, N, h, M)
        out = torch.baddbmm(t + p.proj_b, a.flatten(-2), vp)
        ctx.save_for_backward(t, t_norm, z, p_norm, *params)
        ctx.num_heads, ctx.activation, ctx.scale = num_heads, activation, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        t, t_norm, z, p_norm, *params = ctx.saved_tensors
        p = PacaParams(*params)
        h, scale = ctx.num_heads, ctx.scale
        L, N, r = t.shape
        u = t / t_norm.clamp_min(EPS)
        c, sig = _assignment(u, p, ctx.activation)
        kh, vh, wq_h, wp_h, kq, cq, vp = cluster_side(z, p, h, scale)
        a = _probs(u, kq, cq, h)                                          # (L, N, h, M)
        a_flat = a.flatten(-2)

        def flat(x):
            return x.reshape(-1, x.shape[-1])

        # the N-row side: four GEMMs
        da = (grad_out @ vp.transpose(-1, -2)).unflatten(-1, (h, -1))     # (L, N, h, M)
        dvp = a_flat.transpose(-1, -2) @ grad_out                         # (L, hM, r)
        dlogits = torch._softmax_backward_data(da, a, -1, a.dtype).flatten(-2)   # (L, N, hM)
        dkq = dlogits.transpose(-1, -2) @ u                               # (L, hM, r)
        du = dlogits @ kq                                                 # (L, N, r)
        dcq = dlogits.sum(1)                                              # (L, hM)
        dp, cluster_grads = cluster_side_backward(z, p_norm, p, h, scale, kh, vh, wq_h, wp_h, dkq, dcq, dvp)
        dc = u @ dp.transpose(-1, -2)                                     # (L, N, M)
        if ctx.activation == "softmax":
            dlogits_c = c * (dc - (dc * c).sum(-2, keepdim=True))
        else:
            dlogits_c = torch.ops.aten.sigmoid_backward(dc, sig).div_(N)
        du = du.baddbmm_(c, dp).baddbmm_(dlogits_c, p.cluster_w.expand(L, -1, -1))
        dt = grad_out + l2_backward(du, u, t_norm)
        grads = cluster_grads._replace(cluster_w=flat(dlogits_c).t() @ flat(u), cluster_b=flat(dlogits_c).sum(0),
                                       proj_b=flat(grad_out).sum(0))
        return (dt, None, None, *grads)


def _outputs_and_grads(apply, t, params, num_heads: int, activation: str, grad: torch.Tensor,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Output and every gradient of ``apply(t, num_heads, activation, *params)`` on detached copies in ``dtype``."""
    with torch.enable_grad():
        leaves = [x.detach().to(dtype).requires_grad_(True) for x in (t, *params)]
        out = apply(leaves[0], num_heads, activation, *leaves[1:])
        grads = torch.autograd.grad(out, leaves, grad.to(dtype))
    return {"output": out.detach(), **{f"d_{n}": g for n, g in zip(["t", *PacaParams._fields], grads)}}


# `first_use_operands`: the cluster assignment's weights (times each cluster's direction) and bias, so that each
# direction's tokens are picked out; query and key weights near this times the identity (sharp attention); the
# gap between the odd and the even heads' logits, half of it each way: past fp32 exp's range (~88), so that another
# head's log-sum-exp over- or underflows the exp, but each half within it (the masked rows' logits are the bias's)
FIRST_USE_ASSIGNMENT_GAIN, FIRST_USE_ASSIGNMENT_BIAS = 8.0, -4.0
FIRST_USE_QK_GAIN = 8.0
FIRST_USE_HEAD_OFFSET = 150.0


def first_use_operands(t: torch.Tensor, params: PacaParams, num_heads: int) -> tuple[torch.Tensor, PacaParams]:
    """Seeded random ``(t (L, N, r), params)`` of the call's shapes, dtype and device for the first-use check, on
    which every part of the kernels shows whatever the call's values: tokens near M random unit directions (rows of
    norm ~sqrt(r)), an assignment that picks each direction's tokens out and query and key weights near
    ``FIRST_USE_QK_GAIN`` x the identity, so that each token attends mostly to its own cluster; and with 2+ heads,
    the odd heads' logits shifted up and the even heads' down by half ``FIRST_USE_HEAD_OFFSET`` for every cluster
    (each head's first query coordinate a constant ``c``, its key coordinate ``+-c`` without weights, ``c^2 /
    sqrt(r / heads)`` the half), so that neighbouring heads' log-sum-exps lie far apart. The call's own values are
    GIFT's initial ones: near-uniform attention and heads alike, on which a kernel wrong only for sharp attention,
    or reading another head's log-sum-exp, agrees."""
    L, N, r = t.shape
    M, d = params.cluster_w.shape[0], r // num_heads
    gen = torch.Generator(t.device).manual_seed(2)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=t.device) * scale

    directions = F.normalize(rnd(M, r), dim=-1)
    which = torch.randint(M, (L, N), generator=gen, device=t.device)
    tokens = (directions[which] + rnd(L, N, r, scale=0.3 / math.sqrt(r))) * math.sqrt(r)
    eye = torch.eye(r, device=t.device)
    q_w, k_w = (FIRST_USE_QK_GAIN * eye + rnd(r, r, scale=0.1 / math.sqrt(r)) for _ in range(2))
    q_b, k_b = rnd(r, scale=0.3), rnd(r, scale=0.3)
    if num_heads > 1:
        c = math.sqrt(FIRST_USE_HEAD_OFFSET / 2 * math.sqrt(d))
        first = torch.arange(0, r, d, device=t.device)                    # each head's first coordinate
        q_b[first], k_w[first] = c, 0.0
        k_b[first] = c * (torch.arange(num_heads, device=t.device) % 2 * 2 - 1).float()   # -c even, +c odd heads
    zeros = torch.zeros(r, device=t.device)
    synthetic = PacaParams(
        cluster_w=FIRST_USE_ASSIGNMENT_GAIN * directions,
        cluster_b=torch.full((M,), FIRST_USE_ASSIGNMENT_BIAS, device=t.device),
        q_w=q_w, q_b=q_b, k_w=k_w, k_b=k_b, v_w=rnd(r, r, scale=1 / math.sqrt(r)), v_b=zeros,
        proj_w=rnd(r, r, scale=1 / math.sqrt(r)), proj_b=zeros)
    return tokens.to(t.dtype), PacaParams(*(x.to(p.dtype) for x, p in zip(synthetic, params)))


def first_use_check(t: torch.Tensor, params: PacaParams, num_heads: int, activation: str = "sigmoid") -> str | None:
    """None if the Triton kernels agree with the torch path, forward and backward (a seeded random output gradient),
    on inputs of the call's shapes, dtype and device with sharp attention and far-apart heads
    (`first_use_operands`), so on the kernels' specialisation of the call; else how they disagree. The rule is the
    tests': the Triton results against the float64 torch path, the fp32 torch path rounded to t's dtype as the
    baseline, own work and rounding floors included (`agreement`), torch's fp32 matmuls at full precision
    (`agreement.full_precision_matmul`). An exception of the Triton kernels propagates (`dispatch.verified_choice`
    reports it)."""
    from .paca_triton import PacaAttentionTriton  # Triton is optional: imported once it is to be checked

    t, params = first_use_operands(t, params, num_heads)
    dtype = t.dtype
    gen = torch.Generator(t.device).manual_seed(0)
    grad = torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float32).to(dtype)
    with torch.autocast(t.device.type, enabled=False), full_precision_matmul():
        got = _outputs_and_grads(PacaAttentionTriton.apply, t, params, num_heads, activation, grad, dtype)
        exact = _outputs_and_grads(PacaAttentionTorch.apply, t, params, num_heads, activation, grad, torch.float64)
        baseline = {k: v.to(dtype) for k, v in _outputs_and_grads(PacaAttentionTorch.apply, t, params, num_heads,
                                                                   activation, grad, torch.float32).items()}
    inputs = [x.detach().double() for x in (t, *params, grad)]
    own = [paca_own_work(r, inputs[0], inputs[-1]) for r in (got, exact, baseline)]
    M, N = params.cluster_w.shape[0], t.shape[1]
    bad = disagreements(*own[:2], dtype, baseline=own[2], zero_by_construction=paca_zero_gradients(M, N, activation),
                        floors=paca_error_floors(inputs[0], inputs[1:-1], inputs[-1], num_heads, dtype, exact,
                                                 activation))
    return "it disagrees with the float64 torch path: " + "; ".join(bad[:3]) if bad else None


def _verified_backend(t: torch.Tensor, params: PacaParams, num_heads: int, activation: str) -> str:
    """What ``auto`` runs where Triton may: the verdict of `dispatch.verified_choice` on `first_use_check`, per
    exact shape (PaCa's shapes are fixed per model), heads, assignment and dtype."""
    L, N, r = t.shape
    key = f"L={L} N={N} M={params.cluster_w.shape[0]} r={r} heads={num_heads} {activation} {t.dtype}"
    return verified_choice("paca_attention", key, t.device,
                           functools.partial(first_use_check, t, params, num_heads, activation))


def paca_attention(t: torch.Tensor, params: PacaParams, num_heads: int, activation: str = "sigmoid",
                   backend: str | None = None) -> torch.Tensor:
    """``T + PaCa(l2(T))`` for tokens ``t`` of shape ``(L, N, r)``; see the module docstring.

    ``backend``: ``"auto" | "torch" | "triton"`` (default: the ``GIFT_BACKEND`` variable, see `dispatch`).
    """
    if t.dim() != 3:
        raise ValueError(f"paca_attention expects tokens of shape (L, N, r), got {tuple(t.shape)}.")
    if t.shape[-1] % num_heads:
        raise ValueError(f"paca_attention: r={t.shape[-1]} is not divisible by num_heads={num_heads}.")
    if activation not in ("sigmoid", "softmax"):
        raise ValueError(f"paca_attention: activation {activation!r} is not 'sigmoid' or 'softmax'.")
    dtypes = {t.dtype} | {p.dtype for p in params}
    if len(dtypes) != 1:
        raise TypeError(f"paca_attention needs one dtype for tokens and parameters, got {sorted(map(str, dtypes))}.")
    unsupported = (paca_triton_index_unsupported(*t.shape, num_heads)
                   or paca_triton_unsupported(params.cluster_w.shape[0], t.shape[-1], t.dtype, device_props(t.device)))
    auto = functools.partial(_verified_backend, t, params, num_heads, activation)
    if resolve_backend(t.device, t.dtype, backend, "paca_attention", unsupported, auto=auto) == "triton":
        from .paca_triton import PacaAttentionTriton  # imported once chosen: Triton is optional

        return PacaAttentionTriton.apply(t, num_heads, activation, *params)
    if t.dtype in (torch.float16, torch.bfloat16):  # the torch path computes 16-bit inputs in fp32
        return PacaAttentionTorch.apply(t.float(), num_heads, activation, *(x.float() for x in params)).to(t.dtype)
    return PacaAttentionTorch.apply(t, num_heads, activation, *params)
