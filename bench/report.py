"""Turn the bench's rows into results.csv, results.md and results.png, and the README's section."""
from __future__ import annotations

import csv
import glob
import importlib.util
import io
import os

from bench.harness import format_ratio
from gift.dtypes import short_name
from gift.files import atomic_write_text, replace_marked_block

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
COLUMNS = ["kernel", "x", "provider", "mode", "metric", "value", "device", "dtype", "torch", "triton"]

# The bench's targets, stated against LoRA at the same rank (and, for eval, the merged model):
# (kernel, model label, metric, limit, what)
TARGETS = [
    ("train_step", "vit_base_patch16_224 b8", "ratio_vs_lora", 1.00, "step time"),
    ("train_step", "vit_small_patch16_224 b2", "ratio_vs_lora", 1.05, "step time"),
    ("train_step", "vit_base_patch16_224 b8", "saved_vs_lora", 1.03, "saved bytes"),
    ("train_step", "vit_small_patch16_224 b2", "saved_vs_lora", 1.03, "saved bytes"),
    ("train_step_accumulated", "vit_small_patch16_224 b8 as 4x2", "ratio_vs_lora", 1.00, "time per optimizer step"),
    ("eval_forward", "vit_small_patch16_224 b2", "ratio_vs_merged", 1.03, "eval forward (cached residuals)"),
    ("eval_forward", "vit_base_patch16_224 b8", "ratio_vs_merged", 1.03, "eval forward (cached residuals)"),
    # compiled against compiled (a sixth field: the provider measured, else `FAST_PROVIDERS`')
    ("train_step", "vit_base_patch16_224 b8", "ratio_vs_lora+compile", 1.00, "compiled step time",
     "fast_torch+compile"),
    ("train_step", "vit_small_patch16_224 b2", "ratio_vs_lora+compile", 1.00, "compiled step time",
     "fast_torch+compile"),
]
# FastGIFT's fair-floor ratio within this of LoRA's, with the same accumulation: (kernel, model label, limit)
FLOOR_GAP_TARGETS = [("train_step_accumulated", "vit_small_patch16_224 b8 as 4x2", 0.02)]
BASELINE_NAMES = {"lora": "LoRA r=64", "merged": "the merged model", "lora+compile": "LoRA r=64 compiled"}
SPREAD_MODEL = "vit_base_patch16_224 b8"  # its ratios should have a half-IQR under 1%
FAST_PROVIDERS = ("fast_triton", "fast_torch")  # what FastGIFT runs by default on the device (Triton on CUDA)
STEP_RATIOS = [
    ("floor", "x floor"),
    ("lora", "x LoRA r=64"),
    ("naive_merged", "x naive_merged"),
    ("reference", "x reference"),
    ("lora+compile", "x LoRA compiled"),
]
OP_RATIOS = [("reference", "x reference"), ("fast_torch", "x torch path"), ("floor", "x frozen linear")]


def _pivot(rows, kernel):
    table: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r["kernel"] == kernel:
            table.setdefault((r["x"], r["provider"]), {})[r["metric"]] = r["value"]
    return table


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def _ratio(m: dict, base: str) -> str:
    return format_ratio(m.get(f"ratio_vs_{base}"), m.get(f"ratio_vs_{base}_q1"), m.get(f"ratio_vs_{base}_q3"))


def dtype_label(rows) -> str:
    """The run's dtype as the tables name it (``float32`` -> ``fp32``), from its rows."""
    return short_name(rows[0].get("dtype") or "float32")


def _agreement(m: dict, provider: str, dtype: str) -> str:
    if provider == "reference" and "reference_own_out_rel" in m:
        return f"own {dtype} error {m['reference_own_out_rel']:.1e} / {m['reference_own_grad_rel']:.1e}"
    if "agree_out_rel" not in m:
        return ""
    return f"{m['agree_out_rel']:.1e} / {m['agree_grad_rel']:.1e}" + ("" if m.get("agree_ok", 1.0) else " FAIL")


