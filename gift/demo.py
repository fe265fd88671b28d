"""`make demo` / `gift demo`: pretrain a small ViT on one task of the embedded dataset (cached), then
fine-tune it on another task with GIFT, a linear probe and LoRA, and print what each achieved."""
from __future__ import annotations

import argparse
import hashlib
import json
import os

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

    from .base import atomic_write, classifier_name

    key = hashlib.sha256(json.dumps({"model": model, "seed": seed, **PRETRAIN}, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"{model}-{key}.safetensors")
    if os.path.isfile(path):
        print(f"pretrained backbone: {path} (cached)")
        return path
    print(f"pretraining {model} on the embedded 'shape' task (cached afterwards in {path}) ...")
    out = os.path.join(cache_dir, f"pretrain-{key}")
    summary = finetune(_args(model=model, seed=seed, output=out, quiet=quiet, **PRETRAIN), keep_model=True)
    backbone = summary["model"]
    head = classifier_name(backbone)
    state = {k: v.contiguous() for k, v in backbone.state_dict().items() if not k.startswith(f"{head}.")}
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
        rows.append(finetune(_args(**kw), keep_model=name == "gift"))
    lines = ["| method | trainable parameters | top-1 (val, 'pattern') | step time (ms) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['trainable_parameters']:,} | {r['top1']:.3f} | {1e3 * r['step_time_s']:.1f} |" for r in rows]
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(args.output, exist_ok=True)
    iou = explainer_report(rows[0]["model"], args.model, weights, os.path.join(args.output, "explain"))
    with open(os.path.join(args.output, "demo_results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n\n" + iou + "\n")
    print(f"\nwrote {os.path.join(args.output, 'demo_results.md')}; per-method metrics and curves under {args.output}/<method>/")
    return 0


def explainer_report(model, model_name: str, weights: str, out_dir: str) -> str:
    """Mean IoU of the explainer's maps with the object masks of held-out images, beside two baselines,
    and PNGs of a few of those images. Selection of (layer, cluster, threshold) per class on 400
    training images of the fine-tuning task; scoring on 400 new images."""
    import torch

    from .data import SyntheticShapes
    from .explain import cls_attention_maps, explain, explainer_candidates, random_clusters, select_and_score
    from .explain_cli import write_pngs
    from .train import create_backbone

    model = model.eval()
    train, test = SyntheticShapes(400, seed=200, task="pattern"), SyntheticShapes(400, seed=300, task="pattern")

    def images(ds):
        return torch.stack([ds[i][0] for i in range(len(ds))])

    frozen = create_backbone(model_name, len(train.classes), 0.0, weights).eval()
    candidates = {
        "GIFT explainer (adapted outputs)": explainer_candidates(model),
        "GIFT explainer (pre-delta outputs)": explainer_candidates(model, pre_delta=True),
        "baseline: CLS-token attention of the frozen model": lambda x: cls_attention_maps(frozen, x),
        "baseline: random cluster weights": explainer_candidates(model, random_clusters(model, seed=0)),
    }
    lines = ["| cluster maps | mean IoU with object masks (held-out) |", "|---|---:|"]
    for name, fn in candidates.items():
        score = select_and_score(fn, images(train), train.masks, train.labels, images(test), test.masks, test.labels)
        lines.append(f"| {name} | {score['miou']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    result = explain(model, images(test)[:4])
    raw = [test.raw_image(i).permute(1, 2, 0).numpy() for i in range(4)]
    written = write_pngs(raw, result, out_dir, [f"test{i}_{test.classes[int(test.labels[i])]}" for i in range(4)], 3)
    print(f"explainer PNGs: {len(written)} files in {out_dir}")
    return table


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gift_vit_micro_patch4_32")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--cache-dir", default="~/.cache/gift/demo")
    p.add_argument("--quiet", action="store_true")
