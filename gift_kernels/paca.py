"""The PaCa attention-to-cluster step of a hyper-Transformer block, for L layers at once.

    paca_attention(T, params) = T + PaCa(l2(T))                 T: (L, N, r) -> (L, N, r)

with PaCa as in GIFT_SPEC.md section 3 (M clusters, h heads, every linear map with bias):
    U = l2(T);  C = sigmoid(U Wc^T + bc) / N  (or softmax over N);  Z = l2(C^T U)
    Q = U Wq^T + bq;  K = Z Wk^T + bk;  V = Z Wv^T + bv
    A_j = softmax_M(Q_j K_j^T / sqrt(r/h));  O = concat_j(A_j V_j);  out = T + O Wp^T + bp

Parameters are passed as ``PacaParams`` (weights ``(out, in)`` like ``nn.Linear``). The torch path
saves only T and the (M x r) cluster tokens Z with their norms; backward recomputes the rest. Wq is folded into the cluster keys and Wp into the cluster
values (see `_cluster_side`), so the N-row side costs 4 GEMMs forward and 10 backward.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .dispatch import resolve_backend
from .launch import device_props, paca_triton_unsupported

EPS = 1e-12  # l2 normalisation: x / max(||x||, EPS), torch F.normalize semantics


class PacaParams(NamedTuple):
    """``cluster_w`` (M, r), ``cluster_b`` (M,), ``q_w``/``k_w``/``v_w``/``proj_w`` (r, r), biases (r,)."""

    cluster_w: torch.Tensor
    cluster_b: torch.Tensor
    q_w: torch.Tensor
    q_b: torch.Tensor
    k_w: torch.Tensor
    k_b: torch.Tensor
    v_w: torch.Tensor
    v_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor


def _l2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = x.norm(dim=-1, keepdim=True)
    return x / norm.clamp_min(EPS), norm


def _l2_backward(grad: torch.Tensor, y: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Gradient through y = x / max(||x||, EPS), given y and ||x|| (the projection drops out below EPS)."""
    dot = (grad * y).sum(-1, keepdim=True) * (norm >= EPS)
    return torch.addcmul(grad, y, dot, value=-1.0) / norm.clamp_min(EPS)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x.unflatten(-1, (num_heads, -1)).transpose(-3, -2)          # (L, h, rows, r/h)


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-3, -2).flatten(-2)


def _assignment(u, p: PacaParams, activation: str):
    logits = F.linear(u, p.cluster_w, p.cluster_b)
    if activation == "softmax":
        return torch.softmax(logits, dim=-2), None
    sig = torch.sigmoid(logits)
    return sig / u.shape[-2], sig


def paca_attention_reference(t: torch.Tensor, p: PacaParams, num_heads: int, activation: str = "sigmoid") -> torch.Tensor:
    """Plain-torch reference, differentiated by autograd."""
    u = torch.nn.functional.normalize(t, dim=-1, eps=EPS)
    logits = u @ p.cluster_w.t() + p.cluster_b
    c = torch.softmax(logits, dim=-2) if activation == "softmax" else torch.sigmoid(logits) / t.shape[-2]
    z = torch.nn.functional.normalize(c.transpose(-1, -2) @ u, dim=-1, eps=EPS)
    q, k, v = u @ p.q_w.t() + p.q_b, z @ p.k_w.t() + p.k_b, z @ p.v_w.t() + p.v_b
    d = t.shape[-1] // num_heads
    a = torch.softmax(_heads(q, num_heads) @ _heads(k, num_heads).transpose(-1, -2) / math.sqrt(d), dim=-1)
    return t + _merge(a @ _heads(v, num_heads)) @ p.proj_w.t() + p.proj_b


def _cluster_side(z: torch.Tensor, p: PacaParams, num_heads: int, scale: float):
    """Everything PaCa computes on the M cluster tokens (cheap: M rows), with Wq folded into the keys
    and Wp into the values so that the N-row side needs two GEMMs:

        logits = U Kq^T + cq       Kq (L, h*M, r): row (j, m) = scale * Wq_j^T K_j[m];  cq = scale * K_j[m] . bq_j
        out    = A Vp + bp + T     Vp (L, h*M, r): row (j, m) = V_j[m] Wp_j^T;          A = softmax per head
    """
    L, M, r = z.shape
    d = r // num_heads
    kh = _heads(F.linear(z, p.k_w, p.k_b), num_heads)                   # (L, h, M, d)
    vh = _heads(F.linear(z, p.v_w, p.v_b), num_heads)
    wq_h = p.q_w.view(num_heads, d, r)                                   # (h, d, r)
    wp_h = p.proj_w.view(r, num_heads, d).permute(1, 2, 0)               # (h, d, r)
    kq = (kh @ wq_h * scale).reshape(L, num_heads * M, r)
    cq = (kh @ p.q_b.view(num_heads, d, 1) * scale).reshape(L, 1, num_heads * M)
    vp = (vh @ wp_h).reshape(L, num_heads * M, r)
    return kh, vh, wq_h, wp_h, kq, cq, vp


def _probs(u, kq, cq, num_heads):
    """Attention probabilities ``(L, N, h, M)``: softmax over the M clusters of each head."""
    return torch.softmax(torch.baddbmm(cq, u, kq.transpose(-1, -2)).unflatten(-1, (num_heads, -1)), dim=-1)


