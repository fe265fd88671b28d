"""Command-line options in one place: a dataclass field declares a flag (default, help, range,
choices) with `option`; `add_arguments` turns the fields into argparse flags; `check_ranges` checks
every value against its declared range and raises `UsageError` naming the flag. Small argparse
types for the commands without a config dataclass live here too.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Sequence

from .errors import UsageError


def option(default: Any, help: str, *, choices: Sequence | None = None, min: float | None = None,
           max: float | None = None, min_open: bool = False, max_open: bool = False, type: type | None = None,
           metavar: str | None = None, also_flags: Sequence[str] = ()) -> Any:
    """A dataclass field that is also a ``--flag`` (underscores become dashes). ``min``/``max`` bound
    numbers (``*_open``: the bound itself is excluded); ``type`` is needed only when the default is None
    (a function such as `gift.dtypes.dtype_name` also translates what is typed); ``also_flags``: other
    names of the flag (e.g. timm's), accepted as well."""
    meta = dict(help=help, choices=tuple(choices) if choices is not None else None, min=min, max=max,
                min_open=min_open, max_open=max_open, type=type, metavar=metavar, also_flags=tuple(also_flags))
    return dataclasses.field(default=default, metadata={"option": meta})


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def shared_flags(cls) -> dict[str, tuple[str, ...]]:
    """``{alias: field names}`` of ``cls``'s ``SHARED_FLAGS``: flags (e.g. the old ``--rank``) that set
    several fields at once."""
    return dict(getattr(cls, "SHARED_FLAGS", {}))


class SetsFields(argparse.Action):
    """A flag that sets the destinations ``sets`` (besides its own) where it stands on the command line, so
    that a flag given after it wins, as with any other flag (and `gift.app.recipes.RecipeAction` sets them
    too when a recipe has the flag's key)."""

    def __init__(self, option_strings, dest, sets: Sequence[str] = (), **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.sets = tuple(sets)

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, value)
        for dest in self.sets:
            setattr(namespace, dest, value)


def _options(cls) -> list[tuple[dataclasses.Field, dict]]:
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def add_arguments(parser: argparse.ArgumentParser, cls, exclude: Sequence[str] = ()) -> None:
    """One flag per `option` field of the dataclass ``cls`` (but the fields named in ``exclude``);
    argparse checks types and choices."""
    fields = {}
    for f, meta in _options(cls):
        if f.name in exclude:
            continue
        fields[f.name] = (f, meta)
        kind = meta["type"] or type(f.default)
        flags = (flag_name(f.name), *meta["also_flags"])
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action="store_true", help=meta["help"])
            continue
        parser.add_argument(*flags, dest=f.name, type=kind, default=f.default, choices=meta["choices"],
                            metavar=meta["metavar"], help=meta["help"])
    for alias, targets in shared_flags(cls).items():
        if all(t in fields for t in targets):
            f, meta = fields[targets[0]]
            parser.add_argument(flag_name(alias), dest=alias, type=meta["type"] or type(f.default), default=None,
                                action=SetsFields, sets=targets,
                                help=f"the old name of {' and '.join(flag_name(t) for t in targets)}: sets them all "
                                     f"(a flag given later wins)")


def from_namespace(cls, args: argparse.Namespace, **extra):
    """``cls`` filled from parsed arguments (fields argparse does not know keep their defaults). A shared
    flag (`shared_flags`) set its fields when it was parsed (`SetsFields`); its value is checked here against
    their range, so that the error names the flag that was typed."""
    options = dict(_options(cls))
    values = {f.name: getattr(args, f.name) for f in options if hasattr(args, f.name)}
    metas = {f.name: meta for f, meta in options.items()}
    for alias, targets in shared_flags(cls).items():
        value = getattr(args, alias, None)
        if value is not None:
            _check_value(flag_name(alias), value, metas[targets[0]])
    return cls(**values, **extra)


def _range_text(meta: dict) -> str:
    def number(bound) -> str:  # integers in full (2147483647, not 2.14748e+09)
        return str(bound) if isinstance(bound, int) else f"{bound:g}"

    parts = []
    if meta["min"] is not None:
        parts.append(f"{'>' if meta['min_open'] else '>='} {number(meta['min'])}")
    if meta["max"] is not None:
        parts.append(f"{'<' if meta['max_open'] else '<='} {number(meta['max'])}")
    return " and ".join(parts)


def check_ranges(obj) -> None:
    """Raise `UsageError` for the first option of ``obj`` outside its declared range or choices."""
    for f, meta in _options(type(obj)):
        value = getattr(obj, f.name)
        if value is not None:
            _check_value(flag_name(f.name), value, meta)


def _check_value(name: str, value, meta: dict) -> None:
    """`UsageError` naming the flag ``name`` when ``value`` is outside the range or choices of ``meta``."""
    if meta["choices"] is not None and value not in meta["choices"]:
        raise UsageError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if meta["min"] is None and meta["max"] is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name} must be a number, got {value!r}")
    lo_bad = meta["min"] is not None and (value <= meta["min"] if meta["min_open"] else value < meta["min"])
    hi_bad = meta["max"] is not None and (value >= meta["max"] if meta["max_open"] else value > meta["max"])
    if not math.isfinite(value) or lo_bad or hi_bad:
        raise UsageError(f"{name} must be {_range_text(meta)}, got {value!r}")


# ------------------------------------------------------------------------- plain argparse types
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def index_list(text: str) -> list[int]:
    """``"0,2,3"`` -> ``[0, 2, 3]`` (non-negative indices)."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated layer indices like 0,2,3, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"layer indices must be >= 0, got {text!r}")
    return values
