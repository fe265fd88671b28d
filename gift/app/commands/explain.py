"""``gift explain``: PNG cluster maps of images for a saved GIFT adapter, on exactly the backbone
the adapter was trained on."""
from __future__ import annotations

import argparse

import torch

from ...adapters import load_gift_adapter
from ...backbones import data_config
from ...explainer import explain
from ..data import load_images
from ..errors import check_output_folder, library_errors
from ..options import index_list, positive_int
from ..render import write_pngs


def load_adapter_cli(adapter: str, pretrained_file: str | None):
    """`load_gift_adapter` with its errors as one line naming the adapter."""
    with library_errors(f"adapter {adapter!r}"):
        return load_gift_adapter(adapter, pretrained_file).eval()


def run(args) -> int:
    check_output_folder(args.out, kind="--out", create=False)  # created once all else succeeded
    model = load_adapter_cli(args.adapter, args.pretrained_file)
    config = data_config(model.backbone)
    raw, images = load_images(args.image, tuple(config.input_size[-2:]), config.mean, config.std)
    with library_errors("--layers"), torch.no_grad():
        result = explain(model, images, layers=args.layers, pre_delta=args.pre_delta)
    check_output_folder(args.out, kind="--out")
    written = write_pngs(raw, result, args.out, args.image, args.top_k)
    print(f"wrote {len(written)} PNG files to {args.out}:")
    for path in written:
        if path.endswith("_grid.png"):
            print(f"  {path}  (rows: layers; columns: image, segmentation, top-{args.top_k} cluster maps)")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="folder written by save_adapter / gift finetune (OUTPUT/adapter)")
    p.add_argument("--pretrained-file", default=None,
                   help="the backbone weights the adapter was trained on, when not at the path it records")
    p.add_argument("--image", nargs="+", required=True, help="image files")
    p.add_argument("--out", default="runs/explain", help="folder for the PNG files")
    p.add_argument("--top-k", type=positive_int, default=3, help="cluster maps shown per layer")
    p.add_argument(
        "--layers", type=index_list, default=None, help="comma-separated target-layer indices (default: all)"
    )
    p.add_argument("--pre-delta", action="store_true", help="maps from the frozen outputs x W^T + b")
