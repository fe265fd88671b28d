"""`paca_attention` (paca.py, paca_math.py, paca_triton.py), each backend against the float64 torch
reference, outputs, every gradient and PaCa's own work (output - t, d_t - grad), on random and on
sharp-attention inputs; the Triton forward's saved state against its float64 value; and mutated copies of
the Triton kernels (softened or sharpened attention, a scaled log-sum-exp) that these checks must reject.

Triton runs on CPU tensors under TRITON_INTERPRET=1 (set in tests/conftest.py); bf16 Triton on CPU with the
interpreter's bf16 fixed for the test (tests/kernels/bf16_interpreter.py, via the ``runnable`` fixture).
"""
import pytest
import torch

from gift_kernels import PacaParams, paca_attention
from gift_kernels.dispatch import TRITON_DTYPES
from gift_kernels.testing import (
    TOLERANCES,
    assert_agree,
    available_devices,
    check_paca,
    check_paca_saved_state,
    exact_and_baseline,
    paca_case,
    paca_outputs_and_grads,
    paca_zero_gradients,
    scales_of,
    skip_unless_runnable,
)
from tests.kernels.kernel_mutations import Edit, kernel_source, mutated, mutated_kernels

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


# sharp attention (`paca_case(sharp=True)`): each token attends mostly to its own cluster
SHARP_SHAPES = [(3, 100, 5, 24, 3), (1, 100, 64, 64, 1), (2, 37, 8, 16, 2)]


def _shape_id(shape):
    return "L{}-N{}-M{}-r{}-h{}".format(*shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", PACA_SHAPES, ids=_shape_id)
def test_paca_attention_matches_float64_reference(shape, device, backend, dtype, runnable):
    runnable(device, backend, dtype)
    got, _ = check_paca(shape, dtype, backend, device=device)
    assert got["output"].dtype == dtype and got["d_cluster_w"].dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHARP_SHAPES, ids=_shape_id)
def test_paca_attention_with_sharp_attention_matches_float64_reference(shape, device, backend, dtype, runnable):
    runnable(device, backend, dtype)
    check_paca(shape, dtype, backend, device=device, sharp=True)


# heads whose logits lie far apart (`paca_case(head_offset=...)`): head 1's log-sum-exp ~120 above head 0's, so a
# backward that reads another head's lse overflows (or underflows) its exp in fp32
HEAD_OFFSET, HEAD_OFFSET_SHAPE = 120.0, (2, 37, 8, 16, 2)
# N a multiple of the interpreter's 16-row tiles (launch.INTERPRETER_BLOCK), M and r ragged: the kernels' EVEN_N
# branches, the ones every ViT takes on a GPU (N = 768, 1280, ...); every other case here has N % 16 != 0
EVEN_N_SHAPES = [(2, 48, 5, 24, 3), (1, 32, 7, 24, 2)]
HEAD_OFFSET_SHAPES = [HEAD_OFFSET_SHAPE, EVEN_N_SHAPES[0]]


def test_even_n_shapes_take_the_even_n_branch_under_the_interpreter():
    """The cases are what they claim: the attention's row tile divides N (more than one tile), M and r's do not."""
    from gift_kernels.launch import INTERPRETER_PROPS, paca_launch

    for L, N, M, r, heads in EVEN_N_SHAPES:
        cfg = paca_launch(L, N, M, r, heads, torch.float32, INTERPRETER_PROPS)
        assert N % cfg.block_n == 0 and cfg.n_blocks > 1 and M % cfg.block_m and r % cfg.block_r, (N, M, r, cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", HEAD_OFFSET_SHAPES, ids=_shape_id)
def test_paca_attention_with_heads_far_apart_matches_float64_reference(shape, device, backend, dtype, runnable):
    runnable(device, backend, dtype)
    check_paca(shape, dtype, backend, device=device, head_offset=HEAD_OFFSET)
    if backend == "triton":
        lse = check_paca_saved_state(shape, dtype, device=device, head_offset=HEAD_OFFSET)["lse"]
        assert lse[:, 1].min() - lse[:, 0].max() > 100        # the case is what it claims: fp32 exp(100) > 2^128


def test_paca_attention_fp16_triton_at_ragged_two_head_shape_seed_0_matches_float64_reference():
    """Was a strict xfail at about 1.2x the old gate (d_q_w, d_q_b, d_k_w: gradients whose terms cancel by
    construction, then judged by their own size); with their rounding floors (`paca_error_floors`) it passes."""
    skip_unless_runnable("cpu", "triton", torch.float16)
    check_paca((2, 10, 17, 40, 2), torch.float16, "triton", "sigmoid", seed=0)


SAVED_STATE_CASES = ([(shape, False, "sigmoid") for shape in PACA_SHAPES] +
                     [(shape, True, "sigmoid") for shape in SHARP_SHAPES] +
                     [((3, 197, 5, 24, 3), False, "softmax"), ((1, 100, 64, 64, 1), True, "softmax")] +
                     [(EVEN_N_SHAPES[0], False, "sigmoid"), (EVEN_N_SHAPES[1], True, "softmax")])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,sharp,activation", SAVED_STATE_CASES,
                         ids=lambda c: _shape_id(c) if isinstance(c, tuple) else str(c))
