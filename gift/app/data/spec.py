"""The ``--data`` vocabulary: the formats of local dataset copies, the split names, and a parsed
``--data`` value (`DataSpec`)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import DataError

FORMATS = ("imagefolder", "fgvc-json", "vtab1k")
#: ``--data`` values that name the embedded dataset
EMBEDDED = ("default", "embedded")
#: the splits of the embedded dataset, and the folders of a bare ImageFolder ``DIR``
SPLITS = ("train", "val", "test")
TRAIN_SPLITS = ("train", "train800", "train800val200", "trainval")
EVAL_SPLITS = ("val", "val200", "test")


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: ``format`` is one of `FORMATS` or ``"embedded"``; ``path`` the local copy."""

    format: str
    path: str

    @property
    def name(self) -> str:
        """The dataset's short name (a column of the results table): the folder or VTAB task name."""
        return os.path.basename(os.path.normpath(self.path)) if self.path else "embedded"

    def __str__(self) -> str:
        return "default" if self.format == "embedded" else f"{self.format}:{self.path}"


def has_format(spec: str) -> bool:
    """Whether ``spec`` names its format (``fgvc-json:DIR``...) rather than being a bare folder or ``default``."""
    return spec.partition(":")[0] in FORMATS


def parse_data_spec(spec: str) -> DataSpec:
    """``imagefolder:DIR`` / ``fgvc-json:DIR`` / ``vtab1k:DIR/TASK`` / ``default``; a bare ``DIR`` is an ImageFolder."""
    if spec in (None, "", "default", "embedded"):
        return DataSpec("embedded", "")
    head, sep, rest = spec.partition(":")
    if sep and head in FORMATS:
        if not rest:
            raise DataError(f"--data {spec!r} names no folder; write {head}:PATH")
        return DataSpec(head, rest)
    if sep and not os.path.exists(spec) and re.fullmatch(r"[a-z0-9][a-z0-9_-]*", head):
        raise DataError(f"--data {spec!r}: unknown format {head!r}; use one of "
                        f"{', '.join(f + ':PATH' for f in FORMATS)} or default")
    return DataSpec("imagefolder", spec)


def absolute_data_spec(spec: str) -> str:
    """``spec`` with its folder made absolute (``fgvc-json:/abs/cub``), to be found again from elsewhere."""
    parsed = parse_data_spec(spec)
    if parsed.format == "embedded":
        return spec
    path = os.path.abspath(parsed.path)
    return f"{parsed.format}:{path}" if has_format(spec) else path


def split_file_name(fmt: str, split: str) -> str:
    """The canonical split of ``fmt`` behind a ``--train-split``/``--eval-split`` name (VTAB-1k aliases resolved)."""
    names = {"imagefolder": ("train", "val", "trainval", "test"), "fgvc-json": ("train", "val", "trainval", "test"),
             "vtab1k": ("train800", "val200", "train800val200", "test")}[fmt]
    if fmt == "vtab1k":
        split = {"train": "train800", "val": "val200", "trainval": "train800val200"}.get(split, split)
    if split not in names:
        raise DataError(f"{fmt} data has no split {split!r}; it has {', '.join(names)}"
                        + (" (aliases: train, val, trainval)" if fmt == "vtab1k" else ""))
    return split


