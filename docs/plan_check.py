"""Regenerate the numbers of README's "Will it fit?" section, by running the code (nothing typed):

* `gift plan` for ViT-H/14 at batch 32 on a 24 GiB GPU, bf16 and nf4 backbones (the tool's own output), and
  `--memory auto` for DINOv3 ViT-7B at batch 64 on an 8 GiB GPU (the mode and the gradient accumulation it picks);
* NF4 with GIFT's targets kept in bf16 vs quantized too (`gift.nf4`), predicted the same way;
* predicted vs measured bytes of real CPU training steps (`gift.plan.compare_with_real_step`, what
  tests/model/test_plan.py asserts), written to docs/plan_check.md.

Usage: ``python docs/plan_check.py`` (a few CPU minutes; the real steps dominate).
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402  (after the sys.path line)

from gift.config import METHODS  # noqa: E402  (after the sys.path line)
from gift.files import atomic_write_text, write_marked_block  # noqa: E402  (after the sys.path line)
from gift.nf4 import quantize_frozen_linears  # noqa: E402  (after the sys.path line)
from gift.plan import (  # noqa: E402  (after the sys.path line)
    TrainingSetup,
    compare_with_real_step,
    fake_training_model,
    format_bytes,
)

HUGE = ["--model", "vit_huge_patch14_224", "--num-classes", "1000", "--batch-size", "32", "--device-memory", "24GiB",
        "--amp", "bfloat16"]
SEVEN_B = ["--model", "vit_7b_patch16_dinov3", "--batch-size", "64", "--device-memory", "8GiB", "--amp", "bf16",
           "--backbone-dtype", "nf4", "--memory", "auto"]
CHECKS = [(model, batch, method, 1) for model in ("vit_small_patch16_224", "vit_base_patch16_224")
          for batch in (2, 8) for method in METHODS]
CHECKS += [("vit_small_patch16_224", 8, "gift", 4)]  # an optimizer step of 4 accumulated micro-batches of 2
START, END = "<!-- plan:start -->", "<!-- plan:end -->"


def gift_plan(args: list[str]) -> str:
    command = [sys.executable, "-m", "gift", "plan"] + args
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return f"$ gift plan {' '.join(args)}\n{out.rstrip()}"


def nf4_targets_comparison() -> str:
    setup = TrainingSetup(
        model="vit_huge_patch14_224", num_classes=1000, batch_size=32, backbone_dtype="nf4", amp="bf16"
    )
    kept = fake_training_model(setup)
    quantized = fake_training_model(setup)
    with quantized.fake_mode:
        quantize_frozen_linears(quantized.model, targets=True)
    rows = ["| memory | targets | frozen weights | saved for backward | predicted peak |", "|---|---|---:|---:|---:|"]
    for mode in ("none", "block"):
        for label, fake in (("kept bf16", kept), ("NF4, dequantized per step", quantized)):
            b = fake.predict(32, mode)
            rows.append(f"| {mode} | {label} | {format_bytes(b.frozen)} | {format_bytes(b.saved_activation)} | "
                        f"{format_bytes(b.peak)} |")
    return "\n".join(rows)


def check_table() -> str:
    torch.set_num_threads(1)
    rows = ["| model | batch | method | memory | saved: predicted | saved: measured | diff | peak: predicted | "
            "peak: measured | parameters, grads, AdamW |", "|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for model, batch, method, accumulation in CHECKS:
        setup = TrainingSetup(model=model, batch_size=batch, method=method, num_classes=10,
                              grad_accum_steps=accumulation)
        for mode, predicted, measured in compare_with_real_step(setup):
            diff = (predicted.saved_activation - measured.saved_activation) / measured.saved_activation
            exact = all(
                getattr(predicted, k) == getattr(measured, k) for k in ("frozen", "trainable", "gradient", "optimizer")
            )
            rows.append(
                f"| {model} | {setup.batch_text('').strip()} | {method} | {mode} | {predicted.saved_activation:,} | "
                f"{measured.saved_activation:,} | {100 * diff:+.2f}% | {predicted.peak:,} | {measured.peak:,} | "
                f"{'equal' if exact else 'DIFFERENT'} |"
            )
    return "\n".join(rows)


def main() -> None:
    plans = "\n\n".join([gift_plan(HUGE + ["--backbone-dtype", dtype]) for dtype in ("bfloat16", "nf4")]
                        + [gift_plan(SEVEN_B)])
    nf4 = nf4_targets_comparison()
    table = check_table()
    header = ("# `gift plan`: predicted vs measured\n\nBytes of one training step (forward, backward, AdamW step) "
              "on this machine's CPU, measured with `gift.memory` on real tensors and predicted by `gift plan` on "
              "fake ones. Written by `python docs/plan_check.py`; tests/model/test_plan.py asserts the same rows "
              "(saved bytes within 3%, parameter side exact).\n\n")
    atomic_write_text(os.path.join(ROOT, "docs", "plan_check.md"), header + table + "\n")
    section = (
        f"\n```text\n{plans}\n```\n\nNF4 backbone, GIFT's targets kept in bf16 (what `--backbone-dtype "
        f"nf4` does) or quantized too, ViT-H/14, batch 32, `--amp bf16`:\n\n{nf4}\n\nPredicted vs measured on real "
        f"CPU steps ([docs/plan_check.md](docs/plan_check.md), asserted by tests/model/test_plan.py):\n\n{table}\n"
    )
    try:
        write_marked_block(os.path.join(ROOT, "README.md"), START, END, section)
    except ValueError as e:
        raise SystemExit(f"README.md: {e}") from None
    print("wrote docs/plan_check.md and README.md's Will it fit? section")


if __name__ == "__main__":
    main()
