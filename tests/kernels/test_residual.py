"""`lowrank_residual_linear` (residual.py, residual_triton.py), each backend against the float64 torch
reference, outputs and every gradient (Triton on CPU under TRITON_INTERPRET=1, set in tests/conftest.py;
bf16 on CUDA only)."""
import pytest
import torch

from gift_kernels.dispatch import TRITON_DTYPES
from gift_kernels.testing import (
    assert_agree,
    available_devices,
    check_residual,
    residual_case,
    residual_outputs_and_grads,
    skip_unless_runnable,
)

BACKENDS = ["torch", "triton"]
DEVICES = available_devices()
DTYPES = list(TRITON_DTYPES)                       # float32, float16, bfloat16


# (rows of x, d_in, d_out, r): ragged everywhere
RESIDUAL_SHAPES = [(1, 8, 8, 8), (7, 24, 40, 5), (100, 64, 24, 24), (197, 40, 64, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", RESIDUAL_SHAPES, ids=lambda s: "rows{}-in{}-out{}-r{}".format(*s))
def test_lowrank_residual_matches_float64_reference(shape, device, backend, dtype):
    skip_unless_runnable(device, backend, dtype)
    got, _ = check_residual(shape, dtype, backend, bias=shape[0] != 7, device=device)
    assert got["output"].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_residual_takes_16bit_weights_with_fp32_gift_weights(device, backend, dtype):
    skip_unless_runnable(device, backend, dtype)
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
