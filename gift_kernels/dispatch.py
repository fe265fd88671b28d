"""The one place that decides whether an op runs its Triton kernels or its torch path.

``GIFT_KERNELS=auto|torch|triton`` (or an op's ``backend=`` argument):
  * ``auto``: Triton for CUDA tensors (float32/float16/bfloat16), the torch path otherwise
    (CPU tensors, float64).
  * ``torch``: always the torch path.
  * ``triton``: the Triton kernels, on CUDA or on CPU tensors under ``TRITON_INTERPRET=1``;
    where they cannot run (no CUDA and no interpreter, float64) a ``RuntimeError`` says why.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def requested_backend(backend: str | None = None) -> str:
    value = (backend or os.environ.get("GIFT_KERNELS") or "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"GIFT_KERNELS / backend={value!r} is unknown; choose one of {BACKENDS}.")
    return value


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_IMPORTABLE: bool | None = None  # a plain cache: torch.compile traces through this module


def _triton_importable() -> bool:
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_IMPORTABLE = True
        except ImportError:
            _TRITON_IMPORTABLE = False
    return _TRITON_IMPORTABLE


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether Triton kernels can run on ``device`` (default: CUDA if present, else CPU)."""
    return _why_not_triton(_default_device(device), torch.float32) is None


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _why_not_triton(device: torch.device, dtype: torch.dtype) -> str | None:
    if not _triton_importable():
        return "the triton package is not installed"
    if dtype not in TRITON_DTYPES:
        return f"the Triton kernels take {[str(d) for d in TRITON_DTYPES]}, not {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    return f"tensors are on {device.type} and there is no CUDA; CPU tensors need TRITON_INTERPRET=1"


def resolve_backend(device: torch.device, dtype: torch.dtype, backend: str | None = None, op: str = "op",
                    unsupported: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for an op on tensors of this device and dtype.

    ``unsupported`` names a feature of this call that the Triton kernels lack (auto then takes torch).
    """
    requested = requested_backend(backend)
    if requested == "torch":
        return "torch"
    why = unsupported or _why_not_triton(device, dtype)
    if requested == "triton":
        if why is not None:
            raise RuntimeError(f"{op}: GIFT_KERNELS=triton was asked for, but {why}. "
                               f"Use GIFT_KERNELS=auto or torch.")
        return "triton"
    return "triton" if why is None and device.type == "cuda" else "torch"


def active_backend(device: torch.device | str | None = None, backend: str | None = None) -> str:
    """What ops on float32 tensors of ``device`` (default: CUDA if present, else CPU) will run."""
    return resolve_backend(_default_device(device), torch.float32, backend)
