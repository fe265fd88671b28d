"""`gift sweep`: the paper's protocol as one command. Train every (lr, weight decay) point of a grid on the
search split for ``search_epochs`` and evaluate on the search-eval split, one row per point in
``OUTPUT/sweep.csv`` (written atomically after every point); then train the best point on the final split
(train + val) for the full ``epochs`` and evaluate on test, writing ``OUTPUT/final/eval.json``.

Re-running the same command resumes: finished points (rows of sweep.csv) are not trained again, a point or
final run cut off mid-way continues from its checkpoint, and a finished final run is not repeated. When a grown
grid moves the best point, the final run of the old best point is moved aside (``final_<point>``), not reused.
A point whose training diverged (a non-finite loss or gradient) is a row with status ``diverged``: it is never
chosen. A damaged row of sweep.csv or a damaged ``final/eval.json`` is made again from its run's checkpoint; a
damaged sweep.json is refused in one line. One sweep at a time owns the folder (a lock).

`run_grid_search` takes the training as a callable ``train_point(settings) -> summary``: ``settings`` holds
``lr``, ``weight_decay``, ``epochs``, ``train_split``, ``eval_split``, ``output`` and ``resume`` (and, for the
final run, ``eval_every`` = ``epochs``: test is scored once, after the last epoch); the summary at least
``top1`` (accuracy on ``eval_split`` after the last epoch, a fraction) and ``trainable_parameters``; it
raises `gift.app.divergence.Diverged` for a point that diverged.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable

from tqdm import tqdm

from ...files import atomic_write_json, atomic_write_text
from ..data import EMBEDDED, EVAL_SPLITS, SPLITS, TRAIN_SPLITS, absolute_data_spec, open_train_val, parse_data_spec
from ..divergence import Diverged
from ..errors import DataError, UsageError, library_errors
from ..options import add_arguments as add_options
from ..options import from_namespace
from ..recipes import add_recipe_argument
from ..results import EVAL_JSON, write_eval_json
from ..run_config import FinetuneConfig, probe_data_config
from ..run_folder import FolderLock
from ..train import CHECKPOINT, finetune, normal_setting

SWEEP_CSV = "sweep.csv"
SWEEP_JSON = "sweep.json"
FINAL_POINT_JSON = "point.json"  # (lr, weight decay) of the final run, written before it starts
CSV_FIELDS = ("point", "lr", "weight_decay", "epochs", "train_split", "eval_split", "top1", "trainable_parameters",
              "status")
DONE, DIVERGED = "done", "diverged"  # a row's status (rows of sweeps before the status column: done)
CONTINUE_HINT = "re-run the same gift sweep command to continue"


class SweepError(UsageError):
    """Bad sweep input (a grid that does not parse, an output folder of another sweep): one line."""


@dataclass(frozen=True)
class SweepGrid:
    """The grid and the splits. ``epochs`` is the final run's length, ``search_epochs`` each point's."""

    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    search_epochs: int
    epochs: int
    search_train_split: str = "train"
    search_eval_split: str = "val"
    final_train_split: str = "trainval"
    final_eval_split: str = "test"

    def __post_init__(self):
        if not self.lrs or not self.weight_decays:
            raise SweepError("the grid is empty: give --lr and --weight-decay values (comma separated)")
        if self.search_epochs <= 0 or self.epochs <= 0:
            raise SweepError(
                f"--search-epochs and --epochs must be positive, got {self.search_epochs} and {self.epochs}"
            )

    def points(self) -> list[tuple[float, float]]:
        return [(lr, wd) for lr in self.lrs for wd in self.weight_decays]


def parse_grid(text, flag: str) -> tuple[float, ...]:
    """``"1e-4,2.5e-4"`` (or a list from a recipe) -> (1e-4, 2.5e-4); refuses anything else naming ``flag``."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        values = tuple(float(v) for v in items if str(v).strip() != "")
    except ValueError:
        raise SweepError(f"{flag} {text!r}: expected numbers separated by commas, e.g. 1e-4,2.5e-4,5e-4") from None
    if not values or any(v < 0 for v in values):
        raise SweepError(f"{flag} {text!r}: expected one or more non-negative numbers, e.g. 1e-4,2.5e-4,5e-4")
    return values


def point_name(lr: float, weight_decay: float) -> str:
    return f"lr{lr:g}_wd{weight_decay:g}"


