"""What the op tests and the bench share: inputs for each op (`paca_case`, `residual_case`), runs of it on any
backend with its gradients (`paca_outputs_and_grads`, `residual_outputs_and_grads`), each op compared end to end
with its float64 reference (`paca_agreement`, `residual_agreement`; raising: `check_paca`, `check_residual`; the
Triton PaCa forward's saved state: `check_paca_saved_state`), and which op tests can run here. The agreement
rule they apply (the tolerance table, the own-work keys, the rounding floors) is `agreement`'s, re-exported here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .agreement import (  # noqa: F401  (re-exported: tests, bench and gift.testing import them from here)
    BASELINE_FACTOR,
    ONE_PERCENT_DTYPES,
    ROUNDING_FACTOR,
    TOLERANCES,
    accumulation_unit,
    assert_agree,
    disagreements,
    exact_and_baseline,
    max_abs_errors,
    paca_cancelling_summands,
    paca_error_floors,
    paca_own_work,
    paca_zero_gradients,
    relative_errors,
    residual_error_floors,
    residual_own_work,
    rounded_to,
    scales_of,
    storage_unit,
)
from .dispatch import triton_available
from .paca import paca_attention
from .paca_math import PacaParams, cluster_side, l2, paca_attention_reference
from .residual import lowrank_residual_linear, lowrank_residual_linear_reference

# ------------------------------------------------------------------------------ test inputs for the ops
SHARP_QK_GAIN = 8.0  # `paca_case(sharp=True)`: query and key weights near this times the identity


def paca_case(shape, seed: int = 0, sharp: bool = False, head_offset: float = 0.0):
    """Random float64 inputs for `paca_attention` at ``shape = (L, N, M, r, heads)``:
    ``(t (L, N, r), params (list of the 10 PacaParams fields), grad (L, N, r))``.

    ``sharp``: tokens near M random directions, a sigmoid assignment (weights 8 x the directions, bias -4) that
    picks each direction's tokens out, query and key weights near ``SHARP_QK_GAIN`` x the identity and no value
    or output bias: every token attends mostly to its own cluster, so the output and gradients depend on the
    attention probabilities themselves, not on their near-uniform mean (the default case's).

    ``head_offset`` (needs 2+ heads): head 1's logits shifted by about this much for every cluster (its first query
    and key coordinate get bias ``c`` with ``scale c^2 = head_offset`` and that key row no weights), so its
    probabilities stay as they are and its log-sum-exp lies ``head_offset`` above head 0's: ``exp(logits - lse)``
    with another head's lse over- or underflows in fp32 past ~88."""
    L, N, M, r, heads = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * scale

    t = rnd(L, N, r)
    params = [rnd(M, r, scale=r ** -0.5), rnd(M, scale=0.3)]
    for _ in range(4):
        params += [rnd(r, r, scale=r ** -0.5), rnd(r, scale=0.3)]
    if sharp:
        directions = F.normalize(rnd(M, r), dim=-1)
        which = torch.randint(M, (L, N), generator=g)
        t = (directions[which] + rnd(L, N, r, scale=0.3 * r ** -0.5)) * r ** 0.5   # rows of norm ~ sqrt(r)
        params[0], params[1] = 8.0 * directions, torch.full((M,), -4.0, dtype=torch.float64)
        for i in (2, 4):                                                          # q_w, k_w
            params[i] = SHARP_QK_GAIN * torch.eye(r, dtype=torch.float64) + rnd(r, r, scale=0.1 * r ** -0.5)
        params[7], params[9] = torch.zeros(r, dtype=torch.float64), torch.zeros(r, dtype=torch.float64)
    if head_offset:
        if heads < 2:
            raise ValueError(f"paca_case: head_offset shifts head 1's logits and needs 2+ heads, got {heads}.")
        first = r // heads                                                    # head 1's first coordinate
        c = (head_offset * math.sqrt(r // heads)) ** 0.5
        params[3][first], params[5][first] = c, c                             # q_b, k_b
        params[4][first] = 0.0                                                # k_w's row: keys' coordinate is c
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


# what `paca_triton.paca_triton_forward` saves for the backward, in its order
PACA_SAVED_STATE = ("z", "p_norm", "lse_c", "kq", "cq", "vp", "lse")


def paca_saved_state_reference(t, p: PacaParams, heads: int, activation: str = "sigmoid") -> dict[str, torch.Tensor]:
    """What the Triton PaCa forward saves, computed in t's dtype with the torch ops of `paca_math`: Z (L, M, r),
    ``p_norm`` = ||C^T U|| (L, M), the folded keys ``kq`` (L, hM, r), biases ``cq`` (L, hM) and values ``vp``
    (L, hM, r), the attention's log-sum-exp over the clusters ``lse`` (L, h, N) and, for the softmax assignment
    only, its log-sum-exp over the tokens ``lse_c`` (L, M)."""
    L, N, r = t.shape
    M = p.cluster_w.shape[0]
    u, _ = l2(t)
    logits_c = F.linear(u, p.cluster_w, p.cluster_b)                          # (L, N, M)
    c = torch.softmax(logits_c, dim=-2) if activation == "softmax" else torch.sigmoid(logits_c) / N
    z, p_norm = l2(c.transpose(-1, -2) @ u)
    *_, kq, cq, vp = cluster_side(z, p, heads, 1.0 / math.sqrt(r // heads))
    lse = torch.logsumexp((u @ kq.transpose(-1, -2) + cq).unflatten(-1, (heads, M)), dim=-1).transpose(-1, -2)
    state = dict(z=z, p_norm=p_norm.squeeze(-1), kq=kq, cq=cq.squeeze(-2), vp=vp, lse=lse)
    if activation == "softmax":
        state["lse_c"] = torch.logsumexp(logits_c, dim=-2)
    return state


def check_paca_saved_state(shape, dtype: torch.dtype, activation: str = "sigmoid", seed: int = 0, device="cpu",
                           sharp: bool = False, head_offset: float = 0.0) -> dict[str, torch.Tensor]:
    """The Triton PaCa forward's saved state (`PACA_SAVED_STATE`; fp32 whatever ``dtype``) on the inputs of
    ``paca_case(shape, seed, sharp, head_offset)`` against `paca_saved_state_reference` in float64 on the inputs as
    ``dtype`` sees them, with the fp32 reference as the baseline, every tensor at its own scale. The log-sum-exps are
    also compared less ``log M`` (``lse_minus_log_m``; ``lse_c_minus_log_n``): ``log M`` is most of their size when the
    attention is near uniform, and the rest is the kernel's work. Their floor is the rounding of the logits' operands in
    ``dtype`` (``2 x storage_unit(dtype) x max(|U| |Kq|^T + |cq|)``, which bounds the error of a log-sum-exp of them)
    plus its fp32 accumulation. Raises ``AssertionError`` on disagreement; returns the state. Needs Triton (CUDA, or
    TRITON_INTERPRET=1 on CPU)."""
    from .paca_triton import paca_triton_forward  # Triton is optional: imported when this check runs

    t, params, _ = paca_case(shape, seed, sharp, head_offset)
    L, N, M, r, heads = shape
    rounded = rounded_to([t, *params], dtype)
    p = PacaParams(*rounded[1:])
    exact = paca_saved_state_reference(rounded[0], p, heads, activation)
    baseline = paca_saved_state_reference(rounded[0].float(), PacaParams(*(x.float() for x in p)), heads, activation)
    leaves = [x.to(device=device, dtype=dtype) for x in [t, *params]]
    _, saved, _ = paca_triton_forward(leaves[0], PacaParams(*leaves[1:]), heads, activation)
    if len(saved) != len(PACA_SAVED_STATE):
        raise AssertionError(f"paca_triton_forward saves {len(saved)} tensors; PACA_SAVED_STATE names "
                             f"{len(PACA_SAVED_STATE)}: {PACA_SAVED_STATE}")
    got = {k: v.cpu() for k, v in zip(PACA_SAVED_STATE, saved) if k in exact}

    def own_work(state):
        extra = {"lse_minus_log_m": state["lse"].double() - math.log(M)}
        if "lse_c" in state:
            extra["lse_c_minus_log_n"] = state["lse_c"].double() - math.log(N)
        return {**state, **extra}

    u, _ = l2(rounded[0])
    operands = u.abs() @ exact["kq"].abs().transpose(-1, -2) + exact["cq"].abs().unsqueeze(-2)       # (L, N, hM)
    unit = 2 * storage_unit(dtype) + ROUNDING_FACTOR * accumulation_unit(dtype, torch.device(device).type)
    floors = {"lse": unit * operands.max().item(), "lse_minus_log_m": unit * operands.max().item()}
    if activation == "softmax":
        logits_c = u.abs() @ p.cluster_w.abs().t() + p.cluster_b.abs()
        floors["lse_c"] = floors["lse_c_minus_log_n"] = unit * logits_c.max().item()
    assert_agree(own_work(got), own_work(exact), dtype, baseline=own_work(baseline), floors=floors)
    return got


RESIDUAL_PSI_SCALE = 0.1  # `residual_case`'s default psi magnitude; GIFT's trained psi is nearer 1e-3


def residual_case(shape, bias: bool = True, seed: int = 1, psi_scale: float = RESIDUAL_PSI_SCALE):
    """Random float64 inputs for `lowrank_residual_linear` at ``shape = (rows, d_in, d_out, r)``:
    ``(x (2, rows, d_in), W (d_out, d_in), b (d_out,) or None, psi (d_in, r), T (d_out, r), grad (2, rows, d_out))``,
    psi's entries ``psi_scale`` x standard normal."""
    rows, d_in, d_out, r = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    return (rnd(2, rows, d_in), rnd(d_out, d_in) * d_in ** -0.5, rnd(d_out) if bias else None,
            rnd(d_in, r) * psi_scale, rnd(d_out, r), rnd(2, rows, d_out))


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
@dataclass
class Agreement:
    """One op's run against its float64 reference: ``got`` (the run's results, without the own-work keys),
    ``relative`` (per key, own-work keys included: max abs error / the key's scale), ``bad`` (one line per key over
    its tolerance: `disagreements`; empty when all agree) and ``rerun`` (runs the op again, as ``got`` was made)."""

    got: dict[str, torch.Tensor]
    relative: dict[str, float]
    bad: list[str]
    rerun: Callable[[], dict[str, torch.Tensor]]

    def raise_if_bad(self, dtype: torch.dtype) -> None:
        if self.bad:
            raise AssertionError(f"{len(self.bad)} of {len(self.relative)} tensors disagree in {dtype}:\n  "
                                 + "\n  ".join(self.bad))


def paca_agreement(shape, dtype: torch.dtype, backend: str, activation: str = "sigmoid", seed: int = 0,
                   device="cpu", sharp: bool = False, head_offset: float = 0.0) -> Agreement:
    """`paca_attention` on ``paca_case(shape, seed, sharp, head_offset)`` (``shape = (L, N, M, r, heads)``) in
    ``dtype`` on ``backend``/``device`` against the float64 reference (`exact_and_baseline`: rounded inputs, fp32
    baseline), every tensor and PaCa's own work (`paca_own_work`) at its own scale, with the rounding floors of
    `paca_error_floors`."""
    t, params, grad = paca_case(shape, seed, sharp, head_offset)
    heads = shape[4]

    def run(inputs, run_dtype, run_backend="reference", run_device="cpu"):
        return paca_outputs_and_grads(inputs[0], inputs[1:-1], inputs[-1], heads, run_dtype, run_backend, activation,
                                      device=run_device)

    inputs = [t, *params, grad]
    exact, baseline = exact_and_baseline(run, inputs, dtype)
    got = run(inputs, dtype, backend, device)
    rounded = rounded_to(inputs, dtype)
    own = [paca_own_work(r, rounded[0], rounded[-1]) for r in (got, exact, baseline)]
    zero = paca_zero_gradients(shape[2], shape[1], activation)
    floors = paca_error_floors(rounded[0], rounded[1:-1], rounded[-1], heads, dtype, exact, activation,
                               device_type=torch.device(device).type)
    return Agreement(got, {k: v[1] for k, v in relative_errors(own[0], own[1], zero).items()},
                     disagreements(own[0], own[1], dtype, baseline=own[2], zero_by_construction=zero, floors=floors),
                     lambda: run(inputs, dtype, backend, device))


def column_major(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` (..., cols), stored column by column as the matrix of its leading dims flattened:
    ``x.reshape(-1, cols)`` is a view with ``stride(0) == 1``."""
    return x.reshape(-1, x.shape[-1]).t().contiguous().t().reshape(x.shape)


def residual_agreement(shape, dtype: torch.dtype, backend: str, bias: bool = True, device="cpu",
                       psi_scale: float = RESIDUAL_PSI_SCALE, column_major_x: bool = False,
                       column_major_weight: bool = False) -> Agreement:
    """`lowrank_residual_linear` at ``shape = (rows, d_in, d_out, r)``, compared like `paca_agreement` (own work:
    `residual_own_work`, floors: `residual_error_floors`); x and W stored column-major if asked (`column_major`)."""
    inputs = list(residual_case(shape, bias, psi_scale=psi_scale))
    for i, asked in ((0, column_major_x), (1, column_major_weight)):
        inputs[i] = column_major(inputs[i]) if asked else inputs[i]

    def run(args, run_dtype, run_backend="reference", run_device="cpu"):
        return residual_outputs_and_grads(*args, run_dtype, run_backend, device=run_device)

    exact, baseline = exact_and_baseline(run, inputs, dtype)
    got = run(inputs, dtype, backend, device)
    x, w, b, psi, tokens, grad = rounded_to(inputs, dtype)
    own = [residual_own_work(r, x, w, b, grad) for r in (got, exact, baseline)]
    return Agreement(got, {k: v[1] for k, v in relative_errors(own[0], own[1]).items()},
                     disagreements(own[0], own[1], dtype, baseline=own[2],
                                   floors=residual_error_floors(x, w, b, psi, tokens, grad, dtype,
                                                                torch.device(device).type)),
                     lambda: run(inputs, dtype, backend, device))


def check_paca(shape, dtype: torch.dtype, backend: str, activation: str = "sigmoid", seed: int = 0,
               device="cpu", sharp: bool = False, head_offset: float = 0.0
               ) -> tuple[dict[str, torch.Tensor], Callable[[], dict[str, torch.Tensor]]]:
    """`paca_agreement`, raising ``AssertionError`` on disagreement; returns the results and a function that reruns
    the op (both without the own-work keys)."""
    agreement = paca_agreement(shape, dtype, backend, activation, seed, device, sharp, head_offset)
    agreement.raise_if_bad(dtype)
    return agreement.got, agreement.rerun


def check_residual(shape, dtype: torch.dtype, backend: str, bias: bool = True, device="cpu",
                   psi_scale: float = RESIDUAL_PSI_SCALE, column_major_x: bool = False,
                   column_major_weight: bool = False) -> tuple[dict[str, torch.Tensor],
                                                               Callable[[], dict[str, torch.Tensor]]]:
    """`residual_agreement`, raising like `check_paca`."""
    agreement = residual_agreement(shape, dtype, backend, bias, device, psi_scale, column_major_x,
                                   column_major_weight)
    agreement.raise_if_bad(dtype)
    return agreement.got, agreement.rerun


# ------------------------------------------------------------------------------ what the op tests can run here
def available_devices() -> list[str]:
    """The devices op tests run on: CPU always (Triton there under the interpreter), CUDA where present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


BF16_INTERPRETER_FIX = "gift_faithful_bf16"  # set on the interpreter methods tests/kernels/bf16_interpreter.py patches


def interpreter_runs_bf16() -> bool:
    """Whether Triton's interpreter currently computes bf16 as a GPU does. Triton 3.x's does not by itself (its
    bf16 ``tl.dot`` multiplies raw bits as integers, and fp32 -> bf16 casts truncate); tests/kernels'
    ``runnable`` fixture fixes both for one test (tests/kernels/bf16_interpreter.py)."""
    try:
        from triton.runtime.interpreter import InterpreterBuilder
    except ImportError:
        return False
    return all(getattr(getattr(InterpreterBuilder, name), BF16_INTERPRETER_FIX, False)
               for name in ("create_dot", "cast_impl"))


def skip_unless_runnable(device: str, backend: str, dtype: torch.dtype) -> None:
    """``pytest.skip`` an op test on ``backend`` in ``dtype`` that cannot run on ``device`` here. bf16 Triton on
    CPU runs only while the interpreter's bf16 is fixed (`interpreter_runs_bf16`): unfixed, its bf16 ``tl.dot``
    returns garbage without an error."""
    import pytest  # a test dependency: this module is also imported by the bench and gift.testing

    if backend == "triton" and not triton_available(device):
        pytest.skip(f"Triton cannot run on {device} here (CPU needs TRITON_INTERPRET=1)")
    if backend == "triton" and dtype == torch.bfloat16 and device == "cpu" and not interpreter_runs_bf16():
        pytest.skip("bf16 Triton on CPU needs the interpreter's bf16 fixed (the `runnable` fixture of "
                    "tests/kernels/bf16_interpreter.py): "
                    "unfixed, its bf16 tl.dot returns garbage")
