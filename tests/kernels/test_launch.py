"""The launch configurations a GPU would use, run on CPU: ``GIFT_SM_COUNT`` under TRITON_INTERPRET=1 gives the
launchers exactly the CUDA tiles and split arithmetic (see gift_kernels/launch.py).

Shapes here are chosen so that the split count does not divide the number of N-blocks (the case that read
and wrote one block past N before the fix). The ViT-H shape L=32, N=1280, r=64, M=64 runs once (fp32, 108
SMs, ~30-60 s on the interpreter); the smaller shape L=12, N=448, M=16, r=16, heads=4 has the same property
for 80, 108 and 132 SMs and runs in fp32 and fp16.
"""
import itertools

import pytest
import torch

import gift_kernels
from gift_kernels import PacaParams, paca_attention
from gift_kernels.dispatch import TRITON_DTYPES
from gift_kernels.launch import (
    ARCH_PROPS,
    DeviceProps,
    cdiv,
    device_props,
    emulate_device,
    paca_launch,
    paca_shared_bytes,
    paca_triton_unsupported,
    residual_launch,
)
from gift_kernels.testing import available_devices, check_paca, check_residual, paca_case, skip_unless_runnable

SM_COUNTS = [80, 108, 132]
DTYPES = list(TRITON_DTYPES)                       # float32, float16, bfloat16
RAGGED_SPLIT_SHAPE = (12, 448, 16, 16, 4)           # (L, N, M, r, heads): N a multiple of BLOCK_N = 64
VIT_H_SHAPE = (32, 1280, 64, 64, 1)                 # the shape (there: 7 splits x 3 blocks for 20 blocks)
# CPU under the interpreter; CUDA too where present (bench/gpu_check.sh): there with bf16, GIFT_SM_COUNT on the GPU
DEVICES = available_devices()


def _uneven(shape, sm_count, dtype):
    L, N, M, r, h = shape
    cfg = paca_launch(L, N, M, r, h, dtype, DeviceProps(sm_count, 227 * 1024, (9, 0)))
    return cfg.splits * cfg.blocks_per_split != cfg.n_blocks


@pytest.mark.parametrize("sm_count", SM_COUNTS)
def test_sm_count_override_gives_the_cuda_configuration_under_the_interpreter(monkeypatch, sm_count):
    monkeypatch.setenv("GIFT_SM_COUNT", str(sm_count))
    props = device_props(torch.device("cpu"))
    assert props == DeviceProps(sm_count, ARCH_PROPS["sm_90"].shared_bytes, (9, 0))
    assert not props.interpreter
    cfg = paca_launch(*RAGGED_SPLIT_SHAPE, torch.float32, props)
    assert (cfg.block_n, cfg.block_m, cfg.block_r) == (64, 16, 16)
    assert residual_launch(394, 136, 200, 24, torch.float32, props).block_m == 128
    monkeypatch.setenv("GIFT_SM_COUNT", "many")
    with pytest.raises(ValueError, match="GIFT_SM_COUNT='many' is not a positive integer"):
        device_props(torch.device("cpu"))


def test_test_shapes_have_splits_that_do_not_divide_the_blocks():
    assert all(_uneven(RAGGED_SPLIT_SHAPE, sm, dtype) for sm in SM_COUNTS for dtype in (torch.float32, torch.float16))
    assert _uneven(VIT_H_SHAPE, 108, torch.float32) and _uneven(VIT_H_SHAPE, 132, torch.float16)


@pytest.mark.parametrize("sm_count", [1, 2, 7, 80, 108, 132, 142, 1000])
def test_splits_visit_every_block_once_and_never_one_past_n(sm_count):
    props = DeviceProps(sm_count, 227 * 1024, (9, 0))
    for L in (1, 3, 12, 24, 32, 40, 48):
        for N in (1, 63, 64, 65, 192, 197, 384, 577, 768, 1024, 1280, 1408, 1664, 4097):
            for M, r in ((16, 16), (64, 64), (256, 128), (5, 24)):
                for heads, dtype in itertools.product((1, 2, 4), (torch.float32, torch.bfloat16)):
                    cfg = paca_launch(L, N, M, r, heads, dtype, props)
                    ranges = cfg.split_ranges()
                    assert cfg.n_blocks == cdiv(N, cfg.block_n)
                    assert [b for rg in ranges for b in rg] == list(range(cfg.n_blocks)), (L, N, M, r, heads)
                    assert all(len(rg) > 0 for rg in ranges), "a split without a block"
                    assert cfg.splits <= max(1, cdiv(2 * sm_count, L * heads))


