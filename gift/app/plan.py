"""`gift plan`: will a fine-tuning run fit on the GPU, and with which ``--memory`` mode?

Takes the model, method and GIFT flags of `gift finetune` with the same defaults (the fields of
`FinetuneConfig`), predicts one training step per memory mode on fake tensors (`gift.plan`), and
prints a table or, with ``--json``, one object for scripts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from ..config import GIFTConfig
from .errors import LIBRARY_ERRORS, UsageError, library_errors
from .finetune import FinetuneConfig, check_extras
from .options import add_arguments as add_options, check_ranges, from_namespace

SHARED_FLAGS = ("model", "method", "rank", "block", "num_clusters", "cluster_activation", "amp", "backbone_dtype", "batch_size", "drop_path", "model_ema")

_finetune_fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
PlanOptions = dataclasses.make_dataclass(
    "PlanOptions", [(name, _finetune_fields[name].type, dataclasses.field(
        default=_finetune_fields[name].default, metadata=_finetune_fields[name].metadata)) for name in SHARED_FLAGS])
PlanOptions.__doc__ = "The flags `gift plan` shares with `gift finetune`: same defaults, help and ranges."


def training_setup(options, img_size: int | None = None, num_classes: int | None = None):
    """The `gift.plan.TrainingSetup` of a `FinetuneConfig` (or `PlanOptions`): what finetune would train."""
    from ..plan import TrainingSetup

    gift = GIFTConfig(rank=options.rank, block=options.block, num_clusters=options.num_clusters,
                      cluster_activation=options.cluster_activation)
    return TrainingSetup(model=options.model, batch_size=options.batch_size, img_size=img_size,
                         num_classes=num_classes, method=options.method,
                         backbone_dtype=options.backbone_dtype or "float32", amp=options.amp, gift=gift,
                         lora_rank=options.rank, drop_path=options.drop_path, model_ema=options.model_ema)


def device_memory_default() -> int | None:
    """The memory of CUDA device 0 when there is one (free memory is what `--memory auto` uses)."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def choose_finetune_memory(cfg: FinetuneConfig, num_classes: int, local_batch_size: int, device) -> tuple[str, str | None]:
    """The memory mode `gift finetune` trains in and, for ``--memory auto``, the one line saying why: the
    fastest mode whose predicted peak fits `gift.plan.FIT_FRACTION` of ``--max-memory`` (default: the CUDA device's free memory).
    Raises `UsageError` naming the batch size that would fit when no mode does."""
    if cfg.memory != "auto":
        return cfg.memory, None
    if cfg.method != "gift":
        return "none", f"--memory auto: --method {cfg.method} has one memory mode (recomputation is GIFT's): memory=none"
    from ..plan import DoesNotFit, choose_memory_mode, parse_bytes, plan_training

    import torch

    if cfg.max_memory is not None:
        budget = parse_bytes(cfg.max_memory)
    else:
        budget = torch.cuda.mem_get_info(device)[0] if torch.device(device).type == "cuda" else None
    setup = dataclasses.replace(training_setup(cfg, num_classes=num_classes), batch_size=local_batch_size)
    try:
        mode, reason = choose_memory_mode(plan_training(setup, budget))
    except DoesNotFit as e:
        raise UsageError(f"--memory auto: {e}") from None
    return mode, f"--memory auto: {reason}"


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, PlanOptions)
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's own)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the head (default: the model's own)")
    p.add_argument("--memory", default=None, choices=("none", "mlp", "block"),
                   help="plan only this memory mode (default: every mode the method offers)")
    p.add_argument("--device-memory", default=None,
                   help="memory of the GPU, e.g. 24GiB or 80GB (default: CUDA device 0's, if any)")
    p.add_argument("--json", action="store_true", help="print one JSON object (bytes as integers)")


def run_plan(args: argparse.Namespace) -> int:
    from ..plan import parse_bytes, plan_training

    options = from_namespace(PlanOptions, args)
    check_ranges(options)
    check_extras(options)
    for flag, value in (("--img-size", args.img_size), ("--num-classes", args.num_classes)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    with library_errors(types=LIBRARY_ERRORS + (ImportError,)):  # an extra that is there but does not import
        device_memory = device_memory_default() if args.device_memory is None else parse_bytes(args.device_memory)
        setup = training_setup(options, args.img_size, args.num_classes)
        plan = plan_training(setup, device_memory, (args.memory,) if args.memory else None)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
        return 0
    s = plan.setup
    print(f"{s.model}, batch {s.batch_size}, --method {s.method}, --backbone-dtype {s.backbone_dtype}, "
          f"--amp {s.amp or 'none'}{', --model-ema' if s.model_ema else ''}: one training step (AdamW), "
          f"predicted from the model on fake tensors")
    print(plan.table())
    print(plan.summary())
    return 0


add_arguments, run = add_plan_arguments, run_plan  # the names gift.app.cli.COMMANDS looks for
