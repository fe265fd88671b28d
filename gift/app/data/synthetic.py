"""The embedded synthetic dataset of `gift finetune`, `gift eval` and the demo.

The embedded dataset (`SyntheticShapes`) is made at run time, deterministic by seed, nothing
downloaded: each image holds one object (a circle, square, triangle or cross) filled with one of four
patterns (solid, horizontal stripes, vertical stripes, checker) in a random colour, on a smooth random
background, and comes with its per-pixel object mask. Two labelings of the same kind of images:
``task="shape"`` (the pretraining task) and ``task="pattern"`` (the downstream task).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError

SHAPES = ("circle", "square", "triangle", "cross")
PATTERNS = ("solid", "stripes_h", "stripes_v", "checker")
TASKS = {"shape": SHAPES, "pattern": PATTERNS}


def _shape_mask(kind: int, xx, yy, cx, cy, r):
    dx, dy = xx - cx, yy - cy
    if kind == 0:
        return dx * dx + dy * dy <= r * r
    if kind == 1:
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if kind == 2:
        top, bottom = cy - r, cy + 0.75 * r
        return (yy >= top) & (yy <= bottom) & (np.abs(dx) <= 0.65 * (yy - top))
    arm = r / 3.0
    return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))


def _pattern(kind: int, xx, yy, period: int):
    if kind == 0:
        return np.ones_like(xx, dtype=bool)
    if kind == 1:
        return (yy // period) % 2 == 0
    if kind == 2:
        return (xx // period) % 2 == 0
    return ((xx // period) + (yy // period)) % 2 == 0


def make_shapes(num_images: int, image_size: int = 32, seed: int = 0):
    """``images`` uint8 (N, 3, S, S), ``masks`` bool (N, S, S), ``shapes`` and ``patterns`` int64 (N,)."""
    rng = np.random.default_rng(seed)
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    images = np.empty((num_images, 3, s, s), dtype=np.uint8)
    masks = np.empty((num_images, s, s), dtype=bool)
    shapes = rng.integers(0, len(SHAPES), num_images)
    patterns = rng.integers(0, len(PATTERNS), num_images)
    period = max(1, s // 16)
    for i in range(num_images):
        # smooth background: a random linear gradient between two muted colours, plus faint noise
        c0, c1 = rng.uniform(0.1, 0.6, 3), rng.uniform(0.1, 0.6, 3)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = ((np.cos(angle) * xx + np.sin(angle) * yy) / s + 1.0) / 2.0
        img = c0[:, None, None] * (1 - ramp) + c1[:, None, None] * ramp + rng.normal(0, 0.03, (3, s, s))
        r = rng.uniform(0.22, 0.34) * s
        cx, cy = rng.uniform(r + 1, s - r - 1, 2)
        mask = _shape_mask(int(shapes[i]), xx, yy, cx, cy, r)
        fg = rng.uniform(0.55, 1.0, 3)
        bg = fg * rng.uniform(0.0, 0.35)
        on = _pattern(int(patterns[i]), xx.astype(int), yy.astype(int), period)
        colour = np.where(on[None], fg[:, None, None], bg[:, None, None])
        img = np.where(mask[None], colour, img)
        images[i] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
        masks[i] = mask
    return torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(shapes), torch.from_numpy(patterns)


class SyntheticShapes(Dataset):
    """The embedded dataset: ``(image float (3, S, S) normalised, label)``; ``.masks[i]`` is the object mask.

    Args:
        num_images: how many images; ``seed`` makes them (different seeds: disjoint draws).
        task: ``"shape"`` or ``"pattern"`` labels.
        mean, std: per-channel normalisation (the model's, e.g. timm's data config).
    """

    def __init__(self, num_images: int, image_size: int = 32, seed: int = 0, task: str = "pattern",
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        if task not in TASKS:
            raise DataError(f"unknown task {task!r}; the embedded dataset has {sorted(TASKS)}")
        self.images, self.masks, self.shapes, self.patterns = make_shapes(num_images, image_size, seed)
        self.task = task
        self.classes = list(TASKS[task])
        self.labels = self.shapes if task == "shape" else self.patterns
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def raw_image(self, i: int) -> torch.Tensor:
        return self.images[i]

    def __getitem__(self, i: int):
        x = (self.images[i].float() / 255.0 - self.mean) / self.std
        return x, int(self.labels[i])


@dataclass
class EmbeddedSpec:
    """What the embedded dataset's splits are drawn from: ``train`` from ``data_seed``, ``val`` from
    ``data_seed + 1`` and ``test`` from ``data_seed + 2`` (disjoint draws)."""

    task: str = "pattern"
    train_size: int = 2000
    val_size: int = 1000
    data_seed: int = 0
