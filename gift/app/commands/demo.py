"""`make demo` / `gift demo`: pretrain a small ViT on one task of the embedded dataset (cached), then
fine-tune it on another task with GIFT, a linear probe and LoRA, measure the explainer, and write
the tables (``OUTPUT/demo_results.md``; with ``--publish`` also ``docs/`` and the README section).

Every number is the mean over several seeds (each seed: its own pretraining, initialisation, sample
order and drop-path) with a spread of two standard deviations, and the sentences under the tables
claim only what those intervals support: two numbers whose intervals overlap are called ties. Another
machine's rounding changes a run as another seed does, so its tables fall within these spreads and
give the same sentences (unless a difference lies right at the edge of its intervals)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import replace

import numpy as np
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

PRETRAIN = dict(task="shape", method="full", epochs=15, train_size=4000, val_size=500, data_seed=100, lr=2e-3,
                drop_path=0.0)
#: the fine-tuning data: the same images for every seed, so that the seeds' runs compare in pairs
FINETUNE_DATA = dict(task="pattern", train_size=2000, val_size=500, data_seed=200)
# the demo's runs: what each trains and its learning rate (a linear probe wants a larger step)
DEMO_RUNS = [("gift", dict(method="gift", lr=3e-3)), ("linear", dict(method="linear", lr=1e-2)),
             ("lora", dict(method="lora", lr=3e-3, lora_rank=8))]
METHOD_NAMES = {"gift": "GIFT", "linear": "the linear probe", "lora": "LoRA"}
#: embedded images the explainer's (layer, cluster, threshold) is chosen on, and as many new ones it is scored on
EXPLAIN_IMAGES = 200
#: the spread printed beside each mean, in standard deviations over the seeds
SPREAD_SDS = 2
ADAPTED, PRE_DELTA = "GIFT explainer (adapted outputs)", "GIFT explainer (pre-delta outputs)"
CLS_BASELINE, RANDOM_BASELINE = "baseline: CLS-token attention of the frozen model", "baseline: random cluster weights"
README_START, README_END = "<!-- demo:start -->", "<!-- demo:end -->"


def pretrained_backbone(model: str, seed: int, cache_dir: str, quiet: bool) -> str:
    """Path of the cached pretraining result of ``seed`` (made on first use): the backbone without its head."""
    key = hashlib.sha256(json.dumps({"model": model, "seed": seed, **PRETRAIN}, sort_keys=True).encode()).hexdigest()
    path = os.path.join(cache_dir, f"{model}-{key[:12]}.safetensors")
    if os.path.isfile(path):
        print(f"pretrained backbone (seed {seed}): {path} (cached)")
        return path
    print(f"pretraining {model} on the embedded 'shape' task, seed {seed} (cached afterwards in {path}) ...")
    cfg = FinetuneConfig(model=model, seed=seed, output=os.path.join(cache_dir, f"pretrain-{key[:12]}"), quiet=quiet,
                         overwrite=True, **PRETRAIN)
    summary = finetune(cfg, keep_model=True)
    backbone = summary["model"]
    head = classifier_name(backbone)
    state = {k: v.contiguous() for k, v in backbone.state_dict().items() if not k.startswith(f"{head}.")}
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, tmp))
    print(f"pretrained: val top-1 on 'shape' {summary['top1']:.3f}")
    return path


def mean_and_spread(values) -> tuple[float, float]:
    """(mean, `SPREAD_SDS` sample standard deviations) of the seeds' values."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), SPREAD_SDS * float(values.std(ddof=1))


def interval(value: tuple[float, float]) -> str:
    return f"{value[0]:.3f} ± {value[1]:.3f}"


def compare(a: tuple[float, float], b: tuple[float, float]) -> str:
    """``ties`` when the intervals mean ± spread of ``a`` and ``b`` overlap, else ``beats`` / ``falls below``."""
    if abs(a[0] - b[0]) <= a[1] + b[1]:
        return "ties"
    return "beats" if a[0] > b[0] else "falls below"


