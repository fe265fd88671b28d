"""Fixtures of the kernel tests."""
import pytest
import torch

from gift_kernels.testing import skip_unless_runnable
from tests.kernels.bf16_interpreter import check, install


@pytest.fixture
def runnable(monkeypatch):
    """``runnable(device, backend, dtype)``: `skip_unless_runnable`, except that a bf16 Triton test on CPU first gets
    the interpreter's bf16 fixed for its duration (`install`; skipped if `check` finds the fix does not hold)."""
    def ensure(device: str, backend: str, dtype: torch.dtype) -> None:
        if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
            skip_unless_runnable(device, backend, torch.float32)      # Triton itself runs here
            install(monkeypatch)
            why = check()
            if why is not None:
                pytest.skip(f"bf16 under this Triton's interpreter cannot be fixed here: {why}")
        skip_unless_runnable(device, backend, dtype)

    return ensure
