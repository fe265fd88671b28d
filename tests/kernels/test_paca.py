"""`paca_attention` (paca.py, paca_math.py, paca_triton.py), each backend against the float64 torch
reference, outputs and every gradient.

Triton runs on CPU tensors under TRITON_INTERPRET=1 (set in tests/conftest.py). bf16 is not tested on CPU:
the interpreter's bf16 tl.dot returns garbage without an error; bench/gpu_check.sh tests it on a GPU.
"""
import pytest
import torch

from gift_kernels import PacaParams, paca_attention
from gift_kernels.dispatch import TRITON_DTYPES
from gift_kernels.testing import (
    assert_agree,
    available_devices,
    check_paca,
    exact_and_baseline,
    paca_case,
    paca_outputs_and_grads,
    paca_zero_gradients,
    skip_unless_runnable,
)

BACKENDS = ["torch", "triton"]
# CPU always (Triton there under the interpreter); CUDA when present (bench/gpu_check.sh), with bf16
DEVICES = available_devices()
DTYPES = list(TRITON_DTYPES)                       # float32, float16, bfloat16


# (L, N, M, r, heads): every N in {1, 7, 100, 197}, M in {1, 5, 64}, r in {8, 24, 64}, heads in {1, 3}, L in {1, 3}
PACA_SHAPES = [
    (1, 1, 1, 8, 1),
    (3, 7, 5, 8, 1),
    (1, 7, 64, 24, 3),
    (3, 100, 5, 24, 3),
    (1, 100, 64, 64, 1),
    (3, 197, 5, 64, 1),
    (1, 197, 1, 24, 1),
    (3, 1, 64, 24, 3),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", PACA_SHAPES, ids=lambda s: "L{}-N{}-M{}-r{}-h{}".format(*s))
def test_paca_attention_matches_float64_reference(shape, device, backend, dtype):
    skip_unless_runnable(device, backend, dtype)
    got, _ = check_paca(shape, dtype, backend, device=device)
    assert got["output"].dtype == dtype and got["d_cluster_w"].dtype == dtype


def test_paca_attention_fp16_triton_at_ragged_two_head_shape_seed_0_matches_float64_reference():
    skip_unless_runnable("cpu", "triton", torch.float16)
    check_paca((2, 10, 17, 40, 2), torch.float16, "triton", "sigmoid", seed=0)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_paca_attention_torch_path_gradcheck(activation):
    t, params, _ = paca_case((2, 7, 5, 6, 3), seed=3)
    leaves = [x.requires_grad_(True) for x in [t, *params]]
    assert torch.autograd.gradcheck(
        lambda t, *p: paca_attention(t, PacaParams(*p), 3, activation, backend="torch"), tuple(leaves))


def test_paca_attention_float64_is_exact_on_the_torch_path():
    t, params, grad = paca_case((3, 100, 5, 24, 3))
    exact = paca_outputs_and_grads(t, params, grad, 3, torch.float64, "reference")
    assert_agree(paca_outputs_and_grads(t, params, grad, 3, torch.float64, "torch"), exact, torch.float64,
                 zero_by_construction=paca_zero_gradients(5, 100))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_paca_attention_is_deterministic(device, backend):
    skip_unless_runnable(device, backend, torch.float32)
    t, params, grad = paca_case((3, 197, 64, 64, 1))
    first = paca_outputs_and_grads(t, params, grad, 1, torch.float32, backend, device=device)
    second = paca_outputs_and_grads(t, params, grad, 1, torch.float32, backend, device=device)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 5, 8, 1), (1, 100, 64, 64, 1), (3, 197, 5, 24, 3)],
                         ids=lambda s: "L{}-N{}-M{}-r{}-h{}".format(*s))
def test_paca_attention_softmax_assignment_matches_float64_reference(shape, dtype):
    skip_unless_runnable("cpu", "triton", dtype)
    got, again = check_paca(shape, dtype, "triton", "softmax", seed=5)
    assert all(torch.equal(got[k], v) for k, v in again().items())


def test_paca_attention_rejects_bad_inputs():
    t, params, _ = paca_case((1, 7, 5, 8, 1))
    p = PacaParams(*(x.float() for x in params))
    with pytest.raises(ValueError, match=r"expects tokens of shape \(L, N, r\)"):
        paca_attention(t.float()[0], p, 1)
    with pytest.raises(ValueError, match="r=8 is not divisible by num_heads=3"):
        paca_attention(t.float(), p, 3)
    with pytest.raises(TypeError, match="needs one dtype"):
        paca_attention(t, p, 1)


def _strided(x):
    """``x``'s values in a non-contiguous view: 2-D and 3-D tensors stored transposed, 1-D ones at every other
    element (NaN in between)."""
    if x.dim() == 1:
        return torch.stack([x, torch.full_like(x, float("nan"))], -1)[:, 0]
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def test_paca_attention_triton_takes_strided_tokens_parameters_and_output_gradient():
    """Every tensor of both directions a non-contiguous view: the Triton path still agrees with the float64
    reference (kernels that read a view as if it were row-major would not)."""
    skip_unless_runnable("cpu", "triton", torch.float32)
    shape = (2, 7, 5, 8, 2)
    t, params, grad = paca_case(shape, seed=4)

    def run(inputs, dtype):
        return paca_outputs_and_grads(inputs[0], inputs[1:-1], inputs[-1], 2, dtype, "reference")

    exact, baseline = exact_and_baseline(run, [t, *params, grad], torch.float32)
    leaves = [_strided(x.float()).requires_grad_(True) for x in [t, *params]]
    out_grad = _strided(grad.float())
    assert not any(x.is_contiguous() for x in [*leaves, out_grad])
    out = paca_attention(leaves[0], PacaParams(*leaves[1:]), 2, backend="triton")
    grads = torch.autograd.grad(out, leaves, out_grad)
    got = {"output": out.detach(), **{f"d_{n}": g for n, g in zip(["t", *PacaParams._fields], grads)}}
    assert_agree(got, exact, torch.float32, baseline=baseline, zero_by_construction=paca_zero_gradients(5, 7))


def test_paca_triton_launchers_refuse_strided_tensors():
    skip_unless_runnable("cpu", "triton", torch.float32)
    from gift_kernels.paca_triton import paca_triton_backward, paca_triton_forward  # needs Triton

    t, params, grad = paca_case((1, 7, 5, 8, 1))
    t, grad, p = t.float(), grad.float(), PacaParams(*(x.float() for x in params))
    with pytest.raises(ValueError, match="paca_triton_forward takes contiguous tensors; not contiguous: q_w, k_b"):
        paca_triton_forward(t, p._replace(q_w=_strided(p.q_w), k_b=_strided(p.k_b)), 1)
    _, saved, cfg = paca_triton_forward(t, p, 1)
    with pytest.raises(ValueError, match="paca_triton_backward takes contiguous tensors; not contiguous: grad_out"):
        paca_triton_backward(_strided(grad), t, p, saved, 1, "sigmoid", cfg)
