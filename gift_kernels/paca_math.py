"""What the PaCa ops share, in plain torch: the parameters, l2 normalisation and its backward, the head
split, the cluster side with its backward, and the reference.

PaCa (GIFT_SPEC.md section 3; M clusters, h heads, every linear map with bias), for tokens T (L, N, r):
    U = l2(T);  C = sigmoid(U Wc^T + bc) / N  (or softmax over N);  Z = l2(C^T U)
    Q = U Wq^T + bq;  K = Z Wk^T + bk;  V = Z Wv^T + bv
    A_j = softmax_M(Q_j K_j^T / sqrt(r/h));  O = concat_j(A_j V_j);  out = T + O Wp^T + bp
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

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


def l2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / max(||x||, EPS), ||x||)`` over the last dim; the norm keeps that dim (size 1)."""
    norm = x.norm(dim=-1, keepdim=True)
    return x / norm.clamp_min(EPS), norm


def l2_backward(grad: torch.Tensor, y: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Gradient through y = x / max(||x||, EPS), given y and ||x|| (the projection drops out below EPS)."""
    dot = (grad * y).sum(-1, keepdim=True) * (norm >= EPS)
    return torch.addcmul(grad, y, dot, value=-1.0) / norm.clamp_min(EPS)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(L, rows, r)`` -> ``(L, h, rows, r/h)``."""
    return x.unflatten(-1, (num_heads, -1)).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(L, h, rows, r/h)`` -> ``(L, rows, r)``; the inverse of `split_heads`."""
    return x.transpose(-3, -2).flatten(-2)


def paca_attention_reference(t: torch.Tensor, p: PacaParams, num_heads: int,
                             activation: str = "sigmoid") -> torch.Tensor:
    """Plain-torch reference for tokens ``t`` (L, N, r), differentiated by autograd."""
    u = torch.nn.functional.normalize(t, dim=-1, eps=EPS)
    logits = u @ p.cluster_w.t() + p.cluster_b
    c = torch.softmax(logits, dim=-2) if activation == "softmax" else torch.sigmoid(logits) / t.shape[-2]
    z = torch.nn.functional.normalize(c.transpose(-1, -2) @ u, dim=-1, eps=EPS)
    q, k, v = u @ p.q_w.t() + p.q_b, z @ p.k_w.t() + p.k_b, z @ p.v_w.t() + p.v_b
    d = t.shape[-1] // num_heads
    a = torch.softmax(split_heads(q, num_heads) @ split_heads(k, num_heads).transpose(-1, -2) / math.sqrt(d), dim=-1)
    return t + merge_heads(a @ split_heads(v, num_heads)) @ p.proj_w.t() + p.proj_b


def cluster_side(z: torch.Tensor, p: PacaParams, num_heads: int, scale: float):
    """Everything PaCa computes on the M cluster tokens ``z`` (L, M, r) (cheap: M rows), with Wq folded into
    the keys and Wp into the values so that the N-row side needs two GEMMs:

        logits = U Kq^T + cq       Kq (L, h*M, r): row (j, m) = scale * Wq_j^T K_j[m];  cq = scale * K_j[m] . bq_j
        out    = A Vp + bp + T     Vp (L, h*M, r): row (j, m) = V_j[m] Wp_j^T;          A = softmax per head

    Returns ``(kh, vh, wq_h, wp_h, kq, cq, vp)``: the keys and values per head (L, h, M, r/h), Wq and Wp per
    head (h, r/h, r), then Kq, cq (L, 1, h*M) and Vp.
    """
    L, M, r = z.shape
    d = r // num_heads
    kh = split_heads(F.linear(z, p.k_w, p.k_b), num_heads)              # (L, h, M, d)
    vh = split_heads(F.linear(z, p.v_w, p.v_b), num_heads)
    wq_h = p.q_w.view(num_heads, d, r)                                   # (h, d, r)
    wp_h = p.proj_w.view(r, num_heads, d).permute(1, 2, 0)               # (h, d, r)
    kq = (kh @ wq_h * scale).reshape(L, num_heads * M, r)
    cq = (kh @ p.q_b.view(num_heads, d, 1) * scale).reshape(L, 1, num_heads * M)
    vp = (vh @ wp_h).reshape(L, num_heads * M, r)
    return kh, vh, wq_h, wp_h, kq, cq, vp


def cluster_side_backward(z, p_norm, p: PacaParams, num_heads, scale, kh, vh, wq_h, wp_h, dkq, dcq, dvp):
    """Backward of `cluster_side` and of Z = l2(P): from dKq, dcq (L, hM) and dVp to dP (L, M, r) and
    the gradients of Wq, bq, Wk, bk, Wv, bv, Wp (the other fields of the returned PacaParams are None)."""
    L, M, r = z.shape
    h, d = num_heads, r // num_heads
    dkq_h, dvp_h, dcq_h = dkq.view(L, h, -1, r), dvp.view(L, h, -1, r), dcq.view(L, h, -1, 1)
    dkh = (dkq_h @ wq_h.transpose(-1, -2) + dcq_h * p.q_b.view(1, h, 1, d)) * scale
    d_q_w = (kh.transpose(-1, -2) @ dkq_h).sum(0).reshape(r, r) * scale
    d_q_b = (kh * dcq_h).sum((0, 2)).reshape(r) * scale
    dvh = dvp_h @ wp_h.transpose(-1, -2)                                  # (L, h, M, d)
    d_proj_w = (vh.transpose(-1, -2) @ dvp_h).sum(0).permute(2, 0, 1).reshape(r, r)
    dk, dv = merge_heads(dkh).reshape(L * M, r), merge_heads(dvh).reshape(L * M, r)
    z2 = z.reshape(L * M, r)
    dz = (dk @ p.k_w + dv @ p.v_w).view(L, M, r)
    dp = l2_backward(dz, z, p_norm)                                       # (L, M, r)
    grads = PacaParams(None, None, d_q_w, d_q_b, dk.t() @ z2, dk.sum(0), dv.t() @ z2, dv.sum(0), d_proj_w, None)
    return dp, grads
