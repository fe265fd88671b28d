"""``gift eval``: top-1 / top-5 of a saved GIFT or LoRA adapter on one split of a dataset, on exactly the
backbone the adapter was trained on; the numbers go to ``eval.json``."""
from __future__ import annotations

import argparse
import os

from ...adapters import load_adapter
from ...backbones import data_config
from ..data import EVAL_SPLITS, SPLITS, TRAIN_SPLITS, EmbeddedSpec, open_split
from ..errors import LIBRARY_ERRORS, UsageError, library_errors
from ..options import positive_int
from ..results import write_eval_json
from ..runtime import Dist, accuracy


def load_adapter_model(adapter: str, pretrained_file: str | None = None):
    """`gift.adapters.load_adapter` (a GIFT or PEFT LoRA adapter folder from ``gift finetune`` on its
    recorded backbone, in eval mode: ``(model, backbone, run record)``), its errors as one line."""
    with library_errors(f"adapter {adapter!r}", types=LIBRARY_ERRORS + (ImportError,)):
        return load_adapter(adapter, pretrained_file)


def evaluate_adapter(adapter: str, data: str | None, split: str, batch_size: int = 64,
                     pretrained_file: str | None = None, output: str | None = None) -> dict:
    """Score the adapter in ``adapter`` on ``split`` of ``data`` (default: the data it was trained on)
    and write the result to ``output`` (default: ``eval.json`` beside the adapter folder)."""
    model, backbone, run = load_adapter_model(adapter, pretrained_file)
    recorded = run.get("data", {})
    data = data or recorded.get("data") or "default"
    embedded = EmbeddedSpec(
        **{k: recorded[k] for k in ("task", "train_size", "val_size", "data_seed") if k in recorded}
    )
    config = data_config(backbone)
    dataset, classes, _ = open_split(data, split, config.input_size[-1], config.mean, config.std, embedded)
    if run.get("classes") and list(classes) != list(run["classes"]):
        raise UsageError(f"the classes of {data!r} ({split}) are not those the adapter was trained on: "
                         f"{list(classes)[:5]}... vs {list(run['classes'])[:5]}...")
    scores = accuracy(model, dataset, batch_size, Dist(), run.get("amp"))
    result = {**scores, "split": split, "data": data, "adapter": os.path.abspath(adapter), "method": run.get("method"),
              "model": run.get("model"), "trainable_parameters": run.get("trainable_parameters")}
    output = output or os.path.join(os.path.dirname(os.path.abspath(adapter)), "eval.json")
    write_eval_json(output, result)
    return {**result, "output": output}


def run(args) -> int:
    r = evaluate_adapter(args.adapter, args.data, args.eval_split, args.batch_size, args.pretrained_file, args.output)
    print(
        f"{r['split']}: top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f} on {r['num_images']} images; wrote {r['output']}"
    )
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="folder written by gift finetune (OUTPUT/adapter)")
    p.add_argument("--data", default=None, help="fgvc-json:DIR, vtab1k:DIR/TASK, an ImageFolder root or 'default' "
                                                "(default: the data the adapter was trained on)")
    p.add_argument("--eval-split", default="val", choices=sorted(set(SPLITS) | set(TRAIN_SPLITS) | set(EVAL_SPLITS)),
                   help="which split to score (vtab1k: val = val200)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    p.add_argument("--pretrained-file", default=None,
                   help="the backbone weights the adapter was trained on, when not at the path it records")
    p.add_argument(
        "--output", default=None, help="the JSON file to write (default: eval.json beside the adapter folder)"
    )
