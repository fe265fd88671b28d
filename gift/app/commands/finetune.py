"""``gift finetune``: fine-tune a timm ViT with GIFT (or a baseline) on an ImageFolder tree, a local
benchmark copy or the embedded dataset. The settings are `gift.app.run_config.FinetuneConfig`'s, the
loop is `gift.app.train.finetune`."""
from __future__ import annotations

import argparse

from ..options import add_arguments as add_options
from ..options import from_namespace
from ..recipes import add_recipe_argument
from ..run_config import FinetuneConfig
from ..train import finetune


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_argument(p)
    add_options(p, FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    summary = finetune(from_namespace(FinetuneConfig, args))
    if summary["main"]:
        print(f"done: {summary['method']}, {summary['trainable_parameters']:,} trainable parameters, "
              f"{args.eval_split} top-1 {summary['top1']:.4f}; outputs in {summary['output']}")
    return 0
