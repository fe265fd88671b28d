"""The launch configurations a GPU would use, run on CPU: ``GIFT_SM_COUNT`` under TRITON_INTERPRET=1 gives the
launchers exactly the CUDA tiles and split arithmetic (see gift_kernels/launch.py).

Shapes here are chosen so that the split count does not divide the number of N-blocks (the case that read
and wrote one block past N before the fix). The ViT-H shape L=32, N=1280, r=64, M=64 runs once (fp32, 132
SMs, ~30 s on the interpreter); the smaller shape L=12, N=448, M=16, r=16, heads=4 has the same property
for 80, 108 and 132 SMs and runs in fp32 and fp16.
"""
import pytest
import torch

import gift_kernels
from gift_kernels.launch import ARCH_PROPS, DeviceProps, cdiv, device_props, paca_launch, residual_launch
from gift_kernels.testing import (assert_agree, paca_case, paca_outputs_and_grads, residual_case,
                                  residual_outputs_and_grads)

SM_COUNTS = [80, 108, 132]
RAGGED_SPLIT_SHAPE = (12, 448, 16, 16, 4)           # (L, N, M, r, heads): N a multiple of BLOCK_N = 64
VIT_H_SHAPE = (32, 1280, 64, 16 * 4, 1)             # the case: 7 splits x 3 blocks for 20 blocks
pytestmark = pytest.mark.skipif(not gift_kernels.triton_available("cpu"), reason="needs TRITON_INTERPRET=1")


def _uneven(shape, sm_count):
    L, N, M, r, h = shape
    cfg = paca_launch(L, N, M, r, h, DeviceProps(sm_count, 227 * 1024, (9, 0)))
    return cfg.splits * cfg.blocks_per_split != cfg.n_blocks


@pytest.mark.parametrize("sm_count", SM_COUNTS)
def test_sm_count_override_gives_the_cuda_configuration_under_the_interpreter(monkeypatch, sm_count):
    monkeypatch.setenv("GIFT_SM_COUNT", str(sm_count))
    props = device_props(torch.device("cpu"))
    assert props == DeviceProps(sm_count, ARCH_PROPS["sm_90"].shared_bytes, (9, 0))
    assert not props.interpreter
    cfg = paca_launch(*RAGGED_SPLIT_SHAPE, props)
    assert (cfg.block_n, cfg.block_m, cfg.block_r) == (64, 16, 16)
    assert residual_launch(394, 136, 200, 24, torch.float32, props).block_m == 128
    monkeypatch.setenv("GIFT_SM_COUNT", "many")
    with pytest.raises(ValueError, match="GIFT_SM_COUNT='many' is not a positive integer"):
        device_props(torch.device("cpu"))


def test_test_shapes_have_splits_that_do_not_divide_the_blocks():
    assert all(_uneven(RAGGED_SPLIT_SHAPE, sm) for sm in SM_COUNTS)
    assert _uneven(VIT_H_SHAPE, 132) and _uneven(VIT_H_SHAPE, 108)


@pytest.mark.parametrize("sm_count", [1, 2, 7, 80, 108, 132, 142, 1000])
def test_splits_visit_every_block_once_and_never_one_past_n(sm_count):
    props = DeviceProps(sm_count, 227 * 1024, (9, 0))
    for L in (1, 3, 12, 24, 32, 40, 48):
        for N in (1, 63, 64, 65, 192, 197, 384, 577, 768, 1024, 1280, 1408, 1664, 4097):
            for M, r in ((16, 16), (64, 64), (256, 128), (5, 24)):
                for heads in (1, 2, 4):
                    cfg = paca_launch(L, N, M, r, heads, props)
                    ranges = cfg.split_ranges()
                    assert cfg.n_blocks == cdiv(N, cfg.block_n)
                    assert [b for rg in ranges for b in rg] == list(range(cfg.n_blocks)), (L, N, M, r, heads)
                    assert all(len(rg) > 0 for rg in ranges), "a split without a block"
                    assert cfg.splits <= max(1, cdiv(2 * sm_count, L * heads))


def _paca_agrees(shape, dtype):
    t, params, grad = paca_case(shape)
    heads = shape[4]
    exact = paca_outputs_and_grads(t, params, grad, heads, torch.float64, "reference")
    baseline = paca_outputs_and_grads(t, params, grad, heads, dtype, "reference")
    got = paca_outputs_and_grads(t, params, grad, heads, dtype, "triton")
    assert_agree(got, exact, dtype, baseline=baseline)
    return got, (t, params, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("sm_count", SM_COUNTS)
def test_paca_with_gpu_splits_matches_float64_reference(monkeypatch, sm_count, dtype):
    monkeypatch.setenv("GIFT_SM_COUNT", str(sm_count))
    got, (t, params, grad) = _paca_agrees(RAGGED_SPLIT_SHAPE, dtype)
    if sm_count == 132 and dtype == torch.float32:  # two runs bitwise equal (one case: each run is ~12 s)
        again = paca_outputs_and_grads(t, params, grad, RAGGED_SPLIT_SHAPE[4], dtype, "triton")
        assert all(torch.equal(got[k], again[k]) for k in got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_paca_with_several_cluster_blocks_matches_float64_reference(dtype):
    """M=20 at r=128: the forward's cluster kernel runs 2 programs of 16 clusters per layer (the second ragged)."""
    assert paca_launch(2, 37, 20, 128, 2, device_props(torch.device("cpu"))).block_m_cluster == 16
    _paca_agrees((2, 37, 20, 128, 2), dtype)


def test_paca_at_vit_h_shape_with_132_sms_matches_float64_reference(monkeypatch):
    monkeypatch.setenv("GIFT_SM_COUNT", "132")
    _paca_agrees(VIT_H_SHAPE, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_residual_with_gpu_tiles_matches_float64_reference(monkeypatch, dtype):
    monkeypatch.setenv("GIFT_SM_COUNT", "132")
    case = residual_case((197, 200, 136, 24))                     # 394 rows: every tile edge ragged
    exact = residual_outputs_and_grads(*case, torch.float64, "reference")
    baseline = residual_outputs_and_grads(*case, dtype, "reference")
    got = residual_outputs_and_grads(*case, dtype, "triton")
    assert_agree(got, exact, dtype, baseline=baseline)
    again = residual_outputs_and_grads(*case, dtype, "triton")
    assert all(torch.equal(got[k], again[k]) for k in got)
