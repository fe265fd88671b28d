"""Divergence: a training step whose loss or gradients are not finite, or weights that are not. As in
timm and torch.amp, a step with non-finite gradients under float16's loss scaler is skipped (the scaler
does it and halves its scale); anywhere else it stops the run (`Diverged`) before the step is taken,
so nothing non-finite is ever written and the last good checkpoint stays."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .errors import UsageError

#: below this loss scale, float16's scaler has halved it 17 times from torch's 2**16: the overflow is
#: not the scaling's any more, and the run stops instead of skipping every step
MIN_LOSS_SCALE = 0.5


class Diverged(UsageError):
    """Training stopped at a non-finite loss, gradient or weight: one line naming the step. ``short``:
    what diverged and where, without what the message adds about the run folder."""

    def __init__(self, message: str, short: str | None = None):
        super().__init__(message)
        self.short = short or message


def gradients_finite(parameters) -> bool:
    """Whether every gradient of ``parameters`` is finite (one device sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in grads])
    return bool(torch.isfinite(norms).all())


def step_is_finite(loss: torch.Tensor, parameters, scaler: torch.amp.GradScaler, where: str) -> bool:
    """True when the step of ``loss`` may be taken (its loss and gradients are finite); False when the
    enabled ``scaler`` will skip it. Raises `Diverged` (naming ``where``) without a scaler, or when the
    scaler's scale has fallen below `MIN_LOSS_SCALE`."""
    loss_value = float(loss.detach())
    if math.isfinite(loss_value) and gradients_finite(parameters):
        return True
    what = f"loss {loss_value:g}" if not math.isfinite(loss_value) else "non-finite gradients"
    if not scaler.is_enabled():
        raise Diverged(f"training diverged at {where} ({what})")
    if scaler.get_scale() < MIN_LOSS_SCALE:
        raise Diverged(f"training diverged at {where} ({what} at loss scale {scaler.get_scale():g}: float16's "
                       f"scaler skipped every step down to it)")
    return False


def non_finite_tensors(module: nn.Module) -> list[str]:
    """Names of the trainable parameters of ``module`` that hold a NaN or an infinity."""
    return [n for n, p in module.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
