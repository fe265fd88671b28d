"""The GIFT generator's parameter modules and their plain-torch math (GIFT_SPEC.md, sections 2-3).

Module and attribute names reproduce the authors' checkpoint layout (spec section 5):
``blocks.{i}.attn.cluster.cluster``, ``blocks.{i}.attn.{q,k,v,proj}``, ``blocks.{i}.mlp.fc{1,2}``.
Every forward takes tokens of shape ``(..., N, r)``: one layer (N x r) or L layers at once
(L x N x r); leading dimensions are a batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GIFTConfig


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (last dim) divided by ``max(||row||_2, 1e-12)``; torch ``F.normalize`` semantics."""
    return F.normalize(x, p=2.0, dim=-1, eps=1e-12)


class ClusterLogits(nn.Module):
    """Holds the cluster projection ``Wc, bc`` (r -> M) under the authors' name ``cluster.cluster``."""

    def __init__(self, rank: int, num_clusters: int):
        super().__init__()
        self.cluster = nn.Linear(rank, num_clusters)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.cluster(u)


class PaCa(nn.Module):
    """Parameter-to-Cluster Attention: ``(..., N, r) -> (..., N, r)``, cost linear in N."""

    def __init__(self, rank: int, num_clusters: int, num_heads: int, cluster_activation: str = "sigmoid"):
        super().__init__()
        self.rank, self.num_clusters, self.num_heads = rank, num_clusters, num_heads
        self.head_dim = rank // num_heads
        self.cluster_activation = cluster_activation
        self.cluster = ClusterLogits(rank, num_clusters)
        self.q = nn.Linear(rank, rank)
        self.k = nn.Linear(rank, rank)
        self.v = nn.Linear(rank, rank)
        self.proj = nn.Linear(rank, rank)

    def cluster_assignment(self, u: torch.Tensor, divide_by_n: bool = True) -> torch.Tensor:
        """Soft assignment C of the N tokens to the M clusters: ``(..., N, r) -> (..., N, M)``.

        ``sigmoid(S) / N`` (the 1/N dropped when ``divide_by_n=False``), or softmax over the N tokens.
        """
        logits = self.cluster(u)
        if self.cluster_activation == "softmax":
            return torch.softmax(logits, dim=-2)
        assignment = torch.sigmoid(logits)
        return assignment / u.shape[-2] if divide_by_n else assignment

    @staticmethod
    def cluster_tokens(u: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
        """Z = l2(C^T U): ``(..., N, r), (..., N, M) -> (..., M, r)``."""
        return l2_normalize(assignment.transpose(-1, -2) @ u)

    def attention_probs(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Per head, softmax over the M clusters of ``Q_j K_j^T / sqrt(r/h)``: ``-> (..., h, N, M)``."""
        scores = self._split_heads(q) @ self._split_heads(k).transpose(-1, -2)
        return torch.softmax(scores / math.sqrt(self.head_dim), dim=-1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z = self.cluster_tokens(u, self.cluster_assignment(u))           # (..., M, r)
        probs = self.attention_probs(self.q(u), self.k(z))               # (..., h, N, M)
        o = probs @ self._split_heads(self.v(z))                         # (..., h, N, r/h)
        return self.proj(self._merge_heads(o))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def _merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(-3, -2).flatten(-2)


class FeedForward(nn.Module):
    """``GELU(X F1^T + f1) F2^T + f2`` with exact (erf) GELU: ``(..., N, r) -> (..., N, r)``."""

    def __init__(self, rank: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(rank, hidden)
        self.fc2 = nn.Linear(hidden, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class GeneratorBlock(nn.Module):
    """Pre-norm block with l2 normalisation: ``T + PaCa(l2 T)``, then ``+ FFN(l2 T)`` (``paca`` only)."""

    def __init__(self, config: GIFTConfig):
        super().__init__()
        self.attn = PaCa(config.rank, config.num_clusters, config.num_heads, config.cluster_activation)
        self.mlp = FeedForward(config.rank, config.mlp_hidden) if config.block == "paca" else None

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t + self.attn(l2_normalize(t))
        if self.mlp is not None:
            t = t + self.mlp(l2_normalize(t))
        return t


class Hypernet(nn.Module):
    """The hyper-Transformer between the two projections: ``(..., N, r) -> (..., N, r)``.

    ``identity`` configs hold no block at all (GIFT v2: dW = W phi^T psi^T).
    """

    def __init__(self, config: GIFTConfig):
        super().__init__()
        count = 0 if config.block == "identity" else config.num_blocks
        self.blocks = nn.ModuleList(GeneratorBlock(config) for _ in range(count))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            t = block(t)
        return t