def test_paca_triton_saved_state_matches_float64_reference(shape, sharp, activation, device, dtype, runnable):
    """Z, ||P||, Kq, cq, Vp and the log-sum-exps the backward reads: no output depends on the attention's
    log-sum-exp (the backward renormalises), so only this sees it."""
    runnable(device, "triton", dtype)
    state = check_paca_saved_state(shape, dtype, activation, device=device, sharp=sharp)
    assert ("lse_c" in state) == (activation == "softmax")


# ------------------------------------------------------------------ mutated kernels the checks must reject
ATTN_FWD_PROBS = "e = tl.exp(logits - row_max[:, None])"
ATTN_BWD_PROBS = "a = tl.exp(_head_logits(u, kq, cq, offs_m, M, F32_DOT, EVEN_M) - lse[:, None])"
ATTN_BWD_LSE = "lse = tl.load(LSE + layer_head.to(tl.int64) * N + offs_n"
ATTN_FWD_LSE = "lse_ptrs = LSE + (layer * H + j).to(tl.int64) * N + offs_n"
ATTN_FWD_EVEN_N_LSE = "if EVEN_N:\n            tl.store(lse_ptrs, row_max + tl.log(row_sum))"
KERNEL_MUTATIONS = {   # attention softened (temperature 2) or sharpened (1/2) in either direction; the lse 2% off
    "fwd-softened": Edit("_paca_attn_fwd", ATTN_FWD_PROBS, "e = tl.exp(0.5 * (logits - row_max[:, None]))"),
    "fwd-sharpened": Edit("_paca_attn_fwd", ATTN_FWD_PROBS, "e = tl.exp(2.0 * (logits - row_max[:, None]))"),
    "bwd-softened": Edit("_paca_attn_bwd", ATTN_BWD_PROBS, ATTN_BWD_PROBS.replace("tl.exp(", "tl.exp(0.5 * (") + ")"),
    "bwd-sharpened": Edit("_paca_attn_bwd", ATTN_BWD_PROBS, ATTN_BWD_PROBS.replace("tl.exp(", "tl.exp(2.0 * (") + ")"),
    "lse-scaled": Edit("_paca_attn_fwd", ATTN_FWD_LSE, ATTN_FWD_LSE + "\n        row_max, row_sum = 1.02 * row_max, "
                                                                    "tl.exp(1.02 * tl.log(row_sum))"),
    # the backward reads head 0's lse for every head: renormalised away unless the exp over- or underflows
    "bwd-lse-of-head-0": Edit("_paca_attn_bwd", ATTN_BWD_LSE, ATTN_BWD_LSE.replace("layer_head.to", "(layer * H).to")),
    # the unmasked (EVEN_N) lse store alone loses the row max: only an N that is a multiple of the tile sees it
    "attn-fwd-even-n-lse-without-max": Edit("_paca_attn_fwd", ATTN_FWD_EVEN_N_LSE,
                                            ATTN_FWD_EVEN_N_LSE.replace("row_max + tl.log", "tl.log")),
}
# the cases the mutations must fail: the op tests' and the sharp ones. A temperature is invisible with one cluster
# (a softmax over one is 1) or one token (every cluster token is then the same, so the attention is uniform)
MUTATION_CASES = [(s, False, 0.0) for s in PACA_SHAPES] + [(s, True, 0.0) for s in SHARP_SHAPES]
# mutations whose cases are instead these alone: the far-apart heads' (no other case can show another head's lse:
# renormalisation); the EVEN_N shapes' (every other N is masked), with and without far-apart heads
MUTATION_OWN_CASES = {
    "bwd-lse-of-head-0": [(s, False, HEAD_OFFSET) for s in HEAD_OFFSET_SHAPES],
    "attn-fwd-even-n-lse-without-max": ([(s, False, 0.0) for s in EVEN_N_SHAPES] + [(EVEN_N_SHAPES[1], True, 0.0)] +
                                        [(EVEN_N_SHAPES[0], False, HEAD_OFFSET)]),
}
# (mutation, shape) that no fp16 check at the gate can see: on these random inputs the attention is near uniform
# (largest probability 0.202 of 5 clusters; at M = 64 with fp32 dots, too), and the mutation moves no result by
# TOLERANCES[float16] of its scale
# (test_mutations_left_out_in_fp16_move_no_result_by_the_fp16_tolerance proves it); fp32 sees it
BELOW_FP16_RESOLUTION = {("bwd-softened", (3, 197, 5, 64, 1)), ("bwd-softened", (1, 100, 64, 64, 1))}


