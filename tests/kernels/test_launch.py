"""The launch configurations a GPU would use, run on CPU: ``GIFT_SM_COUNT`` under TRITON_INTERPRET=1 gives the
launchers exactly the CUDA tiles and split arithmetic (see gift_kernels/launch.py).

Shapes here are chosen so that the splits of the three reductions over N (the pooling of the cluster forward,
the attention backward, the cluster backward) do not divide the number of N-blocks (the case that read and
wrote one block past N before the fix). The ViT-H shape L=32, N=1280, r=64, M=64 runs once (fp32, 114 SMs);
the smaller shape L=9, N=449, M=16, r=16, heads=4 has the same property for 80, 108 and 132 SMs and runs in
fp32, fp16 and bf16 (the PaCa dots take fp32 operands, so the interpreter runs bf16 faithfully).
"""
import functools
import itertools

import pytest
import torch

import gift_kernels
from gift_kernels import PacaParams, dispatch, lowrank_residual_linear, paca, paca_attention, residual
from gift_kernels.dispatch import TRITON_DTYPES
from gift_kernels.launch import (
    ARCH_PROPS,
    INDEX_LIMIT,
    INTERPRETER_PROPS,
    DeviceProps,
    Split,
    best_split,
    cdiv,
    device_props,
    emulate_device,
    paca_launch,
    paca_shared_bytes,
    paca_triton_index_unsupported,
    paca_triton_unsupported,
    residual_launch,
    residual_triton_unsupported,
)
from gift_kernels.testing import available_devices, check_paca, check_residual, paca_case, skip_unless_runnable

SM_COUNTS = [80, 108, 132]
DTYPES = list(TRITON_DTYPES)                       # float32, float16, bfloat16
RAGGED_SPLIT_SHAPE = (9, 449, 16, 16, 4)            # (L, N, M, r, heads): the last N-block holds one row
VIT_H_SHAPE = (32, 1280, 64, 64, 1)                 # on 114 SMs (H100 PCIe): 7 splits of 12 blocks for 80, 6 for 40
# CPU under the interpreter; CUDA too where present (bench/gpu_check.sh): there with bf16, GIFT_SM_COUNT on the GPU
DEVICES = available_devices()


def _splits(shape, sm_count, dtype):
    L, N, M, r, h = shape
    return paca_launch(L, N, M, r, h, dtype, DeviceProps(sm_count, 227 * 1024, (9, 0))).splits()


def _uneven(split: Split) -> bool:
    return split.splits > 1 and split.splits * split.blocks_per_split != split.n_blocks


@pytest.mark.parametrize("sm_count", SM_COUNTS)
def test_sm_count_override_gives_the_cuda_configuration_under_the_interpreter(monkeypatch, sm_count):
    monkeypatch.setenv("GIFT_SM_COUNT", str(sm_count))
    props = device_props(torch.device("cpu"))
    assert props == DeviceProps(sm_count, ARCH_PROPS["sm_90"].shared_bytes, (9, 0))
    assert not props.interpreter
    cfg = paca_launch(*RAGGED_SPLIT_SHAPE, torch.float32, props)
    assert (cfg.block_n, cfg.block_n_pool, cfg.block_n_cluster, cfg.block_m, cfg.block_r) == (16, 32, 16, 16, 16)
    assert cfg.block_r_bwd == 32 and cfg.kernels["_paca_attn_bwd"].num_warps == 8
    assert residual_launch(394, 136, 200, 24, torch.float32, props).block_m == 128
    monkeypatch.setenv("GIFT_SM_COUNT", "many")
    with pytest.raises(ValueError, match="GIFT_SM_COUNT='many' is not a positive integer"):
        device_props(torch.device("cpu"))


def test_test_shapes_have_splits_that_do_not_divide_the_blocks():
    for sm, dtype in itertools.product(SM_COUNTS, DTYPES):
        splits = _splits(RAGGED_SPLIT_SHAPE, sm, dtype)
        assert all(_uneven(splits[k]) for k in splits), (sm, dtype, splits)
    assert all(_uneven(s) for s in _splits(VIT_H_SHAPE, 114, torch.float32).values())