def _read_rows(path: str, quiet: bool = False) -> list[dict]:
    """The whole rows of sweep.csv (a point with a damaged row, e.g. one cut short, is left out: it is
    made again from its run's checkpoint)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.DictReader(f))
    whole = [r for r in rows if _row_point(r) is not None]
    if len(whole) < len(rows) and not quiet:
        print(f"note: {len(rows) - len(whole)} damaged row(s) of {path} left out: those points are taken again "
              f"from their checkpoints")
    return whole


def _row_point(row: dict) -> tuple[float, float] | None:
    """(lr, weight decay) of a whole row of sweep.csv, else None."""
    try:
        point = float(row["lr"]), float(row["weight_decay"])
        status = row.get("status") or DONE
        if status == DONE:
            float(row["top1"])
            int(row["trainable_parameters"])
        elif status != DIVERGED:
            return None
    except (KeyError, TypeError, ValueError):
        return None
    return point


def _candidate(row: dict) -> bool:
    """Whether the point of ``row`` may be chosen: trained to the end with a finite score."""
    return (row.get("status") or DONE) == DONE and math.isfinite(float(row["top1"]))


def _write_rows(path: str, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, text.getvalue())


def write_json(path: str, data) -> None:
    atomic_write_json(path, data, newline=True)


def _read_json(path: str, what: str, fix: str):
    """The JSON in ``path``; `SweepError` naming the file (``what``) and the way out (``fix``) if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SweepError(f"{path} ({what}) is damaged ({type(e).__name__}: {e}); {fix}") from None


def _check_same_sweep(output: str, identity: dict, defaults: dict | None = None) -> None:
    """Refuse to resume in a folder written by a sweep with other settings (the rows would not compare).
    A setting the folder does not record (one added to gift since) counts as its value in ``defaults``;
    dtype names compare in one spelling (``bf16`` is ``bfloat16``)."""
    path = os.path.join(output, SWEEP_JSON)
    identity = json.loads(json.dumps(identity))  # tuples as lists, as they come back from the file
    defaults = json.loads(json.dumps(defaults or {}))
    if os.path.isfile(path):
        saved = _read_json(path, "the sweep's settings", "if this folder holds this very sweep, delete that file "
                           "(the command writes it again), else give another --output")
        if not isinstance(saved, dict):
            raise SweepError(f"{path} (the sweep's settings) is damaged (not a JSON object); if this folder holds "
                             f"this very sweep, delete that file, else give another --output")
        diff = {k: (saved.get(k, defaults.get(k)), identity.get(k)) for k in set(saved) | set(identity)
                if k not in ("lrs", "weight_decays")
                and normal_setting(k, saved.get(k, defaults.get(k))) != normal_setting(k, identity.get(k))}
        if diff:
            text = ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in sorted(diff.items()))
            raise SweepError(f"{output} holds another sweep ({text}); give another --output or the same settings")
    write_json(path, identity)


