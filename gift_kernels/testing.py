"""One tolerance table keyed by dtype, and the agreement measure that tests and bench share.

Agreement of a tensor ``a`` with an fp32/fp64 reference ``e`` is the max abs error divided by a scale:
the larger of ``max|e|`` and ``SCALE_FLOOR`` times the largest ``max|e|`` of the set being compared.
The floor keeps gradients that are zero in exact arithmetic (e.g. PaCa's key bias, which a softmax
over clusters cannot see) from turning rounding noise into an infinite relative error.

For a low-precision result compared with a float64 reference, pass ``baseline``: the same computation
by plain torch in that low precision. Each tensor may then also be off by twice the baseline's own
error (the FlashAttention rule): gradients that cancel to zero in exact arithmetic, such as a bias
feeding a LayerNorm, carry rounding noise set by their summands, not by their (zero) size.
"""
from __future__ import annotations

from typing import Mapping

import torch

# max relative error (as defined above) allowed for a computation in this dtype vs the reference
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 4e-2,
}
SCALE_FLOOR = 1e-2


def relative_errors(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per key: (max abs error, max relative error as defined in the module docstring)."""
    if set(actual) != set(expected):
        raise KeyError(f"compared sets differ: only in actual {sorted(set(actual) - set(expected))}, "
                       f"only in expected {sorted(set(expected) - set(actual))}")
    scales = {k: expected[k].detach().double().abs().max().item() if expected[k].numel() else 0.0 for k in expected}
    floor = SCALE_FLOOR * max(scales.values(), default=0.0)
    out = {}
    for k in expected:
        a, e = actual[k].detach().double(), expected[k].detach().double()
        if a.shape != e.shape:
            raise ValueError(f"{k}: shape {tuple(a.shape)} vs expected {tuple(e.shape)}")
        err = (a - e).abs().max().item() if e.numel() else 0.0
        out[k] = (err, err / max(scales[k], floor, torch.finfo(torch.float64).tiny))
    return out


def assert_agree(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 baseline: Mapping[str, torch.Tensor] | None = None) -> None:
    """Raise ``AssertionError`` listing every key whose relative error exceeds ``TOLERANCES[dtype]``
    (plus twice the ``baseline``'s relative error, when one is given)."""
    tol = TOLERANCES[dtype]
    errors = relative_errors(actual, expected)
    slack = {k: 2.0 * rel for k, (_, rel) in relative_errors(baseline, expected).items()} if baseline else {}
    bad = [f"{k}: rel {rel:.3e} (abs {err:.3e}) > {tol:.1e} + {slack.get(k, 0.0):.1e}"
           for k, (err, rel) in errors.items() if not rel <= tol + slack.get(k, 0.0)]
    if bad:
        raise AssertionError(f"{len(bad)} of {len(errors)} tensors disagree in {dtype}:\n  " + "\n  ".join(bad))


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
    from .paca import PacaParams, paca_attention, paca_attention_reference

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
    from .residual import lowrank_residual_linear, lowrank_residual_linear_reference

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