def target_lines(rows) -> list[str]:
    """One line per target of `TARGETS` that was measured: "met" when the upper quartile of the per-round
    ratios is within the limit, "met at the median (q3 above)" when only the median is, else "missed" with the
    number; for step times the ratio to the fair floor beside it. (Saved bytes have no spread: the value is its own
    q3.) Then `FLOOR_GAP_TARGETS` (FastGIFT's floor ratio minus LoRA's, at the medians) and the spread line."""
    lines = []
    for kernel, model, metric, limit, what, *measured in TARGETS:
        table = _pivot(rows, kernel)
        provider = next((p for p in (measured or FAST_PROVIDERS) if (model, p) in table), None)
        if provider is None:
            continue
        m = table[(model, provider)]
        value = m.get(metric)
        if value is None:
            continue
        base = metric.split("_vs_", 1)[1]
        shown = _ratio(m, base) if metric.startswith("ratio_vs_") else f"{value:.3f}"
        floor = _ratio(m, "floor") if metric.startswith("ratio_vs_") else _fmt(m.get("saved_vs_floor"), ".3f")
        q3 = m.get(f"{metric}_q3", value)
        verdict = (
            ("met" if q3 <= limit else "met at the median (q3 above)") if value <= limit else f"**missed**: {shown}x"
        )
        name = BASELINE_NAMES[base]
        floor_text = f"; {floor}x the fair floor" if floor else ""
        short = name.replace(" r=64", "") if base.startswith("lora") else name
        lines.append(f"- {model}, FastGIFT ({provider}) {what} <= {limit:.2f}x {name}: {verdict} "
                     f"(measured {shown}x {short}{floor_text})")
    for kernel, model, limit in FLOOR_GAP_TARGETS:
        table = _pivot(rows, kernel)
        provider = next((p for p in FAST_PROVIDERS if (model, p) in table), None)
        lora = table.get((model, "lora"), {}).get("ratio_vs_floor")
        fast = table.get((model, provider), {}).get("ratio_vs_floor") if provider else None
        if lora is None or fast is None:
            continue
        gap = fast - lora
        lines.append(f"- {model}, FastGIFT ({provider}) fair-floor ratio within {limit:.2f} of LoRA r=64's: "
                     + ("met" if gap <= limit else "**missed**")
                     + f" (FastGIFT {fast:.3f}x, LoRA {lora:.3f}x the fair floor, medians)")
    steps = _pivot(rows, "train_step")
    spread = [(m[f"ratio_vs_{b}_q3"] - m[f"ratio_vs_{b}_q1"]) / 2 / m[f"ratio_vs_{b}"]
              for (x, _), m in steps.items() if x == SPREAD_MODEL for b, _ in STEP_RATIOS if f"ratio_vs_{b}_q1" in m]
    if lines and spread:
        worst = max(spread)
        lines.append(
            f"- spread: the widest half-IQR of a {SPREAD_MODEL} ratio is ±{100 * worst:.1f}% "
            + ("(aim: under ±1%)" if worst < 0.01 else "(**over the ±1% aim**: more rounds, or a quieter machine)")
        )
    return lines


def markdown(rows) -> str:
    device, dtype = rows[0]["device"], dtype_label(rows)
    lines = [f"Device: `{device}`, dtype {rows[0]['dtype']}, torch {rows[0]['torch']}, triton {rows[0]['triton']}. "
             "Ratios: median over interleaved rounds of the paired per-round ratio, ± half its interquartile range, "
             "printed to the digit that spread supports (bench/README.md defines every provider, the fair floor "
             "included); saved MiB counts tensors saved for backward (unique storages, parameters and buffers "
             "excluded); agreement is the max relative error, each tensor at its own scale, of the logits / of every "
             "trained gradient vs a float64 reference (the reference's row: its own "
             f"{dtype}-vs-float64 error).", ""]
    targets = target_lines(rows)
    if targets:
        lines += ["Targets (FastGIFT vs LoRA at the same rank):", "", *targets, ""]
    steps = _pivot(rows, "train_step")
    if steps:
        peak = any("cuda_step_peak_mib" in m for m in steps.values())
        lines += [
            "| model | provider | rounds | step ms | "
            + " | ".join(h for _, h in STEP_RATIOS)
            + " | saved MiB | x LoRA saved | x floor saved |"
            + (" GPU step peak MiB |" if peak else "")
            + " compile s (first step, not timed) | agreement out / grad |",
            "|---|---|---:|---:|" + "---:|" * len(STEP_RATIOS) + "---:|---:|---:|" + ("---:|" if peak else "")
            + "---:|---|",
        ]
        for (x, provider), m in steps.items():
            lines.append(f"| {x} | {provider} | {_fmt(m.get('rounds'), '.0f')} | {_fmt(m.get('time_ms_p50'), '.1f')} | "
                         + " | ".join(_ratio(m, b) for b, _ in STEP_RATIOS)
                         + f" | {_fmt(m.get('saved_mib'), '.1f')} | {_fmt(m.get('saved_vs_lora'), '.3f')} "
                         f"| {_fmt(m.get('saved_vs_floor'), '.3f')} |"
                         + (f" {_fmt(m.get('cuda_step_peak_mib'), '.0f')} |" if peak else "")
                         + f" {_fmt(m.get('compile_s'), '.1f')} | {_agreement(m, provider, dtype)} |")
        lines.append("")
    for kernel, ratios, title in (
        ("train_step_accumulated", [("floor", "x floor"), ("lora", "x LoRA r=64")],
         "one optimizer step of accumulated micro-batches (forward + backward each, then AdamW)"),
        ("eval_forward", [("merged", "x merged")],
         "one inference forward; FastGIFT unmerged with its cached residuals"),
    ):
        table = _pivot(rows, kernel)
        if not table:
            continue
        lines += [f"**{kernel}** ({title})", "",
                  "| model | provider | rounds | ms | " + " | ".join(h for _, h in ratios) + " |",
                  "|---|---|---:|---:|" + "---:|" * len(ratios)]
        for (x, provider), m in table.items():
            lines.append(f"| {x} | {provider} | {_fmt(m.get('rounds'), '.0f')} | {_fmt(m.get('time_ms_p50'), '.1f')} | "
                         + " | ".join(_ratio(m, b) for b, _ in ratios) + " |")
        lines.append("")
    for kernel in ("paca_step", "residual_linear"):
        ops = _pivot(rows, kernel)
        if not ops:
            continue
        lines += [
            f"**{kernel}** (forward + backward; inputs prepared outside the timed region)",
            "",
            "| shape | provider | ms | "
            + " | ".join(h for _, h in OP_RATIOS)
            + " | saved MiB | agreement out / grad |",
            "|---|---|---:|" + "---:|" * len(OP_RATIOS) + "---:|---|",
        ]
        for (x, provider), m in ops.items():
            lines.append(f"| {x} | {provider} | {_fmt(m.get('time_ms_p50'), '.2f')} | "
                         + " | ".join(_ratio(m, b) for b, _ in OP_RATIOS)
                         + f" | {_fmt(m.get('saved_mib'), '.1f')} | {_agreement(m, provider, dtype)} |")
        lines.append("")
    return "\n".join(lines)


