"""gift_kernels.testing and gift_kernels.agreement, the op-level checks: they see every gradient and each op's own work.

For both ops, in fp32 and fp16: the real results pass `assert_agree` against the float64 reference
(each tensor at its own scale, the same-dtype baseline of `exact_and_baseline`, the rounding floors of
`paca_error_floors` / `residual_error_floors`), and zeroing, negating, scaling by 1.01 or moving one
element by 1% of any single gradient, or the output, fails it, naming that tensor and no other; so does
any of these on an own-work key (`paca_own_work`, `residual_own_work`: PaCa's output - t and d_t - grad,
the residual's output - (x W^T + b) and dx - g W). The zero-by-construction lists are checked against
float64 too.
"""
import pytest
import torch

from gift_kernels import triton_available
from gift_kernels.testing import (
    ONE_PERCENT_DTYPES,
    TOLERANCES,
    disagreements,
    exact_and_baseline,
    paca_case,
    paca_error_floors,
    paca_outputs_and_grads,
    paca_own_work,
    paca_zero_gradients,
    residual_case,
    residual_error_floors,
    residual_outputs_and_grads,
    residual_own_work,
    rounded_to,
    scales_of,
)

PACA_SHAPE = (2, 37, 5, 24, 3)          # (L, N, M, r, heads): ragged, small enough for the interpreter


RESIDUAL_SHAPE = (37, 24, 40, 8)        # (rows, d_in, d_out, r)


