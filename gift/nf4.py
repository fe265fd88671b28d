"""4-bit frozen weights: the backbone's frozen linear layers stored as NF4 through torchao (the QLoRA
scheme torchtune uses: ``to_nf4`` weights, dequantized inside the linear in forward and backward,
gradient to the input only). Needs ``pip install 'gift[nf4]'``.

GIFT's own targets stay unquantized (in the backbone's dtype): the generator reads W_l every step
and each target's backward needs W_l again, so an NF4 target would be dequantized into a temporary
that its backward keeps (2 bytes a weight in bf16 per step) to save 1.44 bytes a weight of storage;
`gift plan --backbone-dtype nf4` shows both (`quantize_frozen_linears(..., targets=True)`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .targets import replace_module
from .wrapper import GIFTModelBase

#: to_nf4 quantizes blocks of 64 weights and groups of 256 block scalers: a weight needs a multiple of this.
NF4_GRANULE = 64 * 256


def _torchao_nf4():
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
    except ImportError:
        raise ImportError("4-bit NF4 weights need torchao, which is not installed: pip install 'gift[nf4]'") from None
    return to_nf4, linear_nf4


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight (``out_features x in_features``) is an NF4Tensor (0.5 bytes a
    weight plus 1/64 byte-ish of scalers), quantized from bf16. ``forward(x)``: x (..., in_features) ->
    (..., out_features) in x's dtype, the weight dequantized to that dtype in forward and in backward."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        to_nf4, _ = _torchao_nf4()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_nf4(linear.weight.detach().to(torch.bfloat16)), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, linear_nf4 = _torchao_nf4()
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = linear_nf4(x, self.weight)
            return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"


def quantizable(linear: nn.Module) -> bool:
    """A frozen ``nn.Linear`` whose weight ``to_nf4`` can take."""
    return (type(linear) is nn.Linear and not linear.weight.requires_grad
            and linear.weight.numel() % NF4_GRANULE == 0)


def quantize_frozen_linears(model: GIFTModelBase, targets: bool = False) -> list[str]:
    """Replace the backbone's frozen ``nn.Linear`` layers by `NF4Linear` (in place), never GIFT's targets
    nor the trained head. With ``targets=True`` the targets' weights become NF4 too, in place: the
    generator then dequantizes each W_l once per step and each target layer in its forward (kept for
    its backward). Layers whose size is not a multiple of `NF4_GRANULE` keep their dtype. Returns the
    names of the quantized layers. Raises ImportError naming ``gift[nf4]`` without torchao."""
    to_nf4, _ = _torchao_nf4()
    targets_of_gift = {id(m) for group in model.target_groups for m in group.modules}
    chosen = []
    for name, module in model.backbone.named_modules():
        if id(module) in targets_of_gift:
            if targets and module.weight.numel() % NF4_GRANULE == 0:
                module.weight = nn.Parameter(to_nf4(module.weight.detach().to(torch.bfloat16)), requires_grad=False)
                chosen.append(name)
        elif quantizable(module):
            chosen.append(name)
    for name in chosen:
        module = model.backbone.get_submodule(name)
        if id(module) not in targets_of_gift:
            replace_module(model.backbone, name, NF4Linear(module))
    residuals = getattr(model, "residuals", None)  # a FastGIFT's owner of generated residuals: new weights
    if residuals is not None:
        residuals.reset()
    return chosen