@pytest.mark.parametrize("sm_count", [1, 2, 7, 80, 108, 132, 142, 1000])
def test_splits_visit_every_block_once_and_never_one_past_n(sm_count):
    props = DeviceProps(sm_count, 227 * 1024, (9, 0))
    for L in (1, 3, 12, 24, 32, 40, 48):
        for N in (1, 63, 64, 65, 192, 197, 384, 577, 768, 1024, 1280, 1408, 1664, 4097):
            for M, r in ((16, 16), (64, 64), (64, 16), (5, 24)):
                for heads, dtype in itertools.product((1, 2, 4), (torch.float32, torch.bfloat16)):
                    cfg = paca_launch(L, N, M, r, heads, dtype, props)
                    assert cfg.n_blocks == cdiv(N, cfg.block_n)
                    for kernel, split in cfg.splits().items():
                        ranges = split.ranges()
                        assert [b for rg in ranges for b in rg] == list(range(split.n_blocks)), (kernel, L, N, M, r)
                        assert all(len(rg) > 0 for rg in ranges), "a split without a block"


def _block_steps(split, programs_per_split, wave):
    return cdiv(programs_per_split * split.splits, wave) * (split.blocks_per_split + 1)


@pytest.mark.parametrize("n_blocks, per_split, resident, sm_count, expected", [
    (40, 32, 1, 132, (4, 10)),       # ViT-H fp32 backward: 128 programs in one wave, not 256 in two
    (40, 32, 2, 132, (8, 5)),        # two programs an SM: 256 programs, still one wave
    (24, 12, 1, 132, (8, 3)),        # one wave of 3 blocks each: 8 splits as good as 11, fewer partial sums
    (100, 2, 1, 10, (5, 20)),        # programs beyond one wave cost more than the blocks they save
    (1, 48, 1, 132, (1, 1)),
])
def test_best_split_fills_whole_waves(n_blocks, per_split, resident, sm_count, expected):
    props = DeviceProps(sm_count, 227 * 1024, (9, 0))
    split = best_split(n_blocks, per_split, resident, props)
    assert (split.splits, split.blocks_per_split) == expected
    wave = resident * sm_count
    for splits in range(1, n_blocks + 1):      # no other split takes fewer block-steps
        other = Split(n_blocks, cdiv(n_blocks, cdiv(n_blocks, splits)), cdiv(n_blocks, splits))
        assert _block_steps(split, per_split, wave) <= _block_steps(other, per_split, wave)


def _paca_agrees(shape, dtype, device="cpu", activation="sigmoid"):
    """`check_paca` on Triton; bf16 too under the interpreter: the PaCa dots take fp32 operands (the interpreter's
    bf16 tl.dot is what returns garbage)."""
    if not gift_kernels.triton_available(device):
        pytest.skip(f"Triton cannot run on {device} here (CPU needs TRITON_INTERPRET=1)")
    return check_paca(shape, dtype, "triton", activation, device=device)


@pytest.mark.parametrize("sm_count, dtype", [(80, torch.float32), (108, torch.float32), (132, torch.float32),
                                             (108, torch.float16), (132, torch.bfloat16)], ids=str)
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
    """Both assignments with 2 heads and ragged M, r, N (r <= 32: an r masked at 64 takes torch on GPUs); with 108
    SMs the backward splits N (last block ragged)."""
    monkeypatch.setenv("GIFT_SM_COUNT", "108")
    cfg = paca_launch(2, 137, 20, 24, 2, dtype, device_props(torch.device("cpu")))
    assert all(s.splits >= 2 for s in cfg.splits().values()) and cfg.n_blocks * cfg.block_n > 137
    _paca_agrees((2, 137, 20, 24, 2), dtype, device, activation)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_paca_with_ragged_n_and_uneven_splits_matches_float64_reference_and_is_deterministic(monkeypatch, activation):
    """2 SMs, 3 heads, N = 129 in blocks whose last one is ragged, every reduction over N split unevenly."""
    monkeypatch.setenv("GIFT_SM_COUNT", "2")
    cfg = paca_launch(1, 129, 5, 24, 3, torch.float32, device_props(torch.device("cpu")))
    assert all(_uneven(s) for s in cfg.splits().values()) and 129 % cfg.block_n != 0, cfg.splits()
    got, rerun = _paca_agrees((1, 129, 5, 24, 3), torch.float32, activation=activation)
    assert all(torch.equal(got[k], v) for k, v in rerun().items())


@pytest.mark.parametrize("device", DEVICES)
def test_paca_at_vit_h_shape_with_114_sms_matches_float64_reference(monkeypatch, device):
    """fp32 at M = r = 64 on 114 SMs: 80 blocks of 16 rows (40 of 32 in the pooling), every split uneven."""
    monkeypatch.setenv("GIFT_SM_COUNT", "114")
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
    with pytest.raises(RuntimeError, match=r"take M <= 64 clusters and r <= 64 \(padded to powers of two\), and "
                                           r"M=100, r=64 pads to 128 x 64"):
        paca_attention(t.float(), p, 1, backend="triton")
    reason = paca_triton_unsupported(100, 64)
    assert gift_kernels.resolve_backend(torch.device("cuda"), torch.float32, "auto", unsupported=reason) == "torch"
    assert paca_triton_unsupported(64, 64) is None and paca_triton_unsupported(48, 24) is None
    assert paca_triton_unsupported(256, 16) is not None and paca_triton_unsupported(16, 128) is not None