def spread_note(seeds: int) -> str:
    return (f"Each number: mean ± {SPREAD_SDS} standard deviations over {seeds} seeds (a seed sets the pretraining, "
            f"the initialisation, the sample order and drop-path); numbers whose intervals overlap are ties.")


def method_table(rows: dict[str, dict]) -> str:
    """``rows``: method -> ``trainable_parameters`` and ``top1`` (mean, spread)."""
    lines = ["| method | trainable parameters | top-1 (val, 'pattern') |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['trainable_parameters']:,} | {interval(r['top1'])} |" for name, r in rows.items()]
    return "\n".join(lines)


def method_verdict(rows: dict[str, dict]) -> str:
    """What the method table shows, in words derived from its intervals (`compare`)."""
    gift = rows["gift"]["top1"]
    others = [f"{compare(gift, rows[name]['top1'])} {METHOD_NAMES[name]} ({interval(gift)} vs "
              f"{interval(rows[name]['top1'])})" for name in rows if name != "gift"]
    return f"GIFT {' and '.join(others)}."


def step_time_line(step_times: dict[str, float]) -> str:
    return ("Step time per batch of 64 on the machine that ran this demo, mean over the seeds: "
            + ", ".join(f"{name} {1e3 * t:.0f} ms" for name, t in step_times.items())
            + ". It depends on that machine and what else ran on it: not a speed comparison (`make bench` is).")


def explainer_table(scores: dict[str, tuple[float, float]]) -> str:
    return "\n".join(["| cluster maps | mean IoU with object masks (held-out) |", "|---|---:|"]
                     + [f"| {name} | {interval(score)} |" for name, score in scores.items()])


def explainer_verdict(scores: dict[str, tuple[float, float]]) -> str:
    """What the explainer table shows, in words derived from its intervals (`compare`): the adapted
    explainer against both baselines, and a best one only where its interval lies above all others."""
    adapted, pre = scores[ADAPTED], scores[PRE_DELTA]
    top = max(scores, key=lambda name: scores[name][0])
    level = [name for name in scores if name != top and compare(scores[top], scores[name]) == "ties"]
    best = (f"Best: {top} ({interval(scores[top])})." if not level else
            f"No single best: {top} ({interval(scores[top])}) ties "
            + ", ".join(f"{name} ({interval(scores[name])})" for name in level) + ".")
    random_, cls = scores[RANDOM_BASELINE], scores[CLS_BASELINE]
    return (f"The adapted explainer {compare(adapted, random_)} the random-cluster baseline ({interval(adapted)} vs "
            f"{interval(random_)}) and {compare(adapted, cls)} the CLS-attention baseline ({interval(cls)}); the "
            f"pre-delta maps score {interval(pre)}. {best}")


def run(args) -> int:
    problem = missing_extra("peft", "lora", "gift demo (its LoRA baseline)")
    if problem:
        raise UsageError(problem)
    if args.seeds < 2:
        raise UsageError(f"--seeds {args.seeds}: a spread needs at least 2 seeds")
    cache = os.path.expanduser(args.cache_dir)
    seeds = list(range(args.seed, args.seed + args.seeds))
    results: dict[str, list[dict]] = {name: [] for name, _ in DEMO_RUNS}
    explained: dict[str, list[float]] = {}
    grids: list[str] = []
    for seed in seeds:
        weights = pretrained_backbone(args.model, seed, cache, args.quiet)
        base = FinetuneConfig(model=args.model, pretrained_file=weights, epochs=args.epochs, seed=seed,
                              quiet=args.quiet, overwrite=True, **FINETUNE_DATA)
        for name, overrides in DEMO_RUNS:
            print(f"seed {seed}: fine-tuning on 'pattern' with {name} ...")
            cfg = replace(base, output=os.path.join(args.output, f"seed{seed}", name), **overrides)
            results[name].append(finetune(cfg, keep_model=name == "gift"))
        gift_model = results["gift"][-1].pop("model")
        for name, score in explainer_scores(gift_model, args.model, weights, seed).items():
            explained.setdefault(name, []).append(score)
        if not grids:
            grids = explainer_pngs(gift_model, os.path.join(args.output, "explain"))
        del gift_model
    rows = {name: {"trainable_parameters": runs[0]["trainable_parameters"],
                   "top1": mean_and_spread([r["top1"] for r in runs])} for name, runs in results.items()}
    scores = {name: mean_and_spread(values) for name, values in explained.items()}
    step_times = {name: float(np.mean([r["step_time_s"] for r in runs])) for name, runs in results.items()}
    settings = {"model": args.model, "epochs": args.epochs, "seeds": seeds, "pretrain": PRETRAIN, **FINETUNE_DATA,
                "explain_images": EXPLAIN_IMAGES}
    text = (f"<!-- generated by `gift demo` ({json.dumps(settings)}); do not edit by hand -->\n\n"
            f"{spread_note(len(seeds))}\n\n{method_table(rows)}\n\n{method_verdict(rows)}\n\n"
            f"{explainer_table(scores)}\n\n{explainer_verdict(scores)}\n\n{step_time_line(step_times)}\n")
    results_path = os.path.join(args.output, "demo_results.md")
    atomic_write_text(results_path, text)
    print("\n" + text + f"\nwrote {results_path}; per-seed, per-method metrics and curves under {args.output}/")
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


