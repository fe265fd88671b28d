"""``eval.json``: the record of one scored run (at least ``top1``, ``top5``, ``split``, ``method``), written
by `gift eval` and `gift sweep`, read by `gift report`."""
from __future__ import annotations

import os

from ..files import atomic_write_json
from .errors import check_output_folder

EVAL_JSON = "eval.json"


def write_eval_json(path: str, result: dict) -> None:
    """``result`` as the JSON file `gift report` reads (atomically; its folder is created)."""
    check_output_folder(os.path.dirname(os.path.abspath(path)), kind="the folder of")
    atomic_write_json(path, result)
