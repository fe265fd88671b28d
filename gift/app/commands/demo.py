"""`make demo` / `gift demo`: pretrain a small ViT on one task of the embedded dataset (cached), then
fine-tune it on another task with GIFT, a linear probe and LoRA, measure the explainer, and write
the tables (``OUTPUT/demo_results.md``; with ``--publish`` also ``docs/`` and the README section)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import asdict, replace

import torch
from safetensors.torch import save_file

from ...backbones import create_backbone
from ...explainer import cls_attention_maps, explain, explainer_candidates, random_clusters, select_and_score
from ...files import atomic_write, atomic_write_text, replace_marked_block
from ...targets import classifier_name
from ..data import SyntheticShapes
from ..errors import UsageError, missing_extra
from ..options import positive_int
from ..render import write_pngs
from ..run_config import FinetuneConfig
from ..train import finetune

PRETRAIN = dict(task="shape", method="full", epochs=20, train_size=4000, val_size=1000, data_seed=100, lr=2e-3,
                drop_path=0.0)
# in the cache key since before the rank flags were split (a full fine-tune has no rank): keeps old caches found
CACHE_KEY_EXTRA = {"rank": 16}
# the demo's runs: what each trains and its learning rate (a linear probe wants a larger step)
DEMO_RUNS = [("gift", dict(method="gift", lr=3e-3)), ("linear", dict(method="linear", lr=1e-2)),
             ("lora", dict(method="lora", lr=3e-3, lora_rank=8))]
README_START, README_END = "<!-- demo:start -->", "<!-- demo:end -->"


def pretrained_backbone(model: str, seed: int, cache_dir: str, quiet: bool) -> str:
    """Path of the cached pretraining result (made on first use): the backbone without its head."""
    key = hashlib.sha256(
        json.dumps({"model": model, "seed": seed, **PRETRAIN, **CACHE_KEY_EXTRA}, sort_keys=True).encode()
    ).hexdigest()[:12]
    path = os.path.join(cache_dir, f"{model}-{key}.safetensors")
    if os.path.isfile(path):
        print(f"pretrained backbone: {path} (cached)")
        return path
    print(f"pretraining {model} on the embedded 'shape' task (cached afterwards in {path}) ...")
    cfg = FinetuneConfig(model=model, seed=seed, output=os.path.join(cache_dir, f"pretrain-{key}"), quiet=quiet,
                         overwrite=True, **PRETRAIN)
    summary = finetune(cfg, keep_model=True)
    backbone = summary["model"]
    head = classifier_name(backbone)
    state = {k: v.contiguous() for k, v in backbone.state_dict().items() if not k.startswith(f"{head}.")}
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, tmp))
    print(f"pretrained: val top-1 on 'shape' {summary['top1']:.3f}")
    return path


def method_table(rows: list[dict]) -> str:
    lines = ["| method | trainable parameters | top-1 (val, 'pattern') | step time (ms) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['trainable_parameters']:,} | {r['top1']:.3f} | {1e3 * r['step_time_s']:.1f} |"
              for r in rows]
    return "\n".join(lines)


def explainer_verdict(scores: dict[str, float]) -> str:
    """What the explainer table shows, in words derived from its numbers (ties: within 0.01)."""
    adapted, pre = scores["GIFT explainer (adapted outputs)"], scores["GIFT explainer (pre-delta outputs)"]
    random_, cls = (
        scores["baseline: random cluster weights"],
        scores["baseline: CLS-token attention of the frozen model"],
    )

    def compare(a: float, b: float) -> str:
        return "ties" if abs(a - b) < 0.01 else ("beats" if a > b else "falls below")

    best = max(scores, key=scores.get)
    return (f"The adapted explainer {compare(adapted, random_)} the random-cluster baseline ({adapted:.3f} vs "
            f"{random_:.3f}) and {compare(adapted, cls)} the CLS-attention baseline ({cls:.3f}); the pre-delta maps "
            f"score {pre:.3f}. Best in this run: {best} ({scores[best]:.3f}).")


def run(args) -> int:
    problem = missing_extra("peft", "lora", "gift demo (its LoRA baseline)")
    if problem:
        raise UsageError(problem)
    cache = os.path.expanduser(args.cache_dir)
    weights = pretrained_backbone(args.model, args.seed, cache, args.quiet)
    base = FinetuneConfig(model=args.model, pretrained_file=weights, task="pattern", epochs=args.epochs, seed=args.seed,
                          train_size=2000, val_size=1000, data_seed=200, quiet=args.quiet, overwrite=True)
    rows = []
    for name, overrides in DEMO_RUNS:
        print(f"fine-tuning on 'pattern' with {name} ...")
        cfg = replace(base, output=os.path.join(args.output, name), **overrides)
        rows.append(finetune(cfg, keep_model=name == "gift"))
    table = method_table(rows)
    print("\n" + table)
    scores = explainer_scores(rows[0]["model"], args.model, weights)
    iou = "\n".join(["| cluster maps | mean IoU with object masks (held-out) |", "|---|---:|"]
                    + [f"| {name} | {score:.3f} |" for name, score in scores.items()])
    print("\n" + iou)
    grids = explainer_pngs(rows[0]["model"], os.path.join(args.output, "explain"))
    settings = {k: v for k, v in asdict(base).items() if k in ("model", "epochs", "seed", "train_size", "val_size")}
    text = (f"<!-- generated by `gift demo` ({json.dumps(settings)}); do not edit by hand -->\n\n{table}\n\n{iou}\n\n"
            f"{explainer_verdict(scores)}\n")
    results = os.path.join(args.output, "demo_results.md")
    atomic_write_text(results, text)
    print(
        f"\n{explainer_verdict(scores)}\nwrote {results}; per-method metrics and curves under {args.output}/<method>/"
    )
    if args.publish:
        publish(text, grids[0], args.publish)
    return 0


def publish(text: str, grid_png: str, root: str) -> None:
    """``ROOT/docs/demo_results.md``, ``ROOT/docs/explainer_grid.png`` and the README's demo section."""
    docs = os.path.join(root, "docs")
    os.makedirs(docs, exist_ok=True)
    atomic_write_text(os.path.join(docs, "demo_results.md"), text)
    atomic_write(os.path.join(docs, "explainer_grid.png"), lambda tmp: shutil.copyfile(grid_png, tmp))
    readme = os.path.join(root, "README.md")
    with open(readme, encoding="utf-8") as f:
        current = f.read()
    atomic_write_text(readme, readme_with_demo(current, text))
    print(f"updated {readme}, {docs}/demo_results.md and {docs}/explainer_grid.png")


