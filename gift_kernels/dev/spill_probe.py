"""Two small kernels the compile check proves its resource gate on before it trusts it: one that must spill
and one that must not. Imported only by `compile_check` (it needs real Triton, not the interpreter)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _spill_probe(X, Y, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``Y = X / sum(X * X)`` for one (ROWS, COLS) fp32 tile: every element stays live across the reduction, so at
    one warp a (128, 64) tile holds 256 values per thread, more than the 255 registers ptxas may use (it spills);
    a (16, 16) tile holds 8."""
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    x = tl.load(X + offs)
    tl.store(Y + offs, x / tl.sum(tl.sum(x * x, axis=1), axis=0))


PROBE_KERNELS = {"_spill_probe": _spill_probe}
# (name, constexprs, num_warps, must spill)
PROBES = (("_spill_probe", (("COLS", 64), ("ROWS", 128)), 1, True),
          ("_spill_probe", (("COLS", 16), ("ROWS", 16)), 1, False))
