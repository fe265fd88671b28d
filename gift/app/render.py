"""Pictures as PNG files: explainer overlays and grids (Pillow), training curves (matplotlib, an
optional extra: `curves_unavailable` says in one line what to install)."""
from __future__ import annotations

import colorsys
import os

import numpy as np

from ..files import atomic_write
from .errors import missing_extra


def palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours (uint8), evenly spread in hue."""
    return np.array(
        [[int(255 * c) for c in colorsys.hsv_to_rgb(i / max(n, 1), 0.75, 0.95)] for i in range(n)], np.uint8
    )


def heat(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8, dark blue through red to yellow."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[0, 0, 80], [0, 80, 255], [255, 40, 0], [255, 230, 0]], np.float32)
    pos = v * (len(stops) - 1)
    i = np.clip(pos.astype(int), 0, len(stops) - 2)
    t = pos - i
    return (stops[i[..., 0]] * (1 - t) + stops[i[..., 0] + 1] * t).astype(np.uint8)


def _save_png(image: np.ndarray, path: str, scale: int = 1) -> None:
    from PIL import Image

    im = Image.fromarray(image)
    if scale > 1:
        im = im.resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def unique_stems(names) -> list[str]:
    """One file-name stem per image path, unique among ``names``: the base name without its extension,
    with as many parent folders as it takes to tell two files apart (``cat/0.png``, ``dog/0.png`` ->
    ``cat_0``, ``dog_0``), and ``_2``, ``_3``... (the first not the stem of another file) for one file given
    again (or two that differ only in their extension)."""
    def key(name) -> str:
        return os.path.splitext(os.path.normpath(os.path.abspath(str(name))))[0]

    paths = list(dict.fromkeys(key(n) for n in names))
    parts = [[p for p in path.split(os.sep) if p] for path in paths]
    depth = [1] * len(parts)
    while True:
        stems = ["_".join(p[-d:]) or "image" for p, d in zip(parts, depth)]
        clashing = [i for i, s in enumerate(stems) if stems.count(s) > 1 and depth[i] < len(parts[i])]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    of_path = dict(zip(paths, stems))
    taken, unique = set(stems), []  # a suffix never takes the stem of another file (``0_2.png``)
    for name in names:
        stem = of_path[key(name)]
        if stem in unique:
            n = 2
            while f"{stem}_{n}" in taken or f"{stem}_{n}" in unique:
                n += 1
            stem = f"{stem}_{n}"
        unique.append(stem)
    return unique


def write_pngs(raw_images, result, out_dir: str, names, top_k: int) -> list[str]:
    """Per image (``raw_images``: (H, W, 3) uint8 arrays; ``result``: `gift.ClusterMaps`): top-k cluster
    overlays per layer, the hard segmentation, and a per-layer grid, named after the image (``names``,
    `unique_stems`). Returns the paths written, each once."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    layers = sorted(result.maps)
    for b, (img, stem) in enumerate(zip(raw_images, unique_stems(names))):
        rows = []
        for layer in layers:
            maps = result.maps[layer][b].numpy()                                   # (M, H, W)
            seg = result.segmentation[layer][b].numpy()
            area = np.bincount(seg.ravel(), minlength=maps.shape[0])
            strongest = np.argsort(-area, kind="stable")[:top_k]
            seg_rgb = palette(maps.shape[0])[seg]
            tiles = [img, seg_rgb]
            for m in strongest:
                tiles.append((0.45 * img + 0.55 * heat(maps[m])).astype(np.uint8))
                written.append(os.path.join(out_dir, f"{stem}_layer{layer}_cluster{m}.png"))
                _save_png(tiles[-1], written[-1])
            written.append(os.path.join(out_dir, f"{stem}_layer{layer}_segmentation.png"))
            _save_png(seg_rgb, written[-1])
            tiles += [np.zeros_like(img)] * (2 + top_k - len(tiles))
            rows.append(np.concatenate(tiles, 1))
        grid = np.concatenate(rows, 0)
        written.append(os.path.join(out_dir, f"{stem}_grid.png"))
        _save_png(grid, written[-1], scale=max(1, 256 // img.shape[0]))
    return written


def curves_unavailable() -> str | None:
    """None when curves can be drawn; else one line naming the extra to install."""
    return missing_extra("matplotlib", "plots", "curves.png")


def write_curves(path: str, history: list[dict]) -> None:
    """Train loss and val top-1 per epoch, side by side, as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [h["epoch"] for h in history]
    ax[0].plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax[0].set_title("train loss")
    ax[1].plot(epochs, [h["val_top1"] for h in history], marker="o", color="tab:green")
    ax[1].set_title("val top-1")
    for a in ax:
        a.set_xlabel("epoch")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
