"""The feed-forward half of a pre-norm block with l2 normalisation, for L layers at once:

    l2_mlp_residual(T) = T + GELU(l2(T) W1^T + b1) W2^T + b2        T: (L, N, r); W1: (hidden, r); W2: (r, hidden)

exact (erf) GELU. The torch path saves T and the pre-activation H only (not l2(T) or GELU(H)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .paca_math import EPS, l2, l2_backward


def l2_mlp_residual_reference(t, fc1_w, fc1_b, fc2_w, fc2_b):
    """Plain-torch reference, differentiated by autograd."""
    return t + F.linear(F.gelu(F.linear(F.normalize(t, dim=-1, eps=EPS), fc1_w, fc1_b)), fc2_w, fc2_b)


class L2MlpResidualTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, fc1_w, fc1_b, fc2_w, fc2_b):
        u, norm = l2(t)
        hidden = F.linear(u, fc1_w, fc1_b)
        ctx.save_for_backward(t, norm, hidden, fc1_w, fc2_w)
        return torch.addmm(fc2_b, F.gelu(hidden).flatten(0, -2), fc2_w.t()).view_as(t).add_(t)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        t, norm, hidden, fc1_w, fc2_w = ctx.saved_tensors
        u = t / norm.clamp_min(EPS)
        g2, h2, u2 = grad_out.flatten(0, -2), hidden.flatten(0, -2), u.flatten(0, -2)
        d_hidden = torch.ops.aten.gelu_backward(g2 @ fc2_w, h2)
        d_fc2_w = g2.t() @ F.gelu(h2)
        d_fc1_w = d_hidden.t() @ u2
        du = (d_hidden @ fc1_w).view_as(t)
        dt = grad_out + l2_backward(du, u, norm)
        return dt, d_fc1_w, d_hidden.sum(0), d_fc2_w, g2.sum(0)


def l2_mlp_residual(t, fc1_w, fc1_b, fc2_w, fc2_b):
    """``T + GELU(l2(T) W1^T + b1) W2^T + b2`` for tokens ``(..., N, r)``."""
    return L2MlpResidualTorch.apply(t, fc1_w, fc1_b, fc2_w, fc2_b)
