"""The agreement rule: one tolerance table keyed by dtype, and how results are compared with an exact answer
(by the tests, the bench and the dispatch's verification of a Triton kernel on its first use).

Each tensor is compared against its own scale: the error allowed for tensor ``k`` is

    TOLERANCES[dtype] * scale_k  +  BASELINE_FACTOR * (the baseline's own max abs error on k)

where ``scale_k = max|expected_k|`` (the float64 reference's magnitude of that very tensor) and the
baseline, when given, is a plain-torch computation of the same thing in the same dtype (the
FlashAttention rule: a gradient that cancels to something small carries rounding noise set by its
summands, and the baseline shows how much). No tensor borrows the scale of another, so in fp32 and
fp16 (``ONE_PERCENT_DTYPES``) zeroing, negating or scaling any single gradient, or own-work key (below),
by 1% fails the check wherever its rounding floor (below) is under 1% of its scale (tests/kernels/test_testing.py
proves it for both ops at its shapes, floors included). A cancelling gradient's floor can exceed that: its error
is set by its summands, not its size (PaCa's d_q_b at (L, N, M, r, h) = (1, 100, 64, 64, 1): 1.8% of its scale
in fp32 on CPU, 4x that on CUDA, whose fp32 dots are tf32x3); zeroing or negating it still fails. In bf16
(8 significant bits) the tolerance is 4e-2 of each tensor's scale, so a 1% error is NOT guaranteed to
fail: zeroing, negating or an error of ``1 + 2 x TOLERANCES[bfloat16]`` (8%) does (tested); measured on
the test shapes, scaling by 1.04 passes.
``BASELINE_FACTOR = 2`` is for one op against the same math; whole-model comparisons, whose fast paths
associate many reductions differently, use `gift.testing.MODEL_BASELINE_FACTOR`.

The one exception is the explicit list ``zero_by_construction``: gradients that are zero in exact
arithmetic whatever the inputs (e.g. PaCa's key bias: it adds the same logit to every cluster of a
softmax over clusters, see `paca_zero_gradients`). Their reference magnitude is rounding noise, so
their scale is the largest reference magnitude of the set they are compared in (what their
summands are made of).

Besides whole tensors, each op's own work is compared at its own scale (`paca_own_work`,
`residual_own_work`): PaCa's ``output - t`` and ``d_t - grad``, the residual's ``output - (x W^T + b)`` and
``dx - g W``, differences that are exact in the float64 reference. The pass-through terms set the scale of the
whole tensors, so in 16 bits the part that depends on the attention, or on the low-rank term, is far below
a whole tensor's tolerance; these keys see it. The Triton PaCa forward's saved state (Z, its norms, the
folded keys and values, the attention's log-sum-exp) is checked against its float64 value too
(`check_paca_saved_state`): the backward renormalises the probabilities it recomputes, so no output or
gradient depends on the saved log-sum-exp.

Where the rounding error of a result is set by something other than its size, the error it is allowed
grows by a floor derived from the computation, the same on any CPU (`paca_error_floors`,
`residual_error_floors`), in units of `accumulation_unit` (the unit roundoff of the op's products and sums)
and `storage_unit` (of storing a value in the dtype):
  * a sum whose terms cancel by construction (PaCa's d_q_w, d_q_b, d_k_w: the softmax over clusters makes
    ``sum_m dlogits[n, m] = 0``; d_cluster_w, d_cluster_b: dP is orthogonal to Z): ``ROUNDING_FACTOR x
    accumulation_unit x`` the magnitude of its summands (`paca_cancelling_summands`), not of its result;
  * a difference with a stored tensor (the own-work keys): the stored tensor's rounding,
    ``storage_unit x max|stored|``; for the residual, whose GEMM accumulates over d_in, ``(storage_unit +
    ROUNDING_FACTOR x accumulation_unit) x max(|x| |W|^T + |b| + |x psi| |T|^T)`` (dx alike), the summed
    terms' magnitude bounding the stored output's too.
The baseline's own error stays in the rule (it covers what no floor names), but no check relies on how
one CPU happened to round it.

For a low-precision check use `exact_and_baseline`: the exact answer is float64 on the inputs as the
dtype sees them (rounded to it), and the baseline the fp32 reference on those inputs rounded to
the dtype: what a kernel with 16-bit loads, fp32 accumulation and 16-bit stores can reach. (The
reference run end to end in fp16 is no baseline for that: on cancellation-heavy gradients such as
PaCa's d_q_w it is 10-40% off, and twice that lets any 1% error through.)
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Collection, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from .paca_math import PacaParams, l2, merge_heads, split_heads

# max error, relative to each tensor's own scale, allowed for a computation in this dtype
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 4e-2,
}
BASELINE_FACTOR = 2.0
# dtypes in which a 1% error in any single tensor is guaranteed to fail (tests/kernels/test_testing.py); not bfloat16
ONE_PERCENT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16)
# rounding error floors (`paca_error_floors`, `residual_error_floors`): this many `accumulation_unit`s per unit of
# summand magnitude. Measured on the PaCa test shapes (3 seeds), the torch path's, the Triton kernels' and the fp32
# baseline's errors on the cancelling gradients stayed below 0.6 (d_q_*, d_k_w) and 0.95 (d_cluster_*) of one
# IEEE fp32 unit (2^-24) per unit of summand magnitude
ROUNDING_FACTOR = 4.0


def accumulation_unit(dtype: torch.dtype, device_type: str = "cuda") -> float:
    """Unit roundoff of the products and sums of an op in ``dtype`` run on ``device_type``: float64's for float64;
    for fp32 on CUDA 2^-22, the Triton dots running tf32x3 there (`launch.F32_DOT_PRECISION`: three TF32 products,
    the dropped low x low term and the low parts' TF32 rounding about 2^-22 of each product), elsewhere IEEE fp32's
    2^-24 (the interpreter and the torch path); fp32's 2^-24 for 16-bit inputs (16-bit operands, fp32
    accumulation)."""
    if dtype == torch.float64:
        return 2.0 ** -53
    return 2.0 ** -22 if dtype == torch.float32 and device_type == "cuda" else 2.0 ** -24


def storage_unit(dtype: torch.dtype) -> float:
    """Unit roundoff of storing a value in ``dtype``: ``|fl(x) - x| <= storage_unit(dtype) * |x|``."""
    return torch.finfo(dtype).eps / 2


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
                  baseline_factor: float = BASELINE_FACTOR, floors: Mapping[str, float] | None = None) -> list[str]:
    """One line per key whose error exceeds what the module docstring allows (``baseline_factor`` times the
    baseline's error, plus the key's rounding error floor in ``floors``, if any); empty when all agree."""
    tol = TOLERANCES[dtype]
    scales = scales_of(expected, zero_by_construction)
    errors = max_abs_errors(actual, expected)
    slack = max_abs_errors(baseline, expected) if baseline is not None else {}
    floors = floors or {}
    unknown = set(floors) - set(expected)
    if unknown:
        raise KeyError(f"floors names keys that are not compared: {sorted(unknown)}")
    bad = []
    for k, err in errors.items():
        allowed = tol * scales[k] + baseline_factor * slack.get(k, 0.0) + floors.get(k, 0.0)
        if not err <= allowed:  # NaN fails too
            bad.append(f"{k}: abs {err:.3e} > {allowed:.3e} = {tol:.0e} x scale {scales[k]:.3e}"
                       + (f" + {baseline_factor:g} x baseline's {slack[k]:.3e}" if k in slack else "")
                       + (f" + floor {floors[k]:.3e}" if k in floors else "")
                       + (" (zero by construction)" if k in zero_by_construction else ""))
    return bad


def assert_agree(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 baseline: Mapping[str, torch.Tensor] | None = None, zero_by_construction: Collection[str] = (),
                 baseline_factor: float = BASELINE_FACTOR, floors: Mapping[str, float] | None = None) -> None:
    """Raise ``AssertionError`` listing every key that disagrees (see `disagreements`)."""
    bad = disagreements(actual, expected, dtype, baseline, zero_by_construction, baseline_factor, floors)
    if bad:
        raise AssertionError(f"{len(bad)} of {len(expected)} tensors disagree in {dtype}:\n  " + "\n  ".join(bad))


@contextlib.contextmanager
def full_precision_matmul() -> Iterator[None]:
    """Within the block, fp32 matmuls of torch run in IEEE fp32 (``torch.set_float32_matmul_precision("highest")``:
    no TF32 on CUDA, whose error would widen a baseline's slack ~1000x); the caller's setting is restored after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


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


def paca_own_work(results: Mapping[str, torch.Tensor], t: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """``results`` (PaCa's ``output``, ``d_t`` and parameter gradients) with its own contributions added, in float64 on
    the results' device: ``output_minus_t = output - t`` (``O Wp^T + bp``) and ``d_t_minus_grad = d_t - grad`` (the l2
    backward of dU); ``t`` and ``grad`` as the run's dtype sees them (`rounded_to`)."""
    device = results["output"].device
    return {**results, "output_minus_t": results["output"].double() - t.double().to(device),
            "d_t_minus_grad": results["d_t"].double() - grad.double().to(device)}


def paca_cancelling_summands(t, params, grad, heads: int, activation: str = "sigmoid") -> dict[str, float]:
    """For PaCa's gradients whose terms cancel by construction, the largest magnitude of their summands, from
    float64 inputs ``t`` (L, N, r), ``params`` and ``grad``; their rounding error is set by these, not by their size
    (up to 1e5 times smaller on the test shapes).

    * ``d_q_b``, ``d_q_w``, ``d_k_w``: the softmax over the M clusters makes ``sum_m dlogits[n, m] = 0`` with
      ``dlogits = a (dA - sum_m a dA)``; ``d_q_b = scale sum_{n, m} dlogits K_m``, ``d_q_w`` is the same times U and
      ``d_k_w`` is ``dK = scale dlogits^T Q`` times Z. Summands: the terms dlogits is the difference of,
      ``a (|dA| + |sum_m a dA|)``, times the magnitudes that multiply them.
    * ``d_cluster_b``, ``d_cluster_w`` (sigmoid assignment; with the softmax one d_cluster_b is zero): ``dC = U dP^T``
      with dP orthogonal to Z (the l2 backward), so ``dC`` cancels over r; summands ``|U| |dP|^T`` times the
      sigmoid's derivative / N (times U for d_cluster_w).
    """
    p = PacaParams(*params)
    L, N, r = t.shape
    scale = 1.0 / math.sqrt(r // heads)
    u, _ = l2(t)
    logits_c = F.linear(u, p.cluster_w, p.cluster_b)
    c = torch.softmax(logits_c, dim=-2) if activation == "softmax" else torch.sigmoid(logits_c) / N
    pooled = (c.transpose(-1, -2) @ u).requires_grad_(True)                    # P (L, M, r), for dP
    with torch.enable_grad():
        z, _ = l2(pooled)
        q = split_heads(F.linear(u, p.q_w, p.q_b), heads)                      # (L, h, N, d)
        k = split_heads(F.linear(z, p.k_w, p.k_b), heads)                      # (L, h, M, d)
        v = split_heads(F.linear(z, p.v_w, p.v_b), heads)
        a = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)             # (L, h, N, M)
        out = merge_heads(a @ v) @ p.proj_w.t()
        dp, = torch.autograd.grad(out, pooled, grad)
    q, k, v, a, z = (x.detach() for x in (q, k, v, a, z))
    da = split_heads(grad @ p.proj_w, heads) @ v.transpose(-1, -2)
    terms = a * (da.abs() + (a * da).sum(-1, keepdim=True).abs())
    dq = merge_heads(scale * terms @ k.abs()).flatten(0, 1)                    # (L N, r)
    dk = merge_heads(scale * terms.transpose(-1, -2) @ q.abs()).flatten(0, 1)  # (L M, r)
    summands = {"d_q_b": dq.sum(0).max().item(), "d_q_w": (dq.t() @ u.abs().flatten(0, 1)).max().item(),
                "d_k_w": (dk.t() @ z.abs().flatten(0, 1)).max().item()}
    if activation != "softmax":
        sig = torch.sigmoid(logits_c)
        ds = (u.abs() @ dp.abs().transpose(-1, -2)) * sig * (1 - sig) / N       # (L, N, M)
        summands["d_cluster_b"] = ds.sum((0, 1)).max().item()
        summands["d_cluster_w"] = (ds.flatten(0, 1).t() @ u.abs().flatten(0, 1)).max().item()
    return summands


def paca_error_floors(t, params, grad, heads: int, dtype: torch.dtype, expected: Mapping[str, torch.Tensor],
                      activation: str = "sigmoid", device_type: str | None = None) -> dict[str, float]:
    """Rounding error floors (module docstring) of PaCa's cancelling gradients and own-work keys in ``dtype`` for a
    run on ``device_type`` (None: ``t``'s), from the inputs as ``dtype`` sees them (float64) and the float64 results
    ``expected``."""
    unit = accumulation_unit(dtype, device_type or t.device.type)
    floors = {k: ROUNDING_FACTOR * unit * v
              for k, v in paca_cancelling_summands(t, params, grad, heads, activation).items()}
    floors["output_minus_t"] = storage_unit(dtype) * expected["output"].abs().max().item()
    floors["d_t_minus_grad"] = storage_unit(dtype) * expected["d_t"].abs().max().item()
    return floors


def residual_own_work(results: Mapping[str, torch.Tensor], x, w, b, grad) -> dict[str, torch.Tensor]:
    """``results`` (the residual's ``output``, ``dx``, ``dpsi``, ``dT``) with the low-rank term's own contributions
    added, in float64 on the results' device: ``output_minus_xw = output - (x W^T + b)`` (``(x psi) T^T``) and
    ``dx_minus_gw = dx - g W`` (``(g T) psi^T``); x, W, b and g as the run's dtype sees them (`rounded_to`)."""
    device = results["output"].device
    x, w, grad = (v.double().to(device) for v in (x, w, grad))
    dense = F.linear(x, w, None if b is None else b.double().to(device))
    return {**results, "output_minus_xw": results["output"].double() - dense,
            "dx_minus_gw": results["dx"].double() - grad @ w}


def residual_error_floors(x, w, b, psi, tokens, grad, dtype: torch.dtype,
                          device_type: str | None = None) -> dict[str, float]:
    """Rounding error floors (module docstring) of the residual's own-work keys in ``dtype`` for a run on
    ``device_type`` (None: ``x``'s), from float64 inputs as ``dtype`` sees them: the stored output's (dx's) rounding
    plus the accumulation of its full-size GEMM, both bounded by the largest magnitude of the summed terms."""
    unit = storage_unit(dtype) + ROUNDING_FACTOR * accumulation_unit(dtype, device_type or x.device.type)
    b_abs = 0.0 if b is None else b.abs()
    out_terms = F.linear(x.abs(), w.abs()) + b_abs + (x.abs() @ psi.abs()) @ tokens.abs().t()
    dx_terms = grad.abs() @ w.abs() + (grad.abs() @ tokens.abs()) @ psi.abs().t()
    return {key: unit * terms.max().item()
            for key, terms in (("output_minus_xw", out_terms), ("dx_minus_gw", dx_terms))}
