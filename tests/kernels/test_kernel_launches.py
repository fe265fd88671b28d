"""Triton launches and aten compute ops per op and direction, counted with a TorchDispatchMode and a wrapper on
the kernels' launch (under the interpreter); the README's table is exactly what this measures."""
from pathlib import Path

import pytest
import torch

import gift_kernels
from gift_kernels.dev.kernel_launches import (
    COUNT_SHAPES,
    README_END,
    README_START,
    count_launches,
    launch_count_markdown,
    op_launch_counts,
)

pytestmark = pytest.mark.skipif(not gift_kernels.triton_available("cpu"), reason="needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_forward_launches(dtype):
    paca = op_launch_counts("paca_attention", dtype, COUNT_SHAPES["paca_attention"])
    assert paca["forward"].triton == ["_paca_cluster_pool", "_paca_cluster_side_fwd", "_paca_attn_fwd"]
    assert paca["forward"].aten == []
    assert paca["backward"].triton == ["_paca_attn_bwd", "_paca_cluster_side_bwd", "_paca_cluster_bwd", "_sum_rows",
                                       "_sum_rows"]
    assert paca["backward"].aten == []                     # partial sums, cluster side and casts all in kernels
    residual = op_launch_counts("lowrank_residual_linear", dtype, COUNT_SHAPES["lowrank_residual_linear"])
    assert residual["forward"].triton == ["_matmul_lowrank_epilogue"] and residual["forward"].aten == ["mm"]
    assert residual["backward"].triton == ["_matmul_lowrank_epilogue"] and residual["backward"].aten == ["mm"] * 3


def test_counter_sees_aten_compute_ops_but_not_views():
    x = torch.randn(4, 5)
    _, counts = count_launches(lambda: (x.t() @ x).view(-1).sum())
    assert counts.triton == [] and counts.aten == ["mm", "sum"]


def test_readme_states_the_measured_counts():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert block == launch_count_markdown(), "regenerate with: python -m gift_kernels.dev.kernel_launches README.md"
