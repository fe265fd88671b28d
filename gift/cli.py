"""The ``gift`` command line (``python -m gift``): ``finetune``, ``demo``, ``explain``.

Bad input ends with one line on stderr and exit status 2 (the traceback only with ``--debug``).
"""
from __future__ import annotations

import argparse
import sys

from .data import DataError
from .train import UsageError, add_finetune_arguments


def _finetune(args) -> int:
    from .train import finetune

    summary = finetune(args)
    print(f"done: {summary['method']}, {summary['trainable_parameters']:,} trainable parameters, "
          f"val top-1 {summary['top1']:.4f}; outputs in {summary['output']}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def _explain(args) -> int:
    from .explain_cli import run_explain

    return run_explain(args)


def build_parser() -> argparse.ArgumentParser:
    from .demo import add_demo_arguments
    from .explain_cli import add_explain_arguments

    parser = argparse.ArgumentParser(prog="gift", description="GIFT fine-tuning for timm Vision Transformers (offline).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("finetune", help="fine-tune a timm ViT with GIFT or a baseline")
    add_finetune_arguments(p)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for bad input")
    p.set_defaults(func=_finetune)
    p = sub.add_parser("demo", help="pretrain a small ViT on the embedded data, then compare GIFT, linear probe, LoRA")
    add_demo_arguments(p)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for bad input")
    p.set_defaults(func=_demo)
    p = sub.add_parser("explain", help="PNG cluster maps (the built-in explainer) of images for a GIFT adapter")
    add_explain_arguments(p)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for bad input")
    p.set_defaults(func=_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, DataError) as e:
        if args.debug:
            raise
        print(f"gift {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
