"""`gift report RUN_DIR...`: the ``eval.json`` files under the given folders as the paper's results table.

Rows are methods, columns datasets (FGVC) or VTAB-1k tasks grouped Natural / Specialized / Structured with
each group's mean, then the mean over all columns (the paper's VTAB-1k mean is over the 19 tasks) and the
trainable parameters in millions (averaged over the row's datasets: the classifier differs per dataset).
Writes ``results.md``, ``results.csv`` and ``results.png`` (a bar chart; needs matplotlib) to ``--output``.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass

from ...files import atomic_write, atomic_write_text
from ..data import VTAB1K_GROUPS, VTAB1K_TASKS, parse_data_spec
from ..errors import UsageError, check_output_folder, missing_extra
from ..results import EVAL_JSON

FGVC_ORDER = ("cub", "nabirds", "oxfordflowers", "stanforddogs", "stanfordcars")
METHOD_NAMES = {"gift": "GIFT", "lora": "LoRA", "linear": "Linear probe", "full": "Full fine-tuning"}


class ReportError(UsageError):
    """No results, a malformed eval.json or two results for one cell: one line naming the files."""


@dataclass
class Table:
    """``cells[method][column]`` top-1 in percent; ``columns`` in display order with their group ('' if none)."""

    methods: list[str]
    columns: list[tuple[str, str]]
    cells: dict[str, dict[str, float]]
    params_m: dict[str, float]

    @property
    def groups(self) -> list[str]:
        return [g for g in VTAB1K_GROUPS if any(group == g for group, _ in self.columns)]

    def mean(self, method: str, group: str | None = None) -> float | None:
        values = [self.cells[method][c] for g, c in self.columns
                  if (group is None or g == group) and c in self.cells[method]]
        return sum(values) / len(values) if values else None

    def header(self) -> list[str]:
        head = ["Method", "Params (M)"]
        for group in self.groups or [""]:
            head += [c for g, c in self.columns if g == group] + ([f"{group} mean"] if group else [])
        return head + [c for g, c in self.columns if g and g not in VTAB1K_GROUPS] + ["Mean"]

    def rows(self) -> list[list[float | str | None]]:
        out = []
        for m in self.methods:
            row = [METHOD_NAMES.get(m, m), self.params_m[m]]
            for group in self.groups or [""]:
                row += [self.cells[m].get(c) for g, c in self.columns if g == group]
                row += [self.mean(m, group)] if group else []
            out.append(row + [self.cells[m].get(c) for g, c in self.columns if g and g not in VTAB1K_GROUPS]
                       + [self.mean(m)])
        return out


def find_results(run_dirs: list[str], split: str = "test") -> list[tuple[str, dict]]:
    """[(path, record)] of every ``eval.json`` under ``run_dirs`` evaluated on ``split``."""
    found = []
    for run_dir in run_dirs:
        if not os.path.exists(run_dir):
            raise ReportError(f"{run_dir}: no such folder")
        paths = [run_dir] if os.path.isfile(run_dir) else sorted(
            os.path.join(d, EVAL_JSON) for d, _, files in os.walk(run_dir) if EVAL_JSON in files)
        for path in paths:
            try:
                with open(path, encoding="utf-8") as f:
                    record = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ReportError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
            missing = [k for k in ("method", "top1") if k not in record] + (
                [] if "dataset" in record or "data" in record else ["dataset"])
            if missing:
                raise ReportError(f"{path}: not a gift eval.json (no {', '.join(missing)})")
            if record.get("split", split) == split:
                found.append((path, record))
    if not found:
        raise ReportError(f"no eval.json with {split} results under {', '.join(run_dirs)} "
                          f"(`gift sweep` writes OUTPUT/final/eval.json, `gift eval` writes eval.json)")
    return found


def dataset_name(record: dict) -> str:
    return record.get("dataset") or parse_data_spec(record["data"]).name


def build_table(results: list[tuple[str, dict]]) -> Table:
    cells, params, sources = {}, {}, {}
    for path, record in results:
        method, dataset = record.get("label") or record["method"], dataset_name(record)
        if (method, dataset) in sources:
            raise ReportError(f"two {record.get('split', '')} results for {method} on {dataset}: "
                              f"{sources[(method, dataset)]} and {path}; give one run per method and dataset")
        sources[(method, dataset)] = path
        cells.setdefault(method, {})[dataset] = 100.0 * float(record["top1"])  # eval.json: a fraction
        if record.get("trainable_parameters") is not None:
            params.setdefault(method, []).append(float(record["trainable_parameters"]))
    datasets = {d for row in cells.values() for d in row}
    vtab = [t for t in VTAB1K_TASKS if t in datasets]
    others = [d for d in FGVC_ORDER if d in datasets] + sorted(datasets - set(vtab) - set(FGVC_ORDER))
    columns = [(VTAB1K_TASKS[t][0], t) for t in vtab] + [("other" if vtab else "", d) for d in others]
    order = [m for m in METHOD_NAMES if m in cells] + sorted(set(cells) - set(METHOD_NAMES))
    params_m = {m: sum(params[m]) / len(params[m]) / 1e6 if m in params else None for m in order}
    return Table(order, columns, cells, params_m)


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else value if isinstance(value, str) else f"{value:.{digits}f}"


def table_markdown(table: Table, split: str) -> str:
    head = table.header()
    lines = [f"Top-1 accuracy (%) on {split}, trainable parameters in millions.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in table.rows():
        lines.append("| " + " | ".join([row[0], _fmt(row[1], 3)] + [_fmt(v) for v in row[2:]]) + " |")
    missing = [f"{METHOD_NAMES.get(m, m)}: {', '.join(c for _, c in table.columns if c not in table.cells[m])}"
               for m in table.methods if len(table.cells[m]) < len(table.columns)]
    if missing:
        lines += ["", "Means are over the columns each row has; missing (-): " + "; ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def table_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(table.header())
    for row in table.rows():
        w.writerow([row[0]] + ["" if v is None else f"{v:.4f}" for v in row[1:]])
    return buf.getvalue()


def bar_chart(table: Table, path: str, split: str) -> None:
    """Grouped bars: one group per column (and the mean), one bar per method; a PNG at ``path``."""
    problem = missing_extra("matplotlib", "plots", "the bar chart")
    if problem:
        raise ReportError(f"{problem} (the Markdown and CSV tables are written; --no-chart skips the chart)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [c for _, c in table.columns] + ["Mean"]
    width = 0.8 / len(table.methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(labels) * max(1, len(table.methods)) ** 0.5), 3.8))
    for i, m in enumerate(table.methods):
        values = [table.cells[m].get(c, 0.0) for c in labels[:-1]] + [table.mean(m) or 0.0]
        ax.bar([x + (i - (len(table.methods) - 1) / 2) * width for x in range(len(labels))], values, width,
               label=METHOD_NAMES.get(m, m) + (f" ({table.params_m[m]:.3f}M)" if table.params_m[m] is not None else ""))
    ax.set_xticks(
        range(len(labels)), labels, rotation=45 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center"
    )
    ax.set_ylabel(f"top-1 on {split} (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def write_report(run_dirs: list[str], output: str, split: str = "test", chart: bool = True) -> dict:
    """Collect, tabulate, write; returns ``{"markdown": path, "csv": path, "chart": path or None, "table": Table}``."""
    table = build_table(find_results(run_dirs, split))
    check_output_folder(output)
    paths = {"markdown": os.path.join(output, "results.md"), "csv": os.path.join(output, "results.csv"),
             "chart": os.path.join(output, "results.png") if chart else None, "table": table}
    atomic_write_text(paths["markdown"], table_markdown(table, split))
    atomic_write_text(paths["csv"], table_csv(table))
    if chart:
        bar_chart(table, paths["chart"], split)
    return paths


def add_arguments(parser) -> None:
    """`gift report RUN_DIR... [--output DIR] [--split test] [--no-chart]`."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders searched for eval.json files")
    parser.add_argument("--output", default="report", help="where results.md, results.csv and results.png go")
    parser.add_argument("--split", default="test", help="use the results on this split (default test)")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG bar chart (no matplotlib needed)")


def run(args) -> int:
    paths = write_report(args.run_dirs, args.output, args.split, chart=not args.no_chart)
    print(table_markdown(paths["table"], args.split), end="")
    print("wrote " + ", ".join(paths[k] for k in ("markdown", "csv", "chart") if paths[k]))
    return 0
