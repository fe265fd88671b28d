"""`GIFTReference`: the plain, readable GIFT of GIFT_SPEC.md, one layer at a time.

Every fast path in this project is measured against this module. It keeps the backbone's
modules untouched and adds each target's residual with a forward hook:

    y = x W^T + b  +  x dW^T,      dW = psi(Hypernet(W phi^T))      (d_out x d_in)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GIFTConfig
from .wrapper import GIFTModelBase


class _ResidualHook:
    """Forward hook that adds ``x dW_l^T`` to a target layer's output (a class, so deepcopy follows it)."""

    gift_adapted = True  # what `GIFTModelBase` looks for to refuse wrapping an adapted backbone again

    def __init__(self, model: "GIFTReference", key: str, layer: int):
        self.model, self.key, self.layer = model, key, layer

    def __call__(self, module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
        delta = self.model.delta_weight(self.key, self.layer)
        return output + F.linear(args[0], delta)


class GIFTReference(GIFTModelBase):
    """GIFT on a frozen ``backbone`` (any ``nn.Module``; timm ViTs by default), per the spec.

    ``forward(*args, **kwargs)`` returns the backbone's output with every target linear layer adapted.
    Trainable: the generators (``gift_parameters()``) and the classifier head.
    """

    def __init__(self, backbone: nn.Module, config: GIFTConfig | None = None):
        super().__init__(backbone, config)
        self._hook_handles = [
            module.register_forward_hook(_ResidualHook(self, group.key, layer))
            for group in self.target_groups
            for layer, module in enumerate(group.modules)
        ]

    def generator_tokens(self, key: str, layer: int) -> torch.Tensor:
        """T_l = Hypernet(W_l phi^T) of one layer: ``(d_out, r)`` in the generator's dtype."""
        weight = self.target_group(key).modules[layer].weight
        with torch.autocast(device_type=weight.device.type, enabled=False):
            tokens = self.in_projections[key](weight.to(self.generator_dtype(key)))
            return self.hypernets[key](tokens)

    def delta_weight(self, key: str, layer: int) -> torch.Tensor:
        """dW_l = T_l psi^T: ``(d_out, d_in)`` in the target weight's dtype."""
        weight = self.target_group(key).modules[layer].weight
        with torch.autocast(device_type=weight.device.type, enabled=False):
            delta = self.out_projections[key](self.generator_tokens(key, layer))
        return delta.to(weight.dtype)

    def forward(self, *args, **kwargs):
        """The backbone's own output for ``self.backbone(*args, **kwargs)``, every target adapted."""
        return self.backbone(*args, **kwargs)

    def remove_hooks(self) -> nn.Module:
        """Detach GIFT from the backbone (its residuals stop being added) and return the backbone."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        return self.backbone
