"""One tolerance table keyed by dtype, and the agreement check that tests and bench share.

Each tensor is compared against its own scale: the error allowed for tensor ``k`` is

    TOLERANCES[dtype] * scale_k  +  BASELINE_FACTOR * (the baseline's own max abs error on k)

where ``scale_k = max|expected_k|`` (the float64 reference's magnitude of that very tensor) and the
baseline, when given, is a plain-torch computation of the same thing in the same dtype (the
FlashAttention rule: a gradient that cancels to something small carries rounding noise set by its
summands, and the baseline shows how much). No tensor borrows the scale of another, so in fp32 and
fp16 (``ONE_PERCENT_DTYPES``) zeroing, negating or scaling any single gradient by 1% fails the check
(tests/test_agreement.py proves it for both ops). In bf16 (8 significant bits) the tolerance is 4e-2 of
each tensor's scale, so a 1% error is NOT guaranteed to fail: zeroing, negating or an error of
``1 + 2 x TOLERANCES[bfloat16]`` (8%) does (tested); measured on the test shapes, scaling by 1.04 passes.
``BASELINE_FACTOR = 2`` is for one op against the same math; whole-model comparisons, whose fast paths
associate many reductions differently, use `gift.testing.MODEL_BASELINE_FACTOR`.

The one exception is the explicit list ``zero_by_construction``: gradients that are zero in exact
arithmetic whatever the inputs (e.g. PaCa's key bias: it adds the same logit to every cluster of a
softmax over clusters, see `paca_zero_gradients`). Their reference magnitude is rounding noise, so
their scale is the largest reference magnitude of the set they are compared in (what their
summands are made of).

For a low-precision check use `exact_and_baseline`: the exact answer is float64 on the inputs as the
dtype sees them (rounded to it), and the baseline the fp32 reference on those inputs rounded to
the dtype: what a kernel with 16-bit loads, fp32 accumulation and 16-bit stores can reach. (The
reference run end to end in fp16 is no baseline for that: on cancellation-heavy gradients such as
PaCa's d_q_w it is 10-40% off, and twice that lets any 1% error through.)
"""
from __future__ import annotations

from typing import Callable, Collection, Mapping, Sequence

import torch

from .dispatch import triton_available
from .paca import paca_attention
from .paca_math import PacaParams, paca_attention_reference
from .residual import lowrank_residual_linear, lowrank_residual_linear_reference

# max error, relative to each tensor's own scale, allowed for a computation in this dtype
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 4e-2,
}
BASELINE_FACTOR = 2.0
# dtypes in which a 1% error in any single tensor is guaranteed to fail (tests/test_agreement.py); not bfloat16
ONE_PERCENT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16)


def scales_of(expected: Mapping[str, torch.Tensor], zero_by_construction: Collection[str] = ()) -> dict[str, float]:
    """Per key the scale its error is divided by: ``max|expected_k|``, or for a key in
    ``zero_by_construction`` the largest ``max|expected|`` of the other keys."""
    unknown = set(zero_by_construction) - set(expected)
    if unknown:
        raise KeyError(f"zero_by_construction names keys that are not compared: {sorted(unknown)}")
    own = {k: expected[k].detach().double().abs().max().item() if expected[k].numel() else 0.0 for k in expected}
    largest = max((v for k, v in own.items() if k not in zero_by_construction), default=0.0)
    return {k: largest if k in zero_by_construction else v for k, v in own.items()}


