"""Record the Triton launches the ops make: which kernel, grid, arguments and constexprs.

Used by the compile check (launchers run on ``meta`` tensors, nothing executes) and by `count_launches`
(under ``TRITON_INTERPRET=1``, every launch executes as usual).

    python -m gift_kernels.dev.kernel_launches README.md      # rewrite the README's launch-count table
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from .. import testing
from ..files import write_marked_block
from ..paca import paca_attention
from ..paca_math import PacaParams
from ..residual import lowrank_residual_linear


@dataclass
class TritonLaunch:
    """One ``kernel[grid](*args, **kwargs)`` call; ``kwargs`` hold the constexprs (heuristics applied) and options."""

    name: str
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)
    arg_names: list[str] = field(default_factory=list)
    fn: Any = None                                  # the innermost JITFunction / InterpretedFunction


def innermost_kernel(kernel):
    """The object whose ``run`` launches: @triton.heuristics wraps the @triton.jit function in ``.fn``."""
    while not hasattr(kernel, "arg_names") or type(kernel).__name__ == "Heuristics":
        kernel = kernel.fn
    return kernel


def triton_modules() -> tuple:
    """The gift_kernels modules that define Triton kernels, ``(paca_triton, residual_triton)``. Imported on first
    use: the dev tools import without Triton, and `main` sets TRITON_INTERPRET=1 before the kernels exist."""
    from .. import paca_triton, residual_triton

    return paca_triton, residual_triton


def triton_kernels() -> dict[str, Any]:
    """Every Triton kernel the gift_kernels launchers launch, by name (``KERNELS`` of each Triton module)."""
    return {innermost_kernel(k).fn.__name__: k for module in triton_modules() for k in module.KERNELS}


@contextlib.contextmanager
def record_triton_launches(execute: bool = True):
    """Within the block, every launch of a gift_kernels Triton kernel is appended to the yielded list
    (and runs only if ``execute``)."""
    launches: list[TritonLaunch] = []
    patched = []
    for name, kernel in triton_kernels().items():
        inner = innermost_kernel(kernel)
        original = inner.run

        def run(*args, grid, warmup, _name=name, _inner=inner, _original=original, **kwargs):
            if not warmup:
                launches.append(TritonLaunch(_name, tuple(grid) if not callable(grid) else grid, args, dict(kwargs),
                                             list(_inner.arg_names), _inner))
            if not (execute or warmup):
                return None
            with _disable_current_modes():   # the interpreter's own tensor copies are not the op's aten ops
                return _original(*args, grid=grid, warmup=warmup, **kwargs)

        inner.run = run
        patched.append(inner)
    try:
        yield launches
    finally:
        for inner in patched:
            del inner.run                             # back to the class's method


# aten ops that only allocate or re-describe memory: not counted as compute
_BOOKKEEPING = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
                "lift_fresh", "_unsafe_view"}


class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _BOOKKEEPING:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@dataclass
class LaunchCount:
    """Triton kernels launched and aten compute ops (views and allocations left out) of one call."""

    triton: list[str]
    aten: list[str]

    def summary(self) -> str:
        return f"{len(self.triton)} Triton + {len(self.aten)} aten"


def count_launches(fn: Callable[[], Any]) -> tuple[Any, LaunchCount]:
    """Run ``fn()`` counting the gift_kernels Triton launches and the aten compute ops it makes."""
    with record_triton_launches() as launches, _AtenOps() as mode:
        result = fn()
    return result, LaunchCount([launch.name for launch in launches], mode.ops)


def op_launch_counts(op: str, dtype: torch.dtype, shape: tuple, device="cpu") -> dict[str, LaunchCount]:
    """``{"forward": ..., "backward": ...}`` for ``op`` ("paca_attention" at ``(L, N, M, r, heads)`` or
    "lowrank_residual_linear" at ``(rows, d_in, d_out, r)``) on the Triton backend in ``dtype``."""
    if op == "paca_attention":
        t, params, grad = testing.paca_case(shape)
        leaves = [x.to(device=device, dtype=dtype).requires_grad_(True) for x in [t, *params]]
        out, forward = count_launches(lambda: paca_attention(leaves[0], PacaParams(*leaves[1:]), shape[4],
                                                             backend="triton"))
    elif op == "lowrank_residual_linear":
        x, w, b, psi, tokens, grad = testing.residual_case(shape)
        x, w, b, psi, tokens = (v.to(device=device, dtype=dtype) for v in (x, w, b, psi, tokens))
        leaves = [x.requires_grad_(True), psi.requires_grad_(True), tokens.requires_grad_(True)]
        out, forward = count_launches(lambda: lowrank_residual_linear(x, w, b, psi, tokens, backend="triton"))
    else:
        raise ValueError(f"op_launch_counts: unknown op {op!r}; use 'paca_attention' or 'lowrank_residual_linear'.")
    grad = grad.to(device=device, dtype=dtype)
    _, backward = count_launches(lambda: torch.autograd.grad(out, leaves, grad))
    return {"forward": forward, "backward": backward}


COUNT_SHAPES = {"paca_attention": (2, 20, 5, 8, 2), "lowrank_residual_linear": (7, 24, 40, 5)}
README_START, README_END = "<!-- launch-counts:start -->", "<!-- launch-counts:end -->"


def launch_count_markdown() -> str:
    """The README's table of Triton launches and aten compute ops per op, direction and dtype (measured)."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    lines = ["| op (Triton backend) | direction | " + " | ".join(str(d).replace("torch.", "") for d in dtypes) + " |",
             "|---|---|" + "---|" * len(dtypes)]
    counts = {(op, d): op_launch_counts(op, d, shape) for op, shape in COUNT_SHAPES.items() for d in dtypes}
    for op in COUNT_SHAPES:
        for direction in ("forward", "backward"):
            cells = [counts[op, d][direction].summary() for d in dtypes]
            lines.append(f"| `{op}` | {direction} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Rewrite the launch-count table of the README at ``argv[0]`` (default README.md) and print it."""
    argv = sys.argv[1:] if argv is None else argv
    os.environ["TRITON_INTERPRET"] = "1"
    table = launch_count_markdown()
    write_marked_block(argv[0] if argv else "README.md", README_START, README_END, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
