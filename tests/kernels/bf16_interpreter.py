"""bf16 as a GPU computes it, for Triton's interpreter (``TRITON_INTERPRET=1``); the ``runnable`` fixture
(tests/kernels/conftest.py) installs it for a bf16 Triton test on CPU.

Triton 3.x's interpreter keeps bf16 values as their raw bits in numpy ``uint16`` arrays, and for bf16:
  * ``tl.dot`` multiplies those bits as integers (``np.matmul`` on ``uint16``): garbage, and no error;
  * fp32 -> bf16 casts (``x.to(tl.bfloat16)``, a store to a bf16 pointer) truncate toward zero, where a GPU (and
    Triton's own semantics, whose default downcast rounding is RTNE) rounds to nearest even.
`install` replaces both: bf16 dot operands are widened to fp32 exactly (their bits shifted into the high half of
an fp32) before the interpreter's fp32-accumulated matmul, which is what a tensor core computes up to the order of
accumulation, and fp32 -> bf16 casts round to nearest even (torch's conversion). bf16 -> fp32 casts were exact
already. Nothing else in the kernels computes on bf16 values: they load into fp32. `check` runs a small kernel
with a bf16 dot and a bf16 store against torch, so a Triton whose interpreter moved on fails it loudly.
"""
from __future__ import annotations

import numpy as np
import torch

from gift_kernels.testing import BF16_INTERPRETER_FIX as FIX_MARK  # set on the patched methods


def _bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _fp32_to_bits(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(x.shape)


def install(monkeypatch) -> None:
    """Patch the interpreter (undone by ``monkeypatch`` at the end of the test)."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    cast_impl, create_dot = builder.cast_impl, builder.create_dot

    def rounded_cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_fp32_to_bits(src.data), dst_type.scalar)
        return cast_impl(self, src, dst_type)

    def widened_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(x):
            return interpreter.TensorHandle(_bits_to_fp32(x.data), tl.float32) if x.dtype.scalar == tl.bfloat16 else x

        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    for fn in (rounded_cast, widened_dot):
        setattr(fn, FIX_MARK, True)
    monkeypatch.setattr(builder, "cast_impl", rounded_cast)
    monkeypatch.setattr(builder, "create_dot", widened_dot)


def check() -> str | None:
    """None if a bf16 ``tl.dot`` and a bf16 store under the interpreter give what torch gives; else what differs."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot_and_store(A, B, OUT, WIDE, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        a = tl.load(A + offs[:, None] * BLOCK + offs[None, :])
        b = tl.load(B + offs[:, None] * BLOCK + offs[None, :])
        c = tl.dot(a, b)
        tl.store(WIDE + offs[:, None] * BLOCK + offs[None, :], c)
        tl.store(OUT + offs[:, None] * BLOCK + offs[None, :], c)

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    out, wide = torch.empty(16, 16, dtype=torch.bfloat16), torch.empty(16, 16)
    dot_and_store[(1,)](a, b, out, wide, BLOCK=16)
    exact = a.double() @ b.double()
    bound = 16 * 2.0 ** -24 * (a.double().abs() @ b.double().abs())   # fp32 accumulation of 16 exact products
    if not bool(((wide.double() - exact).abs() <= bound).all()):
        return f"the bf16 tl.dot is off by up to {(wide.double() - exact).abs().max().item():.3g}"
    if not torch.equal(out, wide.to(torch.bfloat16)):
        return "fp32 -> bf16 stores do not round to nearest even"
    return None