def bar_chart(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = _pivot(rows, "train_step")
    models = sorted({x for x, _ in steps})
    providers = [p for p in dict.fromkeys(p for _, p in steps)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(providers), 1)
    for ax, metric, title in ((axes[0], "ratio_vs_floor", "training step time / fair floor"),
                              (axes[1], "saved_mib", "activation MiB saved for backward")):
        for i, provider in enumerate(providers):
            values = [steps.get((m, provider), {}).get(metric) or 0.0 for m in models]
            ax.bar([j + i * width for j in range(len(models))], values, width, label=provider)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, fontsize=8)
        ax.set_title(title)
        if metric == "ratio_vs_floor":
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylim(0.8, None)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"gift bench on {rows[0]['device']} ({rows[0]['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CHART_NEEDS = ("results.png not drawn: matplotlib is not installed (pip install 'gift[plots]', then "
               "python -m bench.report draws it from results.csv)")


def write_all(rows, out_dir: str) -> str | None:
    """results.csv, results.md and (with matplotlib) results.png in ``out_dir``, each atomically (a chart
    not drawn now is removed, not left from earlier results); returns the one line saying how to get the
    chart when matplotlib is missing, else None."""
    os.makedirs(out_dir, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in COLUMNS})
    atomic_write_text(os.path.join(out_dir, "results.csv"), text.getvalue())
    atomic_write_text(os.path.join(out_dir, "results.md"), markdown(rows) + "\n")
    chart = os.path.join(out_dir, "results.png")
    drawn = any(r["kernel"] == "train_step" for r in rows) and importlib.util.find_spec("matplotlib") is not None
    if not drawn and os.path.exists(chart):
        os.remove(chart)  # a chart of earlier results would be shown under these tables
    if not any(r["kernel"] == "train_step" for r in rows):
        return None
    if not drawn:
        return CHART_NEEDS
    bar_chart(rows, chart)
    return None


def update_readme(results_root: str, readme: str) -> None:
    """Rewrite the README between the bench markers from every ``results/<device>/results.md``."""
    if not os.path.isfile(readme):
        return
    parts = []
    for md in sorted(glob.glob(os.path.join(results_root, "*", "results.md"))):
        device = os.path.basename(os.path.dirname(md))
        chart = os.path.join(os.path.dirname(md), "results.png")
        with open(md, encoding="utf-8") as f:
            parts.append(f"#### `{device}`\n\n" + f.read().strip()
                         + (f"\n\n![bench chart](bench/results/{device}/results.png)\n" if os.path.isfile(chart)
                            else "\n"))
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    if START not in text or END not in text:
        return
    body = "\n".join(parts) if parts else "No bench results yet: run `make bench`."
    generated = f"\n<!-- generated by `make bench` from bench/results/*/results.md; do not edit by hand -->\n{body}\n"
    atomic_write_text(readme, replace_marked_block(text, START, END, generated))


def _read_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["value"] = None if r["value"] in ("", "None") else float(r["value"])
    return rows


def main() -> None:
    """``python -m bench.report``: rebuild results.md, results.png and the README section from every
    ``bench/results/<device>/results.csv`` (no measuring)."""
    root = os.path.join(os.path.dirname(__file__), "results")
    for path in sorted(glob.glob(os.path.join(root, "*", "results.csv"))):
        missing = write_all(_read_csv(path), os.path.dirname(path))
        if missing:
            print(missing)
    update_readme(root, os.path.join(os.path.dirname(__file__), "..", "README.md"))


if __name__ == "__main__":
    main()
