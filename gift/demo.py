"""`make demo` / `gift demo`: pretrain a small ViT on one task of the embedded dataset (cached), then
fine-tune it on another task with GIFT, a linear probe and LoRA, and print what each achieved."""
from __future__ import annotations

import argparse
import hashlib
import json
import os

import torch

from .train import add_finetune_arguments, finetune

PRETRAIN = dict(task="shape", method="full", epochs=20, train_size=4000, val_size=1000, data_seed=100, lr=2e-3,
                drop_path=0.0, rank=16)
# per method: what it trains and its learning rate (a linear probe wants a larger step)
METHODS = [("gift", dict(method="gift", lr=3e-3)), ("linear", dict(method="linear", lr=1e-2)),
           ("lora", dict(method="lora", lr=3e-3, rank=8))]


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_finetune_arguments(parser)
    args = parser.parse_args([])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def pretrained_backbone(model: str, seed: int, cache_dir: str, quiet: bool) -> str:
    """Path of the cached pretraining result (made on first use): the backbone without its head."""
    from safetensors.torch import save_file

    from .base import atomic_write

    key = hashlib.sha256(json.dumps({"model": model, "seed": seed, **PRETRAIN}, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"{model}-{key}.safetensors")
    if os.path.isfile(path):
        print(f"pretrained backbone: {path} (cached)")
        return path
    print(f"pretraining {model} on the embedded 'shape' task (cached afterwards in {path}) ...")
    out = os.path.join(cache_dir, f"pretrain-{key}")
    summary = finetune(_args(model=model, seed=seed, output=out, quiet=quiet, **PRETRAIN), keep_model=True)
    backbone = summary["model"]
    head = {n for n, m in backbone.named_modules() if m is backbone.get_classifier()}
    state = {k: v.contiguous() for k, v in backbone.state_dict().items() if not any(k.startswith(h + ".") for h in head)}
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, tmp))
    print(f"pretrained: val top-1 on 'shape' {summary['top1']:.3f}")
    return path


def run_demo(args) -> int:
    cache = os.path.expanduser(args.cache_dir)
    weights = pretrained_backbone(args.model, args.seed, cache, args.quiet)
    rows = []
    for name, overrides in METHODS:
        print(f"fine-tuning on 'pattern' with {name} ...")
        kw = dict(model=args.model, pretrained_file=weights, task="pattern", epochs=args.epochs, seed=args.seed,
                  train_size=2000, val_size=1000, data_seed=200, output=os.path.join(args.output, name), quiet=args.quiet)
        kw.update(overrides)
        rows.append(finetune(_args(**kw)))
    lines = ["| method | trainable parameters | top-1 (val, 'pattern') | step time (ms) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['trainable_parameters']:,} | {r['top1']:.3f} | {1e3 * r['step_time_s']:.1f} |" for r in rows]
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "demo_results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(f"\nwrote {os.path.join(args.output, 'demo_results.md')}; per-method metrics and curves under {args.output}/<method>/")
    return 0


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gift_vit_micro_patch4_32")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--cache-dir", default="~/.cache/gift/demo")
    p.add_argument("--quiet", action="store_true")