def _final_point(final_dir: str) -> tuple[float, float] | None:
    """(lr, weight decay) the run in ``final_dir`` was started with: from its point.json, else its eval.json,
    else its checkpoint's identity (whichever is readable)."""
    for name in (FINAL_POINT_JSON, EVAL_JSON):
        try:
            with open(os.path.join(final_dir, name), encoding="utf-8") as f:
                saved = json.load(f)
            return float(saved["lr"]), float(saved["weight_decay"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    try:
        import torch

        identity = torch.load(os.path.join(final_dir, CHECKPOINT), map_location="cpu", weights_only=False)["identity"]
        return float(identity["lr"]), float(identity["weight_decay"])
    except Exception:  # no checkpoint, or one torch cannot read: the point is unknown
        return None


def _final_of_best_point(final_dir: str, lr: float, weight_decay: float, quiet: bool) -> None:
    """An earlier final run of another point (the grid grew and the best point changed) is moved aside to
    ``final_<its point>`` (``_2``, ``_3``, ... if taken), so its result is neither returned nor resumed."""
    if not os.path.isdir(final_dir) or not os.listdir(final_dir):
        return
    old = _final_point(final_dir)
    if old == (lr, weight_decay):
        return
    base = f"{final_dir}_{point_name(*old) if old else 'unknown_point'}"
    aside, n = base, 1
    while os.path.exists(aside):
        n += 1
        aside = f"{base}_{n}"
    os.replace(final_dir, aside)
    if not quiet:
        print(f"the best point is now {point_name(lr, weight_decay)}: moved the final run of "
              f"{point_name(*old) if old else 'an unknown point'} aside to {aside}")


def run_grid_search(plan: SweepGrid, output: str, train_point: Callable[[dict], dict], identity: dict | None = None,
                    record: dict | None = None, quiet: bool = False, identity_defaults: dict | None = None) -> dict:
    """Search, pick, final run; returns the final `eval.json` record (see module docstring).

    ``identity``: the settings that must match for a re-run to resume (model, method, data, ...), with
    ``identity_defaults`` for those a folder of an older gift does not record. ``record``: fields copied into
    ``final/eval.json`` (method, model, data, dataset). `SweepError` when every point diverged, or the final
    run did; `gift.app.run_folder.FolderInUse` while another sweep owns ``output``.
    """
    os.makedirs(output, exist_ok=True)
    with FolderLock(output):
        return _grid_search(plan, output, train_point, identity, record, quiet, identity_defaults)


def _grid_search(plan, output, train_point, identity, record, quiet, identity_defaults) -> dict:
    _check_same_sweep(output, {**(identity or {}), **asdict(plan)}, identity_defaults)
    csv_path = os.path.join(output, SWEEP_CSV)
    rows = {_row_point(r): r for r in _read_rows(csv_path, quiet)}
    points = plan.points()
    overall = tqdm(total=len(points) + 1, desc="sweep", unit="run", disable=quiet)
    for lr, wd in points:
        name = point_name(lr, wd)
        overall.set_postfix_str(name)
        if (lr, wd) in rows:
            overall.update(1)
            continue
        point_dir = os.path.join(output, "points", name)
        row = {"point": name, "lr": lr, "weight_decay": wd, "epochs": plan.search_epochs,
               "train_split": plan.search_train_split, "eval_split": plan.search_eval_split}
        try:
            summary = _train_point(train_point, point_dir, {
                "lr": lr, "weight_decay": wd, "epochs": plan.search_epochs, "train_split": plan.search_train_split,
                "eval_split": plan.search_eval_split, "output": point_dir})
            row.update(top1=summary["top1"], trainable_parameters=summary.get("trainable_parameters", ""),
                       status=DONE)
            said = f"{name}: {plan.search_eval_split} top-1 {float(summary['top1']):.4f}"
        except Diverged as e:
            row.update(top1="", trainable_parameters="", status=DIVERGED)
            said = f"{name}: diverged ({e.short}); not a candidate"
        rows[(lr, wd)] = row
        _write_rows(csv_path, [rows[p] for p in points if p in rows] + [r for p, r in rows.items() if p not in points])
        overall.update(1)
        if not quiet:
            overall.write(said)
    diverged = [rows[p]["point"] for p in points if not _candidate(rows[p])]
    candidates = [p for p in points if _candidate(rows[p])]
    if not candidates:
        raise SweepError(f"every point of the grid diverged or scored no finite value ({', '.join(diverged)}); "
                         f"give lower learning rates (--lr)")
    best_lr, best_wd = max(candidates, key=lambda p: (float(rows[p]["top1"]), -points.index(p)))
    best = point_name(best_lr, best_wd)
    final_dir = os.path.join(output, "final")
    eval_path = os.path.join(final_dir, EVAL_JSON)
    overall.set_postfix_str(f"final {best}")
    _final_of_best_point(final_dir, best_lr, best_wd, quiet)
    result = _read_result(eval_path, quiet)
    if result is None:
        os.makedirs(final_dir, exist_ok=True)
        write_json(os.path.join(final_dir, FINAL_POINT_JSON), {"lr": best_lr, "weight_decay": best_wd})
        try:
            summary = _train_point(train_point, final_dir, {
                "lr": best_lr, "weight_decay": best_wd, "epochs": plan.epochs, "train_split": plan.final_train_split,
                "eval_split": plan.final_eval_split, "output": final_dir, "eval_every": plan.epochs})
        except Diverged as e:
            raise SweepError(f"the final run of the best point {best} (on {plan.final_train_split}) diverged "
                             f"({e.short}); its folder {final_dir} keeps what was saved before") from None
        result = {**(record or {}), "split": plan.final_eval_split, "train_split": plan.final_train_split,
                  "top1": summary["top1"], "top5": summary.get("top5"),
                  "trainable_parameters": summary.get("trainable_parameters"),
                  "lr": best_lr, "weight_decay": best_wd, "epochs": plan.epochs,
                  "search": {"csv": os.path.abspath(csv_path), "eval_split": plan.search_eval_split,
                             "top1": float(rows[(best_lr, best_wd)]["top1"]), "diverged": diverged}}
        write_eval_json(eval_path, result)
    overall.update(1)
    overall.close()
    if not quiet:
        print(f"best point {best} ({plan.search_eval_split} top-1 {float(rows[(best_lr, best_wd)]['top1']):.4f}"
              + (f"; diverged, never chosen: {', '.join(diverged)}" if diverged else "")
              + f"); final {plan.final_eval_split} top-1 {result['top1']:.4f}; {eval_path}")
    return result


def _train_point(train_point: Callable[[dict], dict], folder: str, settings: dict) -> dict:
    """``train_point(settings)``, resuming from the folder's checkpoint when there is one; a checkpoint that
    cannot be resumed is refused with the way out (retrain that point)."""
    resume = os.path.isfile(os.path.join(folder, CHECKPOINT))
    try:
        return train_point({**settings, "resume": resume})
    except (Diverged, SweepError):
        raise
    except UsageError as e:
        if resume and str(e).startswith("--resume:"):
            raise SweepError(f"{e}; to train that point again, delete {folder}") from None
        raise


def _read_result(path: str, quiet: bool) -> dict | None:
    """The final run's eval.json; None when there is none, or it is damaged (then it is made again from the
    final run's checkpoint, which a finished run resumes without training)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        if not math.isfinite(float(result["top1"])):  # a NaN score is no result, whatever wrote it
            raise ValueError(f"top1 {result['top1']}")
        return result
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        if not quiet:
            print(f"note: {path} is damaged ({type(e).__name__}); making it again from the final run")
        return None


# ---------------------------------------------------------------------------------------- command line
NOT_IDENTITY = ("lr", "weight_decay", "epochs", "output", "resume", "overwrite", "stop_after", "quiet", "device",
                "train_split", "eval_split", "eval_every", "gift_rank", "lora_rank")  # the ranks: as "rank", below


def add_arguments(p) -> None:
    """`gift sweep`: every `gift finetune` flag (and ``--recipe``), with ``--lr``/``--weight-decay`` as grids."""
    add_recipe_argument(p)
    add_options(p, FinetuneConfig, exclude=("lr", "weight_decay", "train_split", "eval_split", "resume", "overwrite",
                                                   "stop_after"))
    p.add_argument("--lr", default=None, help="learning rates to search, comma separated (e.g. 1e-4,2.5e-4,5e-4)")
    p.add_argument("--weight-decay", default=None, help="weight decays to search, comma separated (e.g. 0.01,0)")
    p.add_argument("--search-epochs", type=int, default=None, help="epochs of each search point (default: --epochs)")
    p.add_argument("--search-train-split", default="train", choices=TRAIN_SPLITS, help="split each point trains on")
    p.add_argument("--search-eval-split", default="val", choices=EVAL_SPLITS, help="split that picks the best point")
    p.add_argument("--final-train-split", default="trainval", choices=TRAIN_SPLITS, help="split of the final run")
    p.add_argument("--final-eval-split", default="test", choices=EVAL_SPLITS, help="split the final run is scored on")
    p.set_defaults(output="runs/sweep")


def check_splits(cfg, plan: SweepGrid) -> None:
    """Every split the sweep will read (search train/eval, final train/eval) exists, parses and has the same
    classes, before the first point trains; raises `DataError` (one line) otherwise."""
    pairs = sorted({(plan.search_train_split, plan.search_eval_split), (plan.final_train_split, plan.final_eval_split)})
    if cfg.data in EMBEDDED:  # drawn on the fly: only the names can be wrong
        missing = [s for pair in pairs for s in pair if s not in SPLITS]
        if missing:
            raise DataError(f"the embedded dataset has no split {missing[0]!r}; it has {', '.join(SPLITS)} "
                            f"(give --final-train-split train, or a local dataset)")
        return
    with library_errors():
        image_size, mean, std = probe_data_config(cfg.model)
    for train_split, eval_split in pairs:
        open_train_val(cfg.data, image_size, mean, std, cfg.embedded, cfg.skip_bad_images, train_split, eval_split)


def run(args) -> int:
    plan = SweepGrid(parse_grid(args.lr if args.lr is not None else FinetuneConfig.lr, "--lr"),
                     parse_grid(args.weight_decay if args.weight_decay is not None else FinetuneConfig.weight_decay,
                                "--weight-decay"),
                     args.search_epochs or args.epochs, args.epochs, args.search_train_split, args.search_eval_split,
                     args.final_train_split, args.final_eval_split)
    single = argparse.Namespace(**{**vars(args), "lr": plan.lrs[0], "weight_decay": plan.weight_decays[0]})
    cfg = from_namespace(FinetuneConfig, single)
    for lr, wd in plan.points():  # every point in range before the first one trains
        dataclasses.replace(cfg, lr=lr, weight_decay=wd).validate()
    spec = parse_data_spec(cfg.data)
    check_splits(cfg, plan)

    def train_point(settings: dict) -> dict:
        return finetune(dataclasses.replace(cfg, **settings, overwrite=not settings["resume"]),
                        resume_hint=CONTINUE_HINT)

    identity = {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY},
                "rank": cfg.method_rank, "data": absolute_data_spec(cfg.data)}
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.name in identity}
    record = {"method": cfg.method, "model": cfg.model, "data": absolute_data_spec(cfg.data), "dataset": spec.name}
    run_grid_search(plan, cfg.output, train_point, identity, record, quiet=cfg.quiet, identity_defaults=defaults)
    return 0