def _paca_agrees(shape, dtype, device="cpu", activation="sigmoid"):
    skip_unless_runnable(device, "triton", dtype)
    return check_paca(shape, dtype, "triton", activation, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sm_count", SM_COUNTS)
@pytest.mark.parametrize("device", DEVICES)
def test_paca_with_gpu_splits_matches_float64_reference(monkeypatch, device, sm_count, dtype):
    monkeypatch.setenv("GIFT_SM_COUNT", str(sm_count))
    got, rerun = _paca_agrees(RAGGED_SPLIT_SHAPE, dtype, device)
    if sm_count == 132 and dtype == torch.float32:  # two runs bitwise equal (one case: each run is ~12 s)
        assert all(torch.equal(got[k], v) for k, v in rerun().items())


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_paca_with_gpu_splits_and_heads_matches_float64_reference(monkeypatch, device, dtype, activation):
    """Both assignments with 2 heads and ragged M, r, N; with 108 SMs the backward splits N (last block ragged)."""
    monkeypatch.setenv("GIFT_SM_COUNT", "108")
    cfg = paca_launch(2, 137, 20, 48, 2, dtype, device_props(torch.device("cpu")))
    assert cfg.splits >= 2 and cfg.n_blocks * cfg.block_n > 137
    _paca_agrees((2, 137, 20, 48, 2), dtype, device, activation)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_paca_with_ragged_n_and_uneven_splits_matches_float64_reference_and_is_deterministic(monkeypatch, activation):
    """2 SMs, 3 heads: 5 blocks of 64 rows (the last one 44 rows) in 2 splits of 3 and 2 blocks."""
    monkeypatch.setenv("GIFT_SM_COUNT", "2")
    cfg = paca_launch(1, 300, 5, 24, 3, torch.float32, device_props(torch.device("cpu")))
    assert [len(rg) for rg in cfg.split_ranges()] == [3, 2] and 300 % cfg.block_n != 0
    got, rerun = _paca_agrees((1, 300, 5, 24, 3), torch.float32, activation=activation)
    assert all(torch.equal(got[k], v) for k, v in rerun().items())


@pytest.mark.parametrize("device", DEVICES)
def test_paca_at_vit_h_shape_with_108_sms_matches_float64_reference(monkeypatch, device):
    """fp32 takes 32-row blocks at M = r = 64: 7 splits x 6 blocks for 40 blocks on 108 SMs."""
    monkeypatch.setenv("GIFT_SM_COUNT", "108")
    _paca_agrees(VIT_H_SHAPE, torch.float32, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-bit at the ViT-H shape on CUDA only (interpreter time)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_paca_at_vit_h_shape_with_132_sms_in_16_bit_on_cuda(monkeypatch, dtype):
    monkeypatch.setenv("GIFT_SM_COUNT", "132")
    _paca_agrees(VIT_H_SHAPE, dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_residual_with_gpu_tiles_matches_float64_reference(monkeypatch, device, dtype):
    skip_unless_runnable(device, "triton", dtype)
    monkeypatch.setenv("GIFT_SM_COUNT", "132")
    got, rerun = check_residual((197, 200, 136, 24), dtype, "triton", device=device)  # 394 rows: every tile edge ragged
    assert all(torch.equal(got[k], v) for k, v in rerun().items())


# ---------------------------------------------------------------- which PaCa shapes the Triton kernels take


def test_paca_attention_too_large_for_triton_falls_back_under_auto_and_is_refused_by_triton():
    t, params, _ = paca_case((1, 7, 100, 64, 1))
    p = PacaParams(*(x.float() for x in params))
    with pytest.raises(RuntimeError, match=r"tiles of at most 4096 elements with r <= 64, and M=100, r=64 pads to"):
        paca_attention(t.float(), p, 1, backend="triton")
    reason = paca_triton_unsupported(100, 64)
    assert gift_kernels.resolve_backend(torch.device("cuda"), torch.float32, "auto", unsupported=reason) == "torch"
    assert paca_triton_unsupported(64, 64) is None and paca_triton_unsupported(256, 16) is None
    assert paca_triton_unsupported(16, 128) is not None


# shared bytes per block measured by `python -m gift_kernels.dev.compile_check` (sm_80, fp32): the estimate is above
MEASURED_FP32_SHARED = {(64, 64): {"_paca_attn_bwd": 131072, "_paca_cluster_bwd": 163840},
                        (256, 16): {"_paca_attn_bwd": 133120, "_paca_cluster_bwd": 165888}}


@pytest.mark.parametrize("M, r", sorted(MEASURED_FP32_SHARED))
def test_paca_over_the_shared_memory_of_a_99_kib_gpu_takes_torch_under_auto_and_is_refused_by_triton(M, r):
    """sm_86/sm_89 (RTX 3090/4090, A10, L4) allow 99 KiB per block; fp32 M = r = 64 and M = 256, r = 16 need more."""
    sm86, cuda = ARCH_PROPS["sm_86"], torch.device("cuda")
    assert (sm86.shared_bytes, sm86.capability) == (101376, (8, 6))
    need = paca_shared_bytes(paca_launch(1, 1, M, r, 1, torch.float32, sm86), torch.float32, sm86.capability)
    assert all(need[k] >= v for k, v in MEASURED_FP32_SHARED[(M, r)].items()), need
    reason = paca_triton_unsupported(M, r, torch.float32, sm86)
    assert reason is not None and "B of shared memory per block" in reason and "allows 101376 B" in reason
    assert gift_kernels.resolve_backend(cuda, torch.float32, "auto", unsupported=reason) == "torch"
    t, params, _ = paca_case((1, 7, M, r, 1))
    with emulate_device(sm86), pytest.raises(RuntimeError, match="triton was asked for, but the Triton PaCa kernels "
                                                                  "need about .* B of shared memory per block"):
        paca_attention(t.float(), PacaParams(*(x.float() for x in params)), 1, backend="triton")
    assert paca_triton_unsupported(M, r, torch.float32, ARCH_PROPS["sm_80"]) is None   # 163 KiB: fits
    assert paca_triton_unsupported(M, r, torch.float32, ARCH_PROPS["sm_90"]) is None
    assert paca_triton_unsupported(M, r, torch.float32) is None                        # no device: tile limits only


def test_paca_default_shape_fits_a_99_kib_gpu_in_every_dtype():
    for dtype in DTYPES:
        assert paca_triton_unsupported(64, 16, dtype, ARCH_PROPS["sm_86"]) is None, dtype