# shared bytes per block measured by `python -m gift_kernels.dev.compile_check` (sm_80, fp32 at M = r = 64; the
# same kernels for 16-bit inputs): the estimate is above them
MEASURED_SHARED_64x64 = {"_paca_attn_bwd": 114688, "_paca_cluster_bwd": 147456}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paca_over_the_shared_memory_of_a_99_kib_gpu_takes_torch_under_auto_and_is_refused_by_triton(dtype):
    """sm_86/sm_89 (RTX 30xx/40xx, A10, L4) allow 99 KiB per block; M = r = 64 needs more (every dtype: the dots
    take fp32 operands)."""
    sm86, cuda = ARCH_PROPS["sm_86"], torch.device("cuda")
    assert (sm86.shared_bytes, sm86.capability) == (101376, (8, 6))
    need = paca_shared_bytes(paca_launch(1, 1, 64, 64, 1, dtype, sm86), sm86.capability)
    assert all(need[k] >= v for k, v in MEASURED_SHARED_64x64.items()), need
    for arch in ("sm_86", "sm_89"):
        reason = paca_triton_unsupported(64, 64, dtype, ARCH_PROPS[arch])
        assert reason is not None and "B of shared memory per block" in reason and "allows 101376 B" in reason
        assert gift_kernels.resolve_backend(cuda, dtype, "auto", unsupported=reason) == "torch"
    t, params, _ = paca_case((1, 7, 64, 64, 1))
    with emulate_device(sm86), pytest.raises(RuntimeError, match="triton was asked for, but the Triton PaCa kernels "
                                                                  "need about .* B of shared memory per block"):
        paca_attention(t.to(dtype), PacaParams(*(x.to(dtype) for x in params)), 1, backend="triton")
    for arch in ("sm_80", "sm_90", "sm_100"):                                          # 163 / 227 KiB: fits
        assert paca_triton_unsupported(64, 64, dtype, ARCH_PROPS[arch]) is None, arch
    assert paca_triton_unsupported(64, 64, dtype) is None                             # no device: tile limits only


def test_paca_default_shape_fits_every_compile_checked_gpu_in_every_dtype_and_sm120_takes_torch():
    for arch, dtype in itertools.product(ARCH_PROPS, DTYPES):
        reason = paca_triton_unsupported(64, 16, dtype, ARCH_PROPS[arch])
        if arch == "sm_120":      # its compile check still finds spills: the torch path, with the reason
            assert "do not yet compile without spills for compute capability 12.x" in reason, reason
            assert gift_kernels.resolve_backend(torch.device("cuda"), dtype, "auto", unsupported=reason) == "torch"
        else:
            assert reason is None, (arch, dtype, reason)


# ---------------------------------------------------------------- tensors past 2^31 elements: torch, not Triton


def _meta_as_cuda(monkeypatch, op_module) -> list:
    """Makes ``auto`` treat meta tensors as CUDA ones where Triton may run, with ``op_module._verified_backend``
    answering "triton" (and recording that it was asked): only an op's own guard can then send a call to torch.
    Proves itself: an unguarded call reaches that answer."""
    monkeypatch.setattr(dispatch, "auto_runs_triton_on", lambda device: True)
    monkeypatch.setattr(dispatch, "_why_not_triton", lambda device, dtype: None)
    asked = []
    monkeypatch.setattr(op_module, "_verified_backend", lambda *args: asked.append(args) or "triton")
    meta = torch.device("meta")
    auto = functools.partial(op_module._verified_backend, "probe")
    assert dispatch.resolve_backend(meta, torch.bfloat16, "auto", unsupported=None, auto=auto) == "triton"
    assert asked == [("probe",)]
    asked.clear()
    return asked


