"""What several test modules share (importable: ``from tests.helpers import ...``): small models to wrap
and image trees of the local dataset formats. Model-level comparison helpers are `gift.testing`'s."""
import json
import math
import os

import numpy as np
import timm
import torch
import torch.nn as nn
from PIL import Image

from gift.plan import FIT_FRACTION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


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


def tiny_timm_vit(**kw):
    """A seeded 3-block ViT-Ti on 32x32 inputs, 4 classes (timm, random weights)."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, num_classes=4, **kw)


def write_image(path, value: int, fmt=None):
    """A tiny RGB image whose pixels are all ``value`` (so a test can tell images apart)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((5, 7, 3), value, dtype=np.uint8)).save(path, format=fmt)


def broken_image(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not an image")


def fgvc_tree(root, image_dir="images"):
    """Class ids "007", "12" and 3 (an int) in nested class folders; numeric order is 3, 7, 12."""
    base = os.path.join(root, image_dir) if image_dir else root
    splits = {"train": {}, "val": {}, "test": {}}
    counts = {"train": 3, "val": 1, "test": 2}
    for cid, folder in (("007", "007.Sparrow"), ("12", "012.Wren"), (3, "003.Crow")):
        for split, n in counts.items():
            for i in range(n):
                rel = f"{folder}/{split}/{i}.jpg"
                write_image(os.path.join(base, rel), int(cid) * 10 + i, "JPEG")
                splits[split][rel] = cid
    for split, mapping in splits.items():
        with open(os.path.join(root, f"{split}.json"), "w") as f:
            json.dump(mapping, f, indent=2)
    return splits


def vtab_tree(root, task="dtd", labels=(0, 1, 2), image_dir=""):
    """TASK/<split>.txt with paths in subfolders (``images/<split>/<class>/<i>.png``)."""
    folder = os.path.join(root, task)
    counts = {"train800": 2, "val200": 1, "test": 2}
    for split, n in counts.items():
        lines = []
        for label in labels:
            for i in range(n):
                rel = f"{split}/{label}/{i}.png"
                write_image(os.path.join(folder, image_dir, rel) if image_dir else os.path.join(folder, "images", rel),
                            label * 10 + i)
                lines.append(f"{rel if image_dir else 'images/' + rel} {label}")
        with open(os.path.join(folder, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, "train800val200.txt"), "w") as f:
        f.write(open(os.path.join(folder, "train800.txt")).read() + open(os.path.join(folder, "val200.txt")).read())
    return folder


def budget_for(peak: int) -> int:
    """The smallest budget a predicted ``peak`` fits, with the margin kept for the CUDA allocator."""
    return math.ceil(peak / FIT_FRACTION) + 1


# `gift finetune` on a small slice of the embedded dataset, as the command-line tests run it
TINY = ["--train-size", "96", "--val-size", "32", "--batch-size", "32", "--quiet"]


def finetune_run(tmp, name, *extra) -> str:
    """``gift finetune`` of the `TINY` slice into the folder ``tmp/name`` (it must succeed); that folder."""
    from gift.app.cli import main

    out = str(tmp / name)
    assert main(["finetune", *TINY, "--output", out, *extra]) == 0
    return out


def ranks_parsed(*argv) -> tuple[int, int]:
    """(gift_rank, lora_rank) that ``gift COMMAND ...argv`` (finetune, sweep or plan) runs with."""
    from gift.app.cli import build_parser
    from gift.app.commands.plan import PlanOptions
    from gift.app.options import from_namespace
    from gift.app.run_config import FinetuneConfig

    args = build_parser(list(argv)).parse_args(list(argv))
    options = from_namespace(PlanOptions if argv[0] == "plan" else FinetuneConfig, args)
    return options.gift_rank, options.lora_rank


def tiny_hf_vit():
    """A 2-layer Hugging Face ViT on 16 x 16 images, 3 classes, random weights."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                    image_size=16, patch_size=8, num_labels=3)
    return ViTForImageClassification(cfg)
