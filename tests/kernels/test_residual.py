"""`lowrank_residual_linear` (residual.py, residual_triton.py), each backend against the float64 torch
reference, outputs, every gradient and the low-rank term's own work (output - (x W^T + b), dx - g W), at
the default psi and at GIFT's (~1e-3), on ragged and on even GPU tiles; and a mutated copy of the Triton
kernel's epilogue that the checks must reject. Triton on CPU under TRITON_INTERPRET=1 (set in
tests/conftest.py), bf16 there with the interpreter's bf16 fixed (the ``runnable`` fixture)."""
import pytest
import torch

from gift_kernels import lowrank_residual_linear, lowrank_residual_linear_reference
from gift_kernels.dispatch import TRITON_DTYPES
from gift_kernels.launch import device_props, residual_launch
from gift_kernels.testing import (
    assert_agree,
    available_devices,
    check_residual,
    residual_case,
    residual_outputs_and_grads,
    skip_unless_runnable,
)
from tests.kernels.kernel_mutations import Edit, mutated

BACKENDS = ["torch", "triton"]
DEVICES = available_devices()
DTYPES = list(TRITON_DTYPES)                       # float32, float16, bfloat16


# (rows of x, d_in, d_out, r): ragged everywhere
RESIDUAL_SHAPES = [(1, 8, 8, 8), (7, 24, 40, 5), (100, 64, 24, 24), (197, 40, 64, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", RESIDUAL_SHAPES, ids=lambda s: "rows{}-in{}-out{}-r{}".format(*s))
def test_lowrank_residual_matches_float64_reference(shape, device, backend, dtype, runnable):
    runnable(device, backend, dtype)
    got, _ = check_residual(shape, dtype, backend, bias=shape[0] != 7, device=device)
    assert got["output"].dtype == dtype


GIFT_PSI_SCALE = 1e-3   # trained GIFT psi entries: the low-rank term is then ~1e-3 of x W^T


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", RESIDUAL_SHAPES[1:], ids=lambda s: "rows{}-in{}-out{}-r{}".format(*s))
def test_lowrank_residual_at_gift_magnitudes_matches_float64_reference(shape, device, backend, dtype, runnable):
    runnable(device, backend, dtype)
    check_residual(shape, dtype, backend, device=device, psi_scale=GIFT_PSI_SCALE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_residual_takes_16bit_weights_with_fp32_gift_weights(device, backend, dtype, runnable):
    runnable(device, backend, dtype)
    x, w, b, psi, tokens, grad = residual_case((100, 64, 24, 24))
    exact = residual_outputs_and_grads(x, w, b, psi, tokens, grad, torch.float64, "reference")
    got = residual_outputs_and_grads(x, w, b, psi, tokens, grad, dtype, backend, gift_dtype=torch.float32,
                                     device=device)
    assert got["output"].dtype == dtype and got["dpsi"].dtype == torch.float32 and got["dT"].dtype == torch.float32
    baseline = residual_outputs_and_grads(x, w, b, psi, tokens, grad, dtype, "reference", device=device)
    assert_agree(got, exact, dtype, baseline=baseline)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_residual_is_deterministic(device, backend):
    skip_unless_runnable(device, backend, torch.float32)
    x, w, b, psi, tokens, grad = residual_case((197, 40, 64, 64))
    first = residual_outputs_and_grads(x, w, b, psi, tokens, grad, torch.float32, backend, device=device)
    second = residual_outputs_and_grads(x, w, b, psi, tokens, grad, torch.float32, backend, device=device)
    assert all(torch.equal(first[k], second[k]) for k in first)


EVEN_SHAPE = (128, 64, 128, 16)  # x holds 256 rows: every forward tile of a 132-SM GPU full (BLOCK_M 128)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_residual_with_even_gpu_tiles_matches_float64_reference(monkeypatch, device, dtype, runnable):
    """The kernel's unmasked loads and stores (EVEN_M, EVEN_N, EVEN_K), which the ragged shapes never reach."""
    runnable(device, "triton", dtype)
    monkeypatch.setenv("GIFT_SM_COUNT", "132")
    rows, d_in, d_out, r = EVEN_SHAPE
    cfg = residual_launch(2 * rows, d_out, d_in, r, dtype, device_props(torch.device(device)))
    assert (2 * rows) % cfg.block_m == 0 and d_out % cfg.block_n == 0 and d_in % cfg.block_k == 0
    check_residual(EVEN_SHAPE, dtype, "triton", device=device, psi_scale=GIFT_PSI_SCALE)


# the epilogue's low-rank product, per operand dtype; the mutations scale it
EPILOGUE_DOT = {torch.float32: "acc += tl.dot(p.to(tl.float32), q.to(tl.float32), input_precision=F32_DOT)",
                torch.float16: "acc += tl.dot(p.to(A.dtype.element_ty), q.to(A.dtype.element_ty))"}


@pytest.mark.parametrize("dtype,psi_scale,factor", [(torch.float32, GIFT_PSI_SCALE, 0.9), (torch.float16, 0.1, 0.9),
                                                    (torch.float16, GIFT_PSI_SCALE, 0.0)], ids=str)
def test_lowrank_residual_kernel_mutation_fails_the_check(dtype, psi_scale, factor):
    """A kernel that gets the low-rank term 10% wrong, or (in fp16 at GIFT's psi, where 10% of the term is below the
    fp16 output's rounding) drops it, fails the check through its own-work keys, forward and, through dx, backward."""
    skip_unless_runnable("cpu", "triton", dtype)
    residual_triton = pytest.importorskip("gift_kernels.residual_triton")
    dot = EPILOGUE_DOT[dtype]
    wrong = Edit("_matmul_lowrank_epilogue", dot, dot.replace("+= tl.dot(", f"+= {factor} * tl.dot(", 1))
    with mutated(residual_triton, [wrong]):
        for shape in RESIDUAL_SHAPES:
            with pytest.raises(AssertionError, match=r"output_minus_xw: .*\n  dx_minus_gw: "):
                check_residual(shape, dtype, "triton", psi_scale=psi_scale)


# ---------------------------------------------------------------- the op's autograd and its refusals (torch path)
@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_residual_gradcheck(bias):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, dtype=torch.float64) if bias else None
    psi = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, p, t: lowrank_residual_linear(x, w, b, p, t), (x, psi, tokens))


def test_lowrank_residual_matches_dense_reference_and_its_autograd():
    torch.manual_seed(0)
    x = torch.randn(4, 9, 13, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(11, 13, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    psi = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    got, want = lowrank_residual_linear(x, w, b, psi, tokens), lowrank_residual_linear_reference(x, w, b, psi, tokens)
    g = torch.randn_like(got)
    grads_got = torch.autograd.grad(got, (x, psi, tokens), g)
    grads_want = torch.autograd.grad(want, (x, psi, tokens), g)
    assert_agree({"y": got, "dx": grads_got[0], "dpsi": grads_got[1], "dT": grads_got[2]},
                 {"y": want, "dx": grads_want[0], "dpsi": grads_want[1], "dT": grads_want[2]}, torch.float64)


def test_lowrank_residual_refuses_trainable_weight_and_mixed_dtypes():
    x, psi, t = torch.randn(2, 4), torch.randn(4, 2), torch.randn(3, 2)
    with pytest.raises(ValueError, match="treats W and b as frozen"):
        lowrank_residual_linear(x, torch.randn(3, 4, requires_grad=True), None, psi, t)
    with pytest.raises(TypeError, match="needs one dtype"):
        lowrank_residual_linear(x, torch.randn(3, 4, dtype=torch.float64), None, psi, t)


# x and W stored column by column: the kernel keeps a column-major x (its loads then step through A by stride_ak, which
# is 1 for a row-major x) and takes W^T as any strided view
LAYOUTS = {"x-column-major": (True, False), "weight-column-major": (False, True), "both-column-major": (True, True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("shape", RESIDUAL_SHAPES, ids=lambda s: "rows{}-in{}-out{}-r{}".format(*s))
def test_lowrank_residual_with_column_major_operands_matches_float64_reference(shape, layout, dtype):
    skip_unless_runnable("cpu", "triton", dtype)
    check_residual(shape, dtype, "triton", bias=shape[0] != 7, column_major_x=LAYOUTS[layout][0],
                   column_major_weight=LAYOUTS[layout][1])


# A advanced by BLOCK_K elements, not BLOCK_K rows of its K stride: right for a row-major x only (stride_ak == 1)
WRONG_K_STRIDE = Edit("_matmul_lowrank_epilogue", "a_ptrs += BLOCK_K * stride_ak", "a_ptrs += BLOCK_K")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_lowrank_residual_wrong_k_stride_fails_the_column_major_check(dtype):
    """The mutation passes every row-major case (it is the same kernel there) and fails the column-major one wherever
    d_in spans more than one K tile."""
    skip_unless_runnable("cpu", "triton", dtype)
    residual_triton = pytest.importorskip("gift_kernels.residual_triton")
    shapes = [s for s in RESIDUAL_SHAPES
              if s[1] > residual_launch(s[0], s[2], s[1], s[3], dtype, device_props(torch.device("cpu"))).block_k]
    assert shapes, "no case spans two K tiles"
    with mutated(residual_triton, [WRONG_K_STRIDE]):
        for shape in shapes:
            check_residual(shape, dtype, "triton")                             # row-major: the same kernel
            with pytest.raises(AssertionError, match=r"\n  output: "):           # x feeds only the forward
                check_residual(shape, dtype, "triton", column_major_x=True)
