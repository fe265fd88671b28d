"""``gift eval``: top-1 / top-5 of a saved GIFT or LoRA adapter on one split of a dataset, on exactly the
backbone the adapter was trained on; the numbers go to ``eval.json``."""
from __future__ import annotations

import argparse
import json
import os

from ..base import atomic_write
from .data import SPLITS, EmbeddedSpec, open_split
from .errors import UsageError, check_output_folder, library_errors, missing_extra
from .explain_cli import load_adapter_cli
from .options import positive_int
from .runtime import Dist, accuracy


def load_adapter_model(adapter: str, pretrained_file: str | None = None):
    """A GIFT (``gift_config.json``) or PEFT LoRA (``adapter_config.json``) adapter folder from
    ``gift finetune`` on its recorded backbone, in eval mode: ``(model, backbone, run record)``."""
    from ..backbones import load_lora_adapter
    from ..base import ADAPTER_CONFIG

    if os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG)):
        model = load_adapter_cli(adapter, pretrained_file)
        return model, model.backbone, model.read_adapter_config(adapter).get("run", {})
    if os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        problem = missing_extra("peft", "lora", "a LoRA adapter")
        if problem:
            raise UsageError(problem)
        with library_errors(f"adapter {adapter!r}"):
            model, run = load_lora_adapter(adapter, pretrained_file)
        return model.eval(), model.get_base_model(), run
    raise UsageError(f"{adapter!r} holds no {ADAPTER_CONFIG} (GIFT) or adapter_config.json (LoRA): it does not exist "
                     f"or is not an adapter folder written by gift finetune")


def evaluate_adapter(adapter: str, data: str | None, split: str, batch_size: int = 64,
                     pretrained_file: str | None = None, output: str | None = None) -> dict:
    """Score the adapter in ``adapter`` on ``split`` of ``data`` (default: the data it was trained on)
    and write the result to ``output`` (default: ``eval.json`` beside the adapter folder)."""
    model, backbone, run = load_adapter_model(adapter, pretrained_file)
    recorded = run.get("data", {})
    data = data or recorded.get("data") or "default"
    embedded = EmbeddedSpec(**{k: recorded[k] for k in ("task", "train_size", "val_size", "data_seed") if k in recorded})
    cfg = backbone.pretrained_cfg
    dataset, classes, _ = open_split(data, split, cfg.get("input_size", (3, 224, 224))[-1], cfg.get("mean", (0.5,) * 3),
                                     cfg.get("std", (0.5,) * 3), embedded)
    if run.get("classes") and list(classes) != list(run["classes"]):
        raise UsageError(f"the classes of {data!r} ({split}) are not those the adapter was trained on: "
                         f"{list(classes)[:5]}... vs {list(run['classes'])[:5]}...")
    scores = accuracy(model, dataset, batch_size, Dist(), run.get("amp"))
    result = {**scores, "split": split, "data": data, "adapter": os.path.abspath(adapter), "method": run.get("method"),
              "model": run.get("model"), "trainable_parameters": run.get("trainable_parameters")}
    output = output or os.path.join(os.path.dirname(os.path.abspath(adapter)), "eval.json")
    write_eval_json(output, result)
    return {**result, "output": output}


def write_eval_json(path: str, result: dict) -> None:
    """``result`` (at least ``top1``, ``top5``, ``split``, ``method``) as the JSON file `gift report` reads."""
    check_output_folder(os.path.dirname(os.path.abspath(path)), kind="the folder of")

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)

    atomic_write(path, write)


def run(args) -> int:
    r = evaluate_adapter(args.adapter, args.data, args.eval_split, args.batch_size, args.pretrained_file, args.output)
    print(f"{r['split']}: top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f} on {r['num_images']} images; wrote {r['output']}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="folder written by gift finetune (OUTPUT/adapter)")
    p.add_argument("--data", default=None, help="ImageFolder root or 'default' (default: the data the adapter was trained on)")
    p.add_argument("--eval-split", default="val", choices=SPLITS, help="which split to score")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    p.add_argument("--pretrained-file", default=None,
                   help="the backbone weights the adapter was trained on, when not at the path it records")
    p.add_argument("--output", default=None, help="the JSON file to write (default: eval.json beside the adapter folder)")