def _paca_triton():
    return pytest.importorskip("gift_kernels.paca_triton")          # Triton is optional


def _checks_reject(shape, sharp, head_offset, dtype) -> bool:
    """Whether the saved-state check or the op check (own work included) raises on this case; the cheap one first."""
    for check in (lambda: check_paca_saved_state(shape, dtype, sharp=sharp, head_offset=head_offset),
                  lambda: check_paca(shape, dtype, "triton", sharp=sharp, head_offset=head_offset)):
        try:
            check()
        except AssertionError:
            return True
    return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mutation", sorted(KERNEL_MUTATIONS))
def test_paca_kernel_mutations_fail_the_checks(mutation, dtype):
    """Every mutation fails every case with more than one cluster and token (the lse scaling every case), in fp32
    and fp16 (those of MUTATION_OWN_CASES: their own cases); the real kernels pass them all
    (test_paca_attention_matches_float64_reference and the tests above)."""
    skip_unless_runnable("cpu", "triton", dtype)
    edit = KERNEL_MUTATIONS[mutation]
    cases = [case for case in MUTATION_CASES if mutation == "lse-scaled" or (case[0][1] > 1 and case[0][2] > 1)
             if dtype == torch.float32 or case[1] or (mutation, case[0]) not in BELOW_FP16_RESOLUTION]
    cases = MUTATION_OWN_CASES.get(mutation, cases)
    with mutated(_paca_triton(), [edit]):
        unseen = [case for case in cases if not _checks_reject(*case, dtype)]
    assert not unseen, f"{mutation} passed the checks at (shape, sharp, head offset) {unseen}"


def test_mutations_left_out_in_fp16_move_no_result_by_the_fp16_tolerance():
    """BELOW_FP16_RESOLUTION, measured in fp32: the mutation moves some result by more than the fp32 tolerance and
    none by TOLERANCES[float16] of its scale, so an fp16 kernel without any rounding error but with this mutation
    would pass the fp16 gate."""
    skip_unless_runnable("cpu", "triton", torch.float32)
    for mutation, shape in sorted(BELOW_FP16_RESOLUTION):
        real, _ = check_paca(shape, torch.float32, "triton")
        t, params, grad = paca_case(shape)
        with mutated(_paca_triton(), [KERNEL_MUTATIONS[mutation]]):
            wrong = paca_outputs_and_grads(t, params, grad, shape[4], torch.float32, "triton")
        exact = paca_outputs_and_grads(t, params, grad, shape[4], torch.float64, "reference")
        scales = scales_of(exact, paca_zero_gradients(shape[2], shape[1]))
        moved = max((wrong[k].double() - real[k].double()).abs().max().item() / scales[k] for k in real)
        assert TOLERANCES[torch.float32] < moved < TOLERANCES[torch.float16], (mutation, shape, moved)


def test_another_heads_lse_is_invisible_without_far_apart_heads():
    """Why bwd-lse-of-head-0 gets the far-apart heads' cases (MUTATION_OWN_CASES): on the same shape without the
    offset the backward renormalises the wrong lse away and every check passes."""
    skip_unless_runnable("cpu", "triton", torch.float32)
    with mutated(_paca_triton(), [KERNEL_MUTATIONS["bwd-lse-of-head-0"]]):
        check_paca_saved_state(HEAD_OFFSET_SHAPE, torch.float32)
        check_paca(HEAD_OFFSET_SHAPE, torch.float32, "triton")


def test_a_temperature_is_invisible_with_one_cluster_or_one_token():
    """Why MUTATION_CASES leaves them out: the softened forward and backward pass there, being exact."""
    skip_unless_runnable("cpu", "triton", torch.float32)
    with mutated(_paca_triton(), [KERNEL_MUTATIONS["fwd-softened"], KERNEL_MUTATIONS["bwd-softened"]]):
        for shape in [s for s in PACA_SHAPES if s[1] == 1 or s[2] == 1]:
            check_paca_saved_state(shape, torch.float32)
            check_paca(shape, torch.float32, "triton")


def test_kernel_mutation_patterns_must_occur_exactly_once():
    paca_triton = _paca_triton()
    assert kernel_source(paca_triton, "_paca_attn_fwd").count("tl.store(lse_ptrs, row_max + tl.log(row_sum)") == 2
    with pytest.raises(AssertionError, match="occurs 2 times"):
        mutated_kernels(paca_triton, [Edit("_paca_attn_fwd", "tl.store(lse_ptrs, row_max + tl.log(row_sum)", "")])
    with pytest.raises(AssertionError, match="occurs 0 times"):
        mutated_kernels(paca_triton, [Edit("_paca_attn_fwd", "no such text", "")])
    copies = mutated_kernels(paca_triton, [KERNEL_MUTATIONS["fwd-softened"]])
    assert copies["_paca_attn_fwd"] is not paca_triton._paca_attn_fwd       # the module keeps its kernel


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