def readme_with_demo(readme: str, results: str) -> str:
    """``readme`` with the text between the demo markers replaced by ``results``."""
    try:
        return replace_marked_block(readme, README_START, README_END, "\n" + results)
    except ValueError:
        raise UsageError(f"the README has no {README_START} ... {README_END} section to fill") from None


def explainer_scores(model, model_name: str, weights: str) -> dict[str, float]:
    """Mean IoU of the explainer's maps with the object masks of held-out images, beside two baselines.
    Selection of (layer, cluster, threshold) per class on 400 training images of the fine-tuning task;
    scoring on 400 new images."""
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
    return {name: select_and_score(fn, images(train), train.masks, train.labels, images(test), test.masks,
                                   test.labels)["miou"] for name, fn in candidates.items()}


def explainer_pngs(model, out_dir: str) -> list[str]:
    """Explainer PNGs of 4 held-out images; returns the grid files."""
    test = SyntheticShapes(400, seed=300, task="pattern")  # the held-out images scored above
    with torch.no_grad():
        result = explain(model.eval(), torch.stack([test[i][0] for i in range(4)]))
    raw = [test.raw_image(i).permute(1, 2, 0).numpy() for i in range(4)]
    written = write_pngs(raw, result, out_dir, [f"test{i}_{test.classes[int(test.labels[i])]}" for i in range(4)], 3)
    print(f"explainer PNGs: {len(written)} files in {out_dir}")
    return [p for p in written if p.endswith("_grid.png")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gift_vit_micro_patch4_32", help="timm model name")
    p.add_argument("--epochs", type=positive_int, default=10, help="fine-tuning epochs per method")
    p.add_argument("--seed", type=int, default=0, help="seed of pretraining and fine-tuning")
    p.add_argument("--output", default="runs/demo", help="folder for the runs, tables and PNGs")
    p.add_argument("--cache-dir", default="~/.cache/gift/demo", help="where the pretrained backbone is kept")
    p.add_argument(
        "--publish",
        default=None,
        metavar="ROOT",
        help="also write ROOT/docs/demo_results.md, ROOT/docs/explainer_grid.png and ROOT/README.md's demo section",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
