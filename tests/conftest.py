import os

# Triton kernels run on CPU tensors under the interpreter; it must be set before they are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn as nn

from gift.testing import outputs_and_grads, randomize_gift_, twin_models  # noqa: F401  (tests import them from here)


class ToyAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(attn @ v)


class ToyBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.attn = ToyAttention(dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class ToyViT(nn.Module):
    """A tiny transformer on token inputs (B, P, dim) with timm's ``get_classifier`` API."""

    def __init__(self, dim: int = 12, depth: int = 2, hidden: int = 20, num_classes: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock(dim, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


@pytest.fixture
def toy_vit():
    torch.manual_seed(0)
    return ToyViT()


def tiny_timm_vit(**kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, num_classes=4, **kw)