def _cluster_side_backward(z, p_norm, p: PacaParams, num_heads, scale, kh, vh, wq_h, wp_h, dkq, dcq, dvp):
    """Backward of `_cluster_side` and of Z = l2(P): from dKq, dcq (L, hM) and dVp to dP (L, M, r) and
    the gradients of Wq, bq, Wk, bk, Wv, bv, Wp (the other fields of the returned PacaParams are None)."""
    L, M, r = z.shape
    h, d = num_heads, r // num_heads
    dkq_h, dvp_h, dcq_h = dkq.view(L, h, -1, r), dvp.view(L, h, -1, r), dcq.view(L, h, -1, 1)
    dkh = (dkq_h @ wq_h.transpose(-1, -2) + dcq_h * p.q_b.view(1, h, 1, d)) * scale
    d_q_w = (kh.transpose(-1, -2) @ dkq_h).sum(0).reshape(r, r) * scale
    d_q_b = (kh * dcq_h).sum((0, 2)).reshape(r) * scale
    dvh = dvp_h @ wp_h.transpose(-1, -2)                                  # (L, h, M, d)
    d_proj_w = (vh.transpose(-1, -2) @ dvp_h).sum(0).permute(2, 0, 1).reshape(r, r)
    dk, dv = _merge(dkh).reshape(L * M, r), _merge(dvh).reshape(L * M, r)
    z2 = z.reshape(L * M, r)
    dz = (dk @ p.k_w + dv @ p.v_w).view(L, M, r)
    dp = _l2_backward(dz, z, p_norm)                                      # (L, M, r)
    grads = PacaParams(None, None, d_q_w, d_q_b, dk.t() @ z2, dk.sum(0), dv.t() @ z2, dv.sum(0), d_proj_w, None)
    return dp, grads


class PacaAttentionTorch(torch.autograd.Function):
    """Torch path: hand-written backward, probabilities recomputed from the saved log-sum-exp."""

    @staticmethod
    def forward(ctx, t, num_heads, activation, *params):
        p = PacaParams(*params)
        scale = 1.0 / math.sqrt(t.shape[-1] // num_heads)
        u, t_norm = _l2(t)
        c, _ = _assignment(u, p, activation)
        z, p_norm = _l2(c.transpose(-1, -2) @ u)                          # (L, M, r)
        _, _, _, _, kq, cq, vp = _cluster_side(z, p, num_heads, scale)
        a = _probs(u, kq, cq, num_heads)                                  # (L, N, h, M)
        out = torch.baddbmm(t + p.proj_b, a.flatten(-2), vp)
        ctx.save_for_backward(t, t_norm, z, p_norm, *params)
        ctx.num_heads, ctx.activation, ctx.scale = num_heads, activation, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        t, t_norm, z, p_norm, *params = ctx.saved_tensors
        p = PacaParams(*params)
        h, scale = ctx.num_heads, ctx.scale
        L, N, r = t.shape
        u = t / t_norm.clamp_min(EPS)
        c, sig = _assignment(u, p, ctx.activation)
        kh, vh, wq_h, wp_h, kq, cq, vp = _cluster_side(z, p, h, scale)
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
        dp, cluster_grads = _cluster_side_backward(z, p_norm, p, h, scale, kh, vh, wq_h, wp_h, dkq, dcq, dvp)
        dc = u @ dp.transpose(-1, -2)                                     # (L, N, M)
        if ctx.activation == "softmax":
            dlogits_c = c * (dc - (dc * c).sum(-2, keepdim=True))
        else:
            dlogits_c = torch.ops.aten.sigmoid_backward(dc, sig).div_(N)
        du = du.baddbmm_(c, dp).baddbmm_(dlogits_c, p.cluster_w.expand(L, -1, -1))
        dt = grad_out + _l2_backward(du, u, t_norm)
        grads = cluster_grads._replace(cluster_w=flat(dlogits_c).t() @ flat(u), cluster_b=flat(dlogits_c).sum(0),
                                       proj_b=flat(grad_out).sum(0))
        return (dt, None, None, *grads)


def paca_attention(t: torch.Tensor, params: PacaParams, num_heads: int, activation: str = "sigmoid",
                   backend: str | None = None) -> torch.Tensor:
    """``T + PaCa(l2(T))`` for tokens ``t`` of shape ``(L, N, r)``; see the module docstring.

    ``backend``: ``"auto" | "torch" | "triton"`` (default: the ``GIFT_KERNELS`` variable, see `dispatch`).
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
    unsupported = paca_triton_unsupported(params.cluster_w.shape[0], t.shape[-1], t.dtype, device_props(t.device))
    if resolve_backend(t.device, t.dtype, backend, "paca_attention", unsupported) == "triton":
        from .paca_triton import PacaAttentionTriton

        return PacaAttentionTriton.apply(t, num_heads, activation, *params)
    if t.dtype in (torch.float16, torch.bfloat16):  # the torch path computes 16-bit inputs in fp32
        return PacaAttentionTorch.apply(t.float(), num_heads, activation, *(x.float() for x in params)).to(t.dtype)
    return PacaAttentionTorch.apply(t, num_heads, activation, *params)
