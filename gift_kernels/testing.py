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
