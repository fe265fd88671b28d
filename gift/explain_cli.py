"""``gift explain``: PNG cluster maps of images for a saved GIFT adapter."""
from __future__ import annotations

import argparse
import colorsys
import os

import numpy as np
import torch

from .train import UsageError


def palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours (uint8), evenly spread in hue."""
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb(i / max(n, 1), 0.75, 0.95)] for i in range(n)], np.uint8)


def heat(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8, dark blue through red to yellow."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[0, 0, 80], [0, 80, 255], [255, 40, 0], [255, 230, 0]], np.float32)
    pos = v * (len(stops) - 1)
    i = np.clip(pos.astype(int), 0, len(stops) - 2)
    t = pos - i
    return (stops[i[..., 0]] * (1 - t) + stops[i[..., 0] + 1] * t).astype(np.uint8)


def load_images(paths, size: tuple[int, int], mean, std):
    from PIL import Image

    raw, tensors = [], []
    for path in paths:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8).copy()
        except Exception as e:
            raise UsageError(f"cannot read image {path!r} ({type(e).__name__}: {e})") from None
        raw.append(arr)
        x = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
        tensors.append((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    return raw, torch.stack(tensors)


def write_pngs(raw_images, result, out_dir: str, names, top_k: int) -> list[str]:
    """Per image: top-k cluster overlays per layer, the hard segmentation, and a per-layer grid."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    written = []
    layers = sorted(result.maps)
    for b, (img, name) in enumerate(zip(raw_images, names)):
        stem = os.path.splitext(os.path.basename(name))[0]
        rows = []
        for layer in layers:
            maps = result.maps[layer][b].numpy()                                   # (M, H, W)
            seg = result.segmentation[layer][b].numpy()
            area = np.bincount(seg.ravel(), minlength=maps.shape[0])
            strongest = np.argsort(-area)[:top_k]
            seg_rgb = palette(maps.shape[0])[seg]
            tiles = [img, seg_rgb]
            for m in strongest:
                tiles.append((0.45 * img + 0.55 * heat(maps[m])).astype(np.uint8))
                path = os.path.join(out_dir, f"{stem}_layer{layer}_cluster{m}.png")
                Image.fromarray(tiles[-1]).save(path)
                written.append(path)
            path = os.path.join(out_dir, f"{stem}_layer{layer}_segmentation.png")
            Image.fromarray(seg_rgb).save(path)
            written.append(path)
            tiles += [np.zeros_like(img)] * (2 + top_k - len(tiles))
            rows.append(np.concatenate(tiles, 1))
        grid = np.concatenate(rows, 0)
        scale = max(1, 256 // img.shape[0])
        path = os.path.join(out_dir, f"{stem}_grid.png")
        Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
        written.append(path)
    return written


def run_explain(args) -> int:
    from .base import GIFTModelBase
    from .explain import explain
    from .fast import FastGIFT
    from .train import create_backbone

    try:
        meta = GIFTModelBase.read_adapter_config(args.adapter)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    run = meta.get("run", {})
    model_name = args.model or run.get("model")
    if not model_name:
        raise UsageError("--model is needed: the adapter does not record which timm model it was trained on")
    pretrained = args.pretrained_file or run.get("pretrained_file")
    head_rows = None
    from safetensors import safe_open

    with safe_open(os.path.join(args.adapter, "gift_adapter.safetensors"), "pt") as f:
        for k in f.keys():
            if k == f"backbone.{meta.get('head')}.weight":
                head_rows = f.get_slice(k).get_shape()[0]
    backbone = create_backbone(model_name, head_rows or run.get("num_classes") or 1000, 0.0, pretrained)
    try:
        model = FastGIFT.from_adapter(backbone, args.adapter).eval()
    except (ValueError, KeyError) as e:
        raise UsageError(f"adapter {args.adapter!r} does not fit {model_name}: {e}") from None
    cfg = backbone.pretrained_cfg
    size = tuple(cfg.get("input_size", (3, 224, 224))[-2:])
    raw, images = load_images(args.image, size, cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3))
    layers = None if not args.layers else [int(x) for x in args.layers.split(",")]
    try:
        result = explain(model, images, layers=layers, pre_delta=args.pre_delta)
    except IndexError as e:
        raise UsageError(str(e)) from None
    written = write_pngs(raw, result, args.out, args.image, args.top_k)
    print(f"wrote {len(written)} PNG files to {args.out}:")
    for path in written:
        if path.endswith("_grid.png"):
            print(f"  {path}  (rows: layers; columns: image, segmentation, top-{args.top_k} cluster maps)")
    return 0


def add_explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="folder written by save_adapter / gift finetune (OUTPUT/adapter)")
    p.add_argument("--model", default=None, help="timm model name (default: recorded in the adapter)")
    p.add_argument("--pretrained-file", default=None, help="backbone weights (default: recorded in the adapter)")
    p.add_argument("--image", nargs="+", required=True)
    p.add_argument("--out", default="runs/explain")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--layers", default=None, help="comma-separated target-layer indices (default: all)")
    p.add_argument("--pre-delta", action="store_true", help="maps from the frozen outputs x W^T + b")