def test_residual_guard_refuses_tensors_of_2_31_elements_and_auto_takes_torch(monkeypatch):
    """No allocation: the sizes alone (and meta tensors, which hold no memory)."""
    assert residual_triton_unsupported(87_680, 1408, 6144, 64) is None            # ViT-g/14, 518 px, batch 64, fc1
    reason = residual_triton_unsupported(4 * 87_680, 1408, 6144, 64)              # batch 256: the output passes 2^31
    assert reason is not None and "fewer than 2^31 elements, and the output has 2154823680" in reason
    assert residual_triton_unsupported(INDEX_LIMIT // 1280 + 1, 1280, 16, 8) is not None     # x itself
    assert residual_triton_unsupported(INDEX_LIMIT // 1280 - 1, 1280, 16, 8) is None
    meta = dict(device="meta", dtype=torch.bfloat16)
    x = torch.empty(2 * 175_360, 1408, **meta)                                        # 2^31 < 350,720 x 6144 outputs
    w, b = torch.empty(6144, 1408, **meta), torch.empty(6144, **meta)
    psi, tokens = torch.empty(1408, 64, **meta), torch.empty(6144, 64, **meta)
    with pytest.raises(RuntimeError, match="triton was asked for, but the Triton residual GEMM takes tensors of fewer "
                                           "than 2\\^31 elements, and the output has 2154823680"):
        lowrank_residual_linear(x, w, b, psi, tokens, backend="triton")
    asked = _meta_as_cuda(monkeypatch, residual)
    assert lowrank_residual_linear(x, w, b, psi, tokens, backend="auto").shape == (350_720, 6144)   # torch on meta
    assert asked == []                                      # the guard answered: auto's choice was never asked for
    if gift_kernels.triton_available("cpu"):
        from gift_kernels.residual_triton import matmul_lowrank_epilogue

        with pytest.raises(ValueError, match="matmul_lowrank_epilogue: the Triton residual GEMM takes tensors"):
            matmul_lowrank_epilogue(x, w.t(), torch.empty(350_720, 64, **meta), tokens, b)


def test_paca_guard_refuses_tensors_of_2_31_elements_and_auto_takes_torch(monkeypatch):
    """No allocation: the sizes alone, and meta tensors (which hold no memory) through `paca_attention`."""
    assert paca_triton_index_unsupported(12, 1025, 64, 1) is None                  # ViT-H/14-sized: far below
    reason = paca_triton_index_unsupported(1, INDEX_LIMIT // 64, 64, 1)              # one layer's N x r = 2^31
    assert reason is not None and "one layer's tokens (N x r) has 2147483648" in reason
    assert paca_triton_index_unsupported(1, INDEX_LIMIT // 64 - 1, 64, 1) is None
    reason = paca_triton_index_unsupported(32, INDEX_LIMIT // (32 * 64), 64, 1)      # all L layers together
    assert reason is not None and "the tokens (L x N x r) has 2147483648" in reason
    reason = paca_triton_index_unsupported(8, INDEX_LIMIT // (8 * 4 * 64), 64, 4)    # the per-head buffer alone
    assert reason is not None and "per-head buffer (L x heads x N x r) has 2147483648" in reason
    meta = dict(device="meta", dtype=torch.float16)
    L, N, M, r, heads = 16, INDEX_LIMIT // (16 * 64), 8, 64, 1
    t = torch.empty(L, N, r, **meta)
    params = PacaParams(torch.empty(M, r, **meta), torch.empty(M, **meta),
                        *(x for _ in range(4) for x in (torch.empty(r, r, **meta), torch.empty(r, **meta))))
    with pytest.raises(RuntimeError, match="triton was asked for, but the Triton PaCa kernels take tensors of fewer "
                                           "than 2\\^31 elements, and the tokens"):
        paca_attention(t, params, heads, backend="triton")
    asked = _meta_as_cuda(monkeypatch, paca)
    assert paca_attention(t, params, heads, backend="auto").shape == (L, N, r)      # the torch path, on meta
    assert asked == []


def test_paca_with_r_masked_at_64_takes_torch_on_a_gpu():
    """With r masked at 64 (33..63), `_paca_attn_bwd` (sm_80 fp32 M=50, r=40: 192 B of spill stores; M=64, r=40:
    60 B) and `_paca_cluster_side_bwd` (264 B) spill (compile_check); r=64 or r <= 32 compile clean."""
    for arch in ("sm_80", "sm_90"):
        props = ARCH_PROPS[arch]
        for M, r in ((50, 40), (33, 63), (63, 33), (48, 40), (24, 40), (7, 60), (64, 40), (32, 40), (16, 60)):
            reason = paca_triton_unsupported(M, r, torch.float32, props)
            assert reason is not None and "spill registers when r is masked at their largest tiles" in reason
            assert f"M={M}, r={r}" in reason
        for M, r in ((50, 64), (50, 16), (50, 32), (24, 64), (48, 24), (64, 64), (64, 16)):
            assert paca_triton_unsupported(M, r, torch.float32, props) is None, (arch, M, r)
    assert paca_triton_unsupported(50, 40) is None                   # no device, or the interpreter: no ptxas
    assert paca_triton_unsupported(50, 40, torch.float32, INTERPRETER_PROPS) is None