def _one_element(x: torch.Tensor) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    flat = out.view(-1)
    flat[flat.numel() // 2] += 0.01 * x.abs().max().to(x.dtype)
    return out


MUTATIONS = {
    "zeroed": torch.zeros_like,
    "negated": torch.neg,
    "scaled by 1.01": lambda x: x * 1.01,
    "one element moved by 1% of the tensor's max": _one_element,
}


def _op_case(op: str, activation: str = "sigmoid"):
    """(run(inputs, dtype, backend) -> results, float64 inputs, zero-by-construction keys); results without the
    own-work keys (see `_check`)."""
    if op == "paca":
        t, params, grad = paca_case(PACA_SHAPE)
        L, N, M, r, heads = PACA_SHAPE

        def run(inputs, dtype, backend="reference"):
            return paca_outputs_and_grads(inputs[0], inputs[1:-1], inputs[-1], heads, dtype, backend, activation)

        return run, [t, *params, grad], paca_zero_gradients(M, N, activation)

    def run(inputs, dtype, backend="reference"):
        return residual_outputs_and_grads(*inputs, dtype, backend)

    return run, list(residual_case(RESIDUAL_SHAPE)), ()


def _own_work_and_floors(op, inputs, dtype, results, activation="sigmoid"):
    """``results`` (got, exact, baseline) with the op's own-work keys, and its rounding floors."""
    rounded = rounded_to(inputs, dtype)
    if op == "paca":
        own = [paca_own_work(r, rounded[0], rounded[-1]) for r in results]
        return own, paca_error_floors(rounded[0], rounded[1:-1], rounded[-1], PACA_SHAPE[4], dtype, own[1], activation)
    x, w, b, psi, tokens, grad = rounded
    return [residual_own_work(r, x, w, b, grad) for r in results], residual_error_floors(*rounded, dtype)


def _check(op, dtype, backend, activation="sigmoid"):
    """``(got, exact, baseline, zero, floors)``, own-work keys included."""
    run, inputs, zero = _op_case(op, activation)
    exact, baseline = exact_and_baseline(run, inputs, dtype)
    got = run(inputs, dtype, backend)
    (got, exact, baseline), floors = _own_work_and_floors(op, inputs, dtype, (got, exact, baseline), activation)
    return got, exact, baseline, zero, floors


CASES = [(op, dtype) for op in ("paca", "residual") for dtype in ONE_PERCENT_DTYPES]
OWN_WORK_KEYS = {"paca": ("output_minus_t", "d_t_minus_grad"), "residual": ("output_minus_xw", "dx_minus_gw")}


@pytest.mark.parametrize("op,dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_every_single_mutation_fails_and_the_real_result_passes(op, dtype):
    got, exact, baseline, zero, floors = _check(op, dtype, "torch")
    assert got["output"].dtype == dtype
    assert disagreements(got, exact, dtype, baseline, zero, floors=floors) == []
    mutated_keys = [k for k in got if k not in zero]
    # output, every gradient but d_k_b, and the two own-work keys
    assert len(mutated_keys) == {"paca": 13, "residual": 6}[op] and set(OWN_WORK_KEYS[op]) <= set(mutated_keys)
    missed = []
    for key in mutated_keys:
        for name, mutate in MUTATIONS.items():
            bad = disagreements({**got, key: mutate(got[key])}, exact, dtype, baseline, zero, floors=floors)
            if [line.split(":")[0] for line in bad] != [key]:
                missed.append(f"{key} {name}: {bad}")
    assert not missed, "mutations the check did not see (or blamed on another tensor):\n" + "\n".join(missed)


@pytest.mark.parametrize("op", ["paca", "residual"])
def test_bf16_sees_zeroed_negated_and_errors_beyond_twice_its_tolerance_but_not_1_percent(op):
    """What the module docstring promises in bf16 (not in ONE_PERCENT_DTYPES): a gross error in any single
    tensor fails; a 1% one does not have to."""
    assert torch.bfloat16 not in ONE_PERCENT_DTYPES
    got, exact, baseline, zero, floors = _check(op, torch.bfloat16, "torch")
    assert disagreements(got, exact, torch.bfloat16, baseline, zero, floors=floors) == []
    factor = 1 + 2 * TOLERANCES[torch.bfloat16]
    for key in (k for k in got if k not in zero):
        for mutate in (torch.zeros_like, torch.neg, lambda x: x.double() * factor):
            assert [line.split(":")[0] for line in disagreements({**got, key: mutate(got[key])}, exact, torch.bfloat16,
                                                                 baseline, zero, floors=floors)] == [key], key


def test_softmax_assignment_mutations_fail_too():
    got, exact, baseline, zero, floors = _check("paca", torch.float32, "torch", activation="softmax")
    assert set(zero) == {"d_k_b", "d_cluster_b"}
    assert disagreements(got, exact, torch.float32, baseline, zero, floors=floors) == []
    for key in (k for k in got if k not in zero):
        assert disagreements({**got, key: got[key] * 1.01}, exact, torch.float32, baseline, zero,
                             floors=floors) != [], key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_interpreter_paca_passes_and_its_mutations_fail(dtype):
    if not triton_available("cpu"):
        pytest.skip("Triton cannot run on CPU here (needs TRITON_INTERPRET=1)")
    got, exact, baseline, zero, floors = _check("paca", dtype, "triton")
    assert disagreements(got, exact, dtype, baseline, zero, floors=floors) == []
    for key in (k for k in got if k not in zero):
        assert disagreements({**got, key: got[key] * 1.01}, exact, dtype, baseline, zero, floors=floors) != [], key


def test_old_set_wide_floor_would_have_missed_small_gradients():
    """Why each tensor has its own scale: d_q_w is ~1e-3 of the largest PaCa gradient here, so a floor of 1%
    of the set's largest scale (the old rule) let a zeroed d_q_w through; the per-tensor rule does not."""
    got, exact, baseline, zero, floors = _check("paca", torch.float16, "torch")
    scales = scales_of(exact, zero)
    assert scales["d_q_w"] < 1e-2 * max(scales.values())
    assert [line.split(":")[0] for line in disagreements({**got, "d_q_w": torch.zeros_like(got["d_q_w"])}, exact,
                                                        torch.float16, baseline, zero, floors=floors)] == ["d_q_w"]


@pytest.mark.parametrize("op", ["paca", "residual"])
def test_zero_by_construction_lists_are_exactly_the_zero_gradients(op):
    for activation in (["sigmoid", "softmax"] if op == "paca" else ["sigmoid"]):
        run, inputs, zero = _op_case(op, activation)
        exact = run(inputs, torch.float64)
        largest = max(v.abs().max().item() for v in exact.values())
        tiny = {k for k, v in exact.items() if v.abs().max().item() <= 1e-12 * largest}
        assert tiny == set(zero), activation


def test_zero_by_construction_degenerate_paca_shapes():
    assert set(paca_zero_gradients(1, 7)) == {"d_k_b", "d_q_w", "d_q_b", "d_k_w"}
    assert set(paca_zero_gradients(5, 1)) == {"d_k_b", "d_q_w", "d_q_b", "d_k_w", "d_cluster_w", "d_cluster_b"}
    for activation in ("sigmoid", "softmax"):  # one token: every cluster token is the same, so are the keys
        t, params, grad = paca_case((3, 1, 5, 8, 1))
        exact = paca_outputs_and_grads(t, params, grad, 1, torch.float64, "reference", activation)
        largest = max(v.abs().max().item() for v in exact.values())
        zero = {k for k, v in exact.items() if v.abs().max().item() <= 1e-12 * largest}
        assert zero == set(paca_zero_gradients(5, 1, activation))
    t, params, grad = paca_case((2, 1, 1, 8, 1))
    exact = paca_outputs_and_grads(t, params, grad, 1, torch.float64, "reference")
    largest = max(v.abs().max().item() for v in exact.values())
    assert {k for k, v in exact.items() if v.abs().max().item() <= 1e-12 * largest} == set(paca_zero_gradients(1, 1))


def test_fp32_accumulation_unit_is_the_device_s():
    """The fp32 floors model what ran: IEEE fp32 (2^-24) on CPU (the interpreter, the torch path), tf32x3 (2^-22) in
    the Triton dots on CUDA; 16-bit inputs accumulate in fp32 everywhere."""
    from gift_kernels.agreement import accumulation_unit

    assert accumulation_unit(torch.float32, "cpu") == 2.0 ** -24
    assert accumulation_unit(torch.float32, "cuda") == 2.0 ** -22
    assert accumulation_unit(torch.float16, "cuda") == accumulation_unit(torch.bfloat16, "cpu") == 2.0 ** -24
    t, params, grad = paca_case(PACA_SHAPE)
    exact = paca_outputs_and_grads(t, params, grad, PACA_SHAPE[4], torch.float64, "reference")
    on_cpu = paca_error_floors(t, params, grad, PACA_SHAPE[4], torch.float32, exact)          # t's device: CPU
    on_cuda = paca_error_floors(t, params, grad, PACA_SHAPE[4], torch.float32, exact, device_type="cuda")
    assert on_cuda["d_q_b"] == pytest.approx(4 * on_cpu["d_q_b"])
