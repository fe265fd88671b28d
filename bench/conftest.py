"""`pytest bench/`: options, the shared result table, and the files written at the end of the run."""
from __future__ import annotations

import os

import pytest
import torch

from bench import report
from bench.harness import device_slug
from gift.dtypes import AUTOCAST_DTYPES, expand_alias, torch_dtype

RESULTS_ROOT = os.path.join(os.path.dirname(__file__), "results")


def pytest_addoption(parser):
    group = parser.getgroup("gift bench")
    group.addoption("--bench-large", action="store_true", default=None,
                    help="also ViT-L/16 and ViT-H/14 (default: on with CUDA, off on CPU)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--bench-dtype", default="float32", choices=("float32",) + AUTOCAST_DTYPES, type=expand_alias,
                    help="compute dtype of the training step (autocast for 16-bit; bf16 and fp16 read as those)")
    group.addoption("--bench-batch", type=int, default=None, help="override every model's batch size")
    group.addoption(
        "--bench-rounds",
        type=int,
        default=None,
        help="interleaved timing rounds of every model and op (default: $GIFT_BENCH_ROUNDS, else per model)",
    )
    group.addoption("--bench-out", default=None, help="results folder (default bench/results/<device>)")


def bench_device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pytest_configure(config):
    device = bench_device(config)
    out = config.getoption("--bench-out") or os.path.join(RESULTS_ROOT, device_slug(device))
    os.makedirs(out, exist_ok=True)
    config.gift_bench_out = out
    config.gift_bench_rows = []
    if hasattr(config.option, "benchmark_json") and not config.option.benchmark_json:
        config.option.benchmark_json = os.path.join(out, "benchmark.json")


@pytest.fixture(scope="session")
def bench_config(request):
    config = request.config
    device = bench_device(config)
    large = config.getoption("--bench-large")
    return {
        "device": device,
        "dtype": torch_dtype(config.getoption("--bench-dtype")),
        "large": device.type == "cuda" if large is None else large,
        "batch": config.getoption("--bench-batch"),
        "rounds": config.getoption("--bench-rounds"),
        "rows": config.gift_bench_rows,
    }


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    rows = getattr(config, "gift_bench_rows", None)
    if rows:
        missing_chart = report.write_all(rows, config.gift_bench_out)
        report.update_readme(RESULTS_ROOT, os.path.join(os.path.dirname(RESULTS_ROOT), "..", "README.md"))
        if missing_chart:
            reporter = config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(missing_chart)
            else:
                print(missing_chart)
