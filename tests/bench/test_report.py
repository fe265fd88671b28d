"""bench/report.py: the bench's tables and the README section from its rows."""
import os

from bench import report


def test_report_states_met_and_missed_targets_with_numbers_and_the_runs_dtype():
    def row(x, provider, metric, value):
        return {"kernel": "train_step", "x": x, "provider": provider, "mode": "step", "metric": metric, "value": value,
                "device": "cpu", "dtype": "bfloat16", "torch": "2", "triton": "3"}

    b8, s2 = "vit_base_patch16_224 b8", "vit_small_patch16_224 b2"
    rows = [row(b8, "fast_torch", "ratio_vs_lora", 1.074), row(b8, "fast_torch", "ratio_vs_lora_q1", 1.066),
            row(b8, "fast_torch", "ratio_vs_lora_q3", 1.082), row(b8, "fast_torch", "ratio_vs_floor", 1.12),
            row(b8, "fast_torch", "saved_vs_lora", 1.021), row(b8, "fast_torch", "saved_vs_floor", 1.05),
            row(s2, "fast_torch", "ratio_vs_lora", 1.01), row(s2, "fast_torch", "ratio_vs_lora_q1", 0.99),
            row(s2, "fast_torch", "ratio_vs_lora_q3", 1.06)]
    lines = report.target_lines(rows)
    assert len(lines) == 4  # ViT-S saved bytes were not measured: no line
    assert "step time <= 1.00x LoRA r=64: **missed**: 1.074 ±0.008x" in lines[0]
    assert "1.120x the fair floor" in lines[0]
    assert "<= 1.05x LoRA r=64: met at the median (q3 above) (measured" in lines[1]  # median 1.01, q3 1.06
    assert "saved bytes <= 1.03x LoRA r=64: met (measured 1.021x LoRA; 1.050x the fair floor)" in lines[2]
    assert lines[3] == "- spread: the widest half-IQR of a vit_base_patch16_224 b8 ratio is ±0.7% (aim: under ±1%)"
    rows[-1] = row(s2, "fast_torch", "ratio_vs_lora_q3", 1.04)
    assert "<= 1.05x LoRA r=64: met (measured" in report.target_lines(rows)[1]
    rows += [row(b8, "reference", "reference_own_out_rel", 3e-3), row(b8, "reference", "reference_own_grad_rel", 5e-3)]
    md = report.markdown(rows)
    assert "own bf16 error 3.0e-03 / 5.0e-03" in md and "its own bf16-vs-float64 error" in md and "fp32" not in md


def test_report_states_the_accumulation_and_eval_targets():
    def row(kernel, x, provider, metric, value):
        return {"kernel": kernel, "x": x, "provider": provider, "mode": "step", "metric": metric, "value": value,
                "device": "cpu", "dtype": "float32", "torch": "2", "triton": "3"}

    acc, ev = "vit_small_patch16_224 b8 as 4x2", "vit_small_patch16_224 b2"
    rows = [row("train_step_accumulated", acc, "fast_torch", "ratio_vs_lora", 0.99),
            row("train_step_accumulated", acc, "fast_torch", "ratio_vs_lora_q1", 0.98),
            row("train_step_accumulated", acc, "fast_torch", "ratio_vs_lora_q3", 1.02),
            row("train_step_accumulated", acc, "fast_torch", "ratio_vs_floor", 1.05),
            row("train_step_accumulated", acc, "lora", "ratio_vs_floor", 1.02),
            row("eval_forward", ev, "fast_torch", "ratio_vs_merged", 1.10),
            row("eval_forward", ev, "fast_torch", "ratio_vs_merged_q1", 1.08),
            row("eval_forward", ev, "fast_torch", "ratio_vs_merged_q3", 1.12)]
    lines = report.target_lines(rows)
    assert len(lines) == 3
    assert "b8 as 4x2, FastGIFT (fast_torch) time per optimizer step <= 1.00x LoRA r=64: met at the median" in lines[0]
    assert "b2, FastGIFT (fast_torch) eval forward (cached residuals) <= 1.03x the merged model: **missed**" in lines[1]
    assert "fair-floor ratio within 0.02 of LoRA r=64's: **missed** (FastGIFT 1.050x, LoRA 1.020x" in lines[2]
    rows[3] = row("train_step_accumulated", acc, "fast_torch", "ratio_vs_floor", 1.03)
    assert "within 0.02 of LoRA r=64's: met" in report.target_lines(rows)[2]
    md = report.markdown(rows)
    assert "**train_step_accumulated**" in md and "**eval_forward**" in md and "| x merged |" in md


def test_without_matplotlib_the_tables_are_written_and_one_line_says_how_to_get_the_chart(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    rows = [{"kernel": "train_step", "x": "vit_base_patch16_224 b8", "provider": "fast_torch", "mode": "step",
             "metric": "ratio_vs_floor", "value": 1.02, "device": "cpu", "dtype": "float32", "torch": "2",
             "triton": "3"}]
    out = tmp_path / "results" / "cpu"
    out.mkdir(parents=True)
    (out / "results.png").write_bytes(b"the chart of an earlier bench run")  # stale: it must not stay
    said = report.write_all(rows, str(out))
    assert said == report.CHART_NEEDS and "pip install 'gift[plots]'" in said and len(said.splitlines()) == 1
    assert sorted(os.listdir(out)) == ["results.csv", "results.md"]
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{report.START}\nold\n{report.END}\n")
    report.update_readme(str(tmp_path / "results"), str(readme))
    assert "#### `cpu`" in readme.read_text() and "results.png" not in readme.read_text()  # no link to a missing chart
