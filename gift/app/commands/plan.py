"""``gift plan``: will a fine-tuning run fit on the GPU, and with which ``--memory`` mode?

Takes the model, method and GIFT flags of `gift finetune` with the same defaults (the fields of
`FinetuneConfig`), predicts one training step per memory mode on fake tensors (`gift.plan`), and
prints a table or, with ``--json``, one object for scripts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from ...config import MEMORY_MODES
from ...plan import DoesNotFit, choose_memory_mode, default_memory_budget, plan_fitting, plan_training
from ..errors import LIBRARY_ERRORS, UsageError, library_errors
from ..options import add_arguments as add_options
from ..options import check_ranges, from_namespace
from ..run_config import FinetuneConfig, check_extras, memory_size, training_setup

FINETUNE_FLAGS = ("model", "method", "gift_rank", "lora_rank", "block", "num_clusters", "cluster_activation", "amp",
                  "backbone_dtype", "batch_size", "grad_accum_steps", "drop_path", "model_ema")

_finetune_fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
PlanOptions = dataclasses.make_dataclass(
    "PlanOptions", [(name, _finetune_fields[name].type, dataclasses.field(
        default=_finetune_fields[name].default, metadata=_finetune_fields[name].metadata)) for name in FINETUNE_FLAGS])
PlanOptions.__doc__ = "The flags `gift plan` shares with `gift finetune`: same defaults, help and ranges."
PlanOptions.SHARED_FLAGS = FinetuneConfig.SHARED_FLAGS  # --rank, the old name of --gift-rank and --lora-rank


def device_memory_default() -> int | None:
    """`gift.plan.default_memory_budget` of CUDA device 0 when there is one (what ``--memory auto`` uses too)."""
    return default_memory_budget("cuda:0") if torch.cuda.is_available() else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, PlanOptions)
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's own)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the head (default: the model's own)")
    p.add_argument("--memory", default=None, choices=MEMORY_MODES + ("auto",),
                   help="plan only this memory mode (default: every mode the method offers); auto: what "
                        "gift finetune --memory auto picks, the fastest mode at the fewest --grad-accum-steps "
                        "(unless given) that fit")
    p.add_argument("--device-memory", default=None,
                   help="memory of the GPU, e.g. 24GiB or 80GB (default: CUDA device 0's free memory, if any)")
    p.add_argument("--json", action="store_true", help="print one JSON object (bytes as integers)")


def run(args: argparse.Namespace) -> int:
    options = from_namespace(PlanOptions, args)
    check_ranges(options)
    check_extras(options)
    for flag, value in (("--img-size", args.img_size), ("--num-classes", args.num_classes)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    if options.grad_accum_steps is not None and options.batch_size % options.grad_accum_steps:
        raise UsageError(f"--batch-size {options.batch_size} does not split into --grad-accum-steps "
                         f"{options.grad_accum_steps} equal micro-batches")
    with library_errors(types=LIBRARY_ERRORS + (ImportError,)):  # an extra that is there but does not import
        device_memory = (device_memory_default() if args.device_memory is None
                         else memory_size(args.device_memory, "--device-memory"))
        setup = training_setup(options, args.img_size, args.num_classes)
        auto = None
        if args.memory == "auto":
            if device_memory is None:
                raise UsageError("--memory auto needs a budget: give --device-memory (no CUDA device here)")
            accumulations = (options.grad_accum_steps,) if options.grad_accum_steps else None
            try:
                plan = plan_fitting(setup, device_memory, accumulations)
            except DoesNotFit as e:
                raise UsageError(f"--memory auto: {e}") from None
            auto = f"--memory auto: {choose_memory_mode(plan)[1]}"
        else:
            plan = plan_training(setup, device_memory, (args.memory,) if args.memory else None)
    if args.json:
        print(json.dumps({**plan.to_json(), **({"auto": auto} if auto else {})}, indent=2))
        return 0
    s = plan.setup
    print(f"{s.model}, {s.batch_text('batch')}, --method {s.method}, --backbone-dtype {s.backbone_dtype}, "
          f"--amp {s.amp or 'none'}{', --model-ema' if s.model_ema else ''}: one training step (AdamW), "
          f"predicted from the model on fake tensors")
    print(plan.table())
    print(auto or plan.summary())
    return 0