def explainer_scores(model, model_name: str, weights: str, seed: int) -> dict[str, float]:
    """Mean IoU of the explainer's maps with the object masks of held-out images, beside two baselines
    (random cluster weights drawn from ``seed``). Selection of (layer, cluster, threshold) per class on
    `EXPLAIN_IMAGES` training images of the fine-tuning task; scoring on as many new images."""
    model = model.eval()
    train = SyntheticShapes(EXPLAIN_IMAGES, seed=200, task="pattern")
    test = SyntheticShapes(EXPLAIN_IMAGES, seed=300, task="pattern")

    def images(ds):
        return torch.stack([ds[i][0] for i in range(len(ds))])

    frozen = create_backbone(model_name, len(train.classes), 0.0, weights).eval()
    candidates = {
        ADAPTED: explainer_candidates(model),
        PRE_DELTA: explainer_candidates(model, pre_delta=True),
        CLS_BASELINE: lambda x: cls_attention_maps(frozen, x),
        RANDOM_BASELINE: explainer_candidates(model, random_clusters(model, seed=seed)),
    }
    return {name: select_and_score(fn, images(train), train.masks, train.labels, images(test), test.masks,
                                   test.labels)["miou"] for name, fn in candidates.items()}


def explainer_pngs(model, out_dir: str) -> list[str]:
    """Explainer PNGs of 4 held-out images; returns the grid files."""
    test = SyntheticShapes(EXPLAIN_IMAGES, seed=300, task="pattern")  # the held-out images scored above
    with torch.no_grad():
        result = explain(model.eval(), torch.stack([test[i][0] for i in range(4)]))
    raw = [test.raw_image(i).permute(1, 2, 0).numpy() for i in range(4)]
    written = write_pngs(raw, result, out_dir, [f"test{i}_{test.classes[int(test.labels[i])]}" for i in range(4)], 3)
    print(f"explainer PNGs: {len(written)} files in {out_dir}")
    return [p for p in written if p.endswith("_grid.png")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gift_vit_micro_patch4_32", help="timm model name")
    p.add_argument("--epochs", type=positive_int, default=5, help="fine-tuning epochs per method")
    p.add_argument("--seed", type=int, default=0, help="the first seed of pretraining and fine-tuning")
    p.add_argument("--seeds", type=positive_int, default=4,
                   help="how many seeds (--seed, --seed + 1, ...): each number is their mean ± 2 standard deviations")
    p.add_argument("--output", default="runs/demo", help="folder for the runs, tables and PNGs")
    p.add_argument("--cache-dir", default="~/.cache/gift/demo", help="where the pretrained backbone is kept")
    p.add_argument(
        "--publish",
        default=None,
        metavar="ROOT",
        help="also write ROOT/docs/demo_results.md, ROOT/docs/explainer_grid.png and ROOT/README.md's demo section",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
