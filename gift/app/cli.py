"""The ``gift`` command line (console script ``gift``, or ``python -m gift``).

Each subcommand is a module of `gift.app.commands` named after it, with ``add_arguments(parser)`` and
``run(args) -> int``, listed in `COMMANDS`; only the chosen one is imported, so ``gift --help`` answers
without torch or timm.
Bad input ends with one line on stderr and exit status 2 (the traceback only with ``--debug``).
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

from .. import __version__
from .errors import UsageError, one_line
from .interrupts import Terminated

# name: one-line help. Adding a subcommand: one line here and a module gift/app/commands/<name>.py.
COMMANDS = {
    "finetune": "fine-tune a timm ViT with GIFT or a baseline (LoRA, linear probe, full)",
    "sweep": "the paper's protocol: search lr x weight decay on train -> val, then the best point on train+val, "
             "scored on test",
    "report": "eval.json files of runs as the paper's results table (Markdown, CSV, PNG)",
    "recipes": "list the shipped recipes (the paper's settings); `show NAME` prints one",
    "plan": "will a fine-tuning run fit on the GPU? predicted memory per --memory mode, without weights",
    "eval": "top-1 / top-5 of a saved GIFT or LoRA adapter on a data split; writes eval.json",
    "explain": "PNG cluster maps (the built-in explainer) of images for a GIFT adapter",
    "demo": "pretrain a small ViT on the embedded data, then compare GIFT, linear probe, LoRA",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help text with each flag's default, but no "(default: None)" or "(default: False)" noise."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Usage errors on one line (``gift finetune: error: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _chosen(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with the arguments of the subcommand named in ``argv`` (only that one is imported)."""
    parser = Parser(
        prog="gift", description="GIFT fine-tuning for timm Vision Transformers.", formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"gift {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    chosen = _chosen(argv)
    for name, text in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for bad input")
        if name == chosen:
            command = importlib.import_module(f"gift.app.commands.{name}")
            command.add_arguments(p)
            p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    called_as_command = argv is None  # the console script (a caller passing argv keeps its own Ctrl-C)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.run(args)
    except UsageError as e:
        if args.debug:
            raise
        print(f"gift {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the training loop saved what it had; SIGTERM exits as a terminated job does
        if called_as_command:  # the process ends now: a further Ctrl-C while Python shuts down prints no traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