def max_abs_errors(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per key ``max|actual_k - expected_k|``; raises on different key sets or shapes."""
    if set(actual) != set(expected):
        raise KeyError(f"compared sets differ: only in actual {sorted(set(actual) - set(expected))}, "
                       f"only in expected {sorted(set(expected) - set(actual))}")
    out = {}
    for k in expected:
        a, e = actual[k].detach().double(), expected[k].detach().double()
        if a.shape != e.shape:
            raise ValueError(f"{k}: shape {tuple(a.shape)} vs expected {tuple(e.shape)}")
        out[k] = (a.cpu() - e.cpu()).abs().max().item() if e.numel() else 0.0
    return out


def relative_errors(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                    zero_by_construction: Collection[str] = ()) -> dict[str, tuple[float, float]]:
    """Per key: (max abs error, max abs error / the key's scale as in `scales_of`)."""
    errors, scales = max_abs_errors(actual, expected), scales_of(expected, zero_by_construction)
    tiny = torch.finfo(torch.float64).tiny
    return {k: (err, err / max(scales[k], tiny)) for k, err in errors.items()}


def disagreements(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], dtype: torch.dtype,
                  baseline: Mapping[str, torch.Tensor] | None = None, zero_by_construction: Collection[str] = (),
                  baseline_factor: float = BASELINE_FACTOR) -> list[str]:
    """One line per key whose error exceeds what the module docstring allows (``baseline_factor`` times the
    baseline's error); empty when all agree."""
    tol = TOLERANCES[dtype]
    scales = scales_of(expected, zero_by_construction)
    errors = max_abs_errors(actual, expected)
    slack = max_abs_errors(baseline, expected) if baseline is not None else {}
    bad = []
    for k, err in errors.items():
        allowed = tol * scales[k] + baseline_factor * slack.get(k, 0.0)
        if not err <= allowed:  # NaN fails too
            bad.append(f"{k}: abs {err:.3e} > {allowed:.3e} = {tol:.0e} x scale {scales[k]:.3e}"
                       + (f" + {baseline_factor:g} x baseline's {slack[k]:.3e}" if k in slack else "")
                       + (" (zero by construction)" if k in zero_by_construction else ""))
    return bad


def assert_agree(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 baseline: Mapping[str, torch.Tensor] | None = None, zero_by_construction: Collection[str] = (),
                 baseline_factor: float = BASELINE_FACTOR) -> None:
    """Raise ``AssertionError`` listing every key that disagrees (see `disagreements`)."""
    bad = disagreements(actual, expected, dtype, baseline, zero_by_construction, baseline_factor)
    if bad:
        raise AssertionError(f"{len(bad)} of {len(expected)} tensors disagree in {dtype}:\n  " + "\n  ".join(bad))


def rounded_to(inputs: Sequence[torch.Tensor | None], dtype: torch.dtype) -> list[torch.Tensor | None]:
    """The inputs as a ``dtype`` computation sees them, in float64 (``None`` stays ``None``)."""
    return [None if x is None else x.to(dtype).double() for x in inputs]


def exact_and_baseline(run: Callable[[Sequence, torch.dtype], dict], inputs: Sequence[torch.Tensor | None],
                       dtype: torch.dtype) -> tuple[dict, dict]:
    """``run(inputs, dtype) -> {name: tensor}`` evaluated as the reference. Returns ``(exact, baseline)``:
    exact = float64 on ``rounded_to(inputs, dtype)``; baseline = the same in fp32, rounded to ``dtype``."""
    inputs = rounded_to(inputs, dtype)
    exact = run(inputs, torch.float64)
    baseline = {k: v.to(dtype) for k, v in run(inputs, torch.float32 if dtype != torch.float64 else dtype).items()}
    return exact, baseline


def paca_zero_gradients(num_clusters: int, num_tokens: int, activation: str = "sigmoid") -> tuple[str, ...]:
    """Keys of `paca_outputs_and_grads` whose gradient is zero in exact arithmetic: ``d_k_b`` always (the key
    bias adds ``Q_n . b_k`` to every cluster's logit of a softmax over clusters); ``d_cluster_b`` with the
    softmax assignment (``b_c[m]`` is added to all N logits of a softmax over tokens); with one cluster every
    query/key gradient (the softmax is 1); with one token the cluster assignment's (``Z = l2(c u) = u``) and,
    every cluster token then being the same, every query/key gradient too (all keys equal: uniform softmax)."""
    keys = ["d_k_b"] + (["d_cluster_b"] if activation == "softmax" else [])
    if num_clusters == 1 or num_tokens == 1:
        keys += ["d_q_w", "d_q_b", "d_k_w"]
    if num_tokens == 1:
        keys += ["d_cluster_w"] + (["d_cluster_b"] if activation != "softmax" else [])
    return tuple(keys)


# ------------------------------------------------------------------------------ test inputs for the ops
def paca_case(shape, seed: int = 0):
    """Random float64 inputs for `paca_attention` at ``shape = (L, N, M, r, heads)``:
    ``(t (L, N, r), params (list of the 10 PacaParams fields), grad (L, N, r))``."""
    L, N, M, r, _ = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * scale

    t = rnd(L, N, r)
    params = [rnd(M, r, scale=r ** -0.5), rnd(M, scale=0.3)]
    for _ in range(4):
        params += [rnd(r, r, scale=r ** -0.5), rnd(r, scale=0.3)]
    return t, params, rnd(L, N, r)


def paca_outputs_and_grads(t, params, grad, heads: int, dtype: torch.dtype, backend: str, activation: str = "sigmoid",
                           device="cpu") -> dict[str, torch.Tensor]:
    """Run `paca_attention` (``backend="reference"``: `paca_attention_reference`) in ``dtype`` on ``device``;
    returns CPU tensors ``{"output", "d_t", "d_<PacaParams field>"...}``."""
    leaves = [x.to(device=device, dtype=dtype).requires_grad_(True) for x in [t, *params]]
    if backend == "reference":
        out = paca_attention_reference(leaves[0], PacaParams(*leaves[1:]), heads, activation)
    else:
        out = paca_attention(leaves[0], PacaParams(*leaves[1:]), heads, activation, backend=backend)
    grads = torch.autograd.grad(out, leaves, grad.to(device=device, dtype=dtype))
    names = ["t", *PacaParams._fields]
    return {"output": out.detach().cpu(), **{f"d_{n}": gr.cpu() for n, gr in zip(names, grads)}}


def residual_case(shape, bias: bool = True, seed: int = 1):
    """Random float64 inputs for `lowrank_residual_linear` at ``shape = (rows, d_in, d_out, r)``:
    ``(x (2, rows, d_in), W (d_out, d_in), b (d_out,) or None, psi (d_in, r), T (d_out, r), grad (2, rows, d_out))``."""
    rows, d_in, d_out, r = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    return (rnd(2, rows, d_in), rnd(d_out, d_in) * d_in ** -0.5, rnd(d_out) if bias else None,
            rnd(d_in, r) * 0.1, rnd(d_out, r), rnd(2, rows, d_out))


def residual_outputs_and_grads(x, w, b, psi, tokens, grad, dtype: torch.dtype, backend: str,
                               gift_dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """Run `lowrank_residual_linear` (``backend="reference"``: its reference) with x, W, b in ``dtype`` and psi, T
    in ``gift_dtype`` (default ``dtype``); returns CPU tensors ``{"output", "dx", "dpsi", "dT"}``."""
    gift_dtype = gift_dtype or dtype
    xs = x.to(device=device, dtype=dtype).requires_grad_(True)
    wb = [w.to(device=device, dtype=dtype), None if b is None else b.to(device=device, dtype=dtype)]
    lr = [v.to(device=device, dtype=gift_dtype).requires_grad_(True) for v in (psi, tokens)]
    if backend == "reference":
        out = lowrank_residual_linear_reference(xs, *wb, *(v.to(dtype) for v in lr))
    else:
        out = lowrank_residual_linear(xs, *wb, *lr, backend=backend)
    dx, dpsi, dt = torch.autograd.grad(out, [xs, *lr], grad.to(device=device, dtype=out.dtype))
    return {"output": out.detach().cpu(), "dx": dx.cpu(), "dpsi": dpsi.cpu(), "dT": dt.cpu()}


# ------------------------------------------------------------------------------ one op checked end to end
def check_paca(shape, dtype: torch.dtype, backend: str, activation: str = "sigmoid", seed: int = 0,
               device="cpu") -> tuple[dict[str, torch.Tensor], Callable[[], dict[str, torch.Tensor]]]:
    """`paca_attention` at ``shape = (L, N, M, r, heads)`` in ``dtype`` on ``backend``/``device`` against the
    float64 reference (`exact_and_baseline`: rounded inputs, fp32 baseline), every tensor at its own scale.
    Raises ``AssertionError`` on disagreement; returns the results and a function that reruns the op."""
    t, params, grad = paca_case(shape, seed)
    heads = shape[4]

    def run(inputs, run_dtype, run_backend="reference", run_device="cpu"):
        return paca_outputs_and_grads(inputs[0], inputs[1:-1], inputs[-1], heads, run_dtype, run_backend, activation,
                                      device=run_device)

    inputs = [t, *params, grad]
    exact, baseline = exact_and_baseline(run, inputs, dtype)
    got = run(inputs, dtype, backend, device)
    assert_agree(got, exact, dtype, baseline=baseline,
                 zero_by_construction=paca_zero_gradients(shape[2], shape[1], activation))
    return got, lambda: run(inputs, dtype, backend, device)


def check_residual(shape, dtype: torch.dtype, backend: str, bias: bool = True,
                   device="cpu") -> tuple[dict[str, torch.Tensor], Callable[[], dict[str, torch.Tensor]]]:
    """`lowrank_residual_linear` at ``shape = (rows, d_in, d_out, r)``, checked like `check_paca`."""
    inputs = list(residual_case(shape, bias))

    def run(args, run_dtype, run_backend="reference", run_device="cpu"):
        return residual_outputs_and_grads(*args, run_dtype, run_backend, device=run_device)

    exact, baseline = exact_and_baseline(run, inputs, dtype)
    got = run(inputs, dtype, backend, device)
    assert_agree(got, exact, dtype, baseline=baseline)
    return got, lambda: run(inputs, dtype, backend, device)


# ------------------------------------------------------------------------------ what the op tests can run here
def available_devices() -> list[str]:
    """The devices op tests run on: CPU always (Triton there under the interpreter), CUDA where present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def skip_unless_runnable(device: str, backend: str, dtype: torch.dtype) -> None:
    """``pytest.skip`` an op test on ``backend`` in ``dtype`` that cannot run on ``device`` here. bf16 runs on
    CUDA only: the interpreter's bf16 ``tl.dot`` returns garbage without an error."""
    import pytest  # a test dependency: this module is also imported by the bench and gift.testing

    if backend == "triton" and not triton_available(device):
        pytest.skip(f"Triton cannot run on {device} here (CPU needs TRITON_INTERPRET=1)")
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bf16 is tested on CUDA only: the interpreter's bf16 tl.dot returns garbage")
