"""`FastGIFT`: the drop-in for `GIFTReference` with the same parameters, checkpoints and numbers.

Where the reference runs the generator once per layer and multiplies by a dense d_out x d_in
residual, FastGIFT
  * runs each generator once per forward for all L layers of its target key (layers are the
    batch dimension of the hyper-Transformer), reading the frozen weights in place;
  * applies each layer's residual in low-rank form, ``y = x W^T + b + (x psi) T_l^T``, through
    one autograd Function with a hand-written backward (``gift_kernels.lowrank_residual_linear``).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gift_kernels import PacaParams, l2_mlp_residual, lowrank_residual_linear, paca_attention

from .base import GIFTModelBase, TargetGroup
from .config import GIFTConfig
from .generator import Hypernet, PaCa

MEMORY_MODES = ("none", "mlp", "block")


class GIFTLinear(nn.Linear):
    """A target ``nn.Linear`` that adds GIFT's low-rank residual. It holds the *same* weight and bias
    Parameters as the layer it replaces, so parameter names and storage are unchanged.

    ``gift_tokens`` (d_out x r) and ``gift_psi`` (d_in x r) are set by `FastGIFT` before each forward.
    """

    gift_tokens: Optional[torch.Tensor]
    gift_psi: Optional[torch.Tensor]

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "GIFTLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.set_residual(None, None)
        new.merged = False
        new.kernels = None
        return new

    def set_residual(self, psi: torch.Tensor | None, tokens: torch.Tensor | None) -> None:
        """Point this layer at this forward's psi and T_l (plain attributes: never registered as parameters)."""
        self.__dict__.update(gift_psi=psi, gift_tokens=tokens)

    def unwrap(self) -> nn.Linear:
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.gift_tokens is None:
            return F.linear(x, self.weight, self.bias)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = self.weight.dtype
        weight, bias = self.weight.to(dtype), (None if self.bias is None else self.bias.to(dtype))
        with torch.autocast(device_type=x.device.type, enabled=False):
            return lowrank_residual_linear(x.to(dtype), weight, bias, self.gift_psi, self.gift_tokens, backend=self.kernels)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", merged" if self.merged else "")


def paca_params(attn: PaCa) -> PacaParams:
    """The parameters of a `PaCa` module in the order the fused op takes them."""
    return PacaParams(attn.cluster.cluster.weight, attn.cluster.cluster.bias, attn.q.weight, attn.q.bias,
                      attn.k.weight, attn.k.bias, attn.v.weight, attn.v.bias, attn.proj.weight, attn.proj.bias)


def run_hypernet(hypernet: Hypernet, tokens: torch.Tensor, kernels: str | None = None) -> torch.Tensor:
    """`Hypernet.forward` for tokens ``(L, N, r)``, each half of each block as one op with a
    hand-written backward (few saved tensors)."""
    for block in hypernet.blocks:
        attn = block.attn
        tokens = paca_attention(tokens, paca_params(attn), attn.num_heads, attn.cluster_activation, backend=kernels)
        if block.mlp is not None:
            mlp = block.mlp
            tokens = l2_mlp_residual(tokens, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    return tokens


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _identity(x):
    return x


def _is_prenorm_block(block: nn.Module) -> bool:
    """timm's pre-norm ViT blocks compute ``x + ls2(mlp(norm2(x)))``: norm2 feeds mlp and nothing else."""
    from timm.models.vision_transformer import Block

    try:
        from timm.models.eva import EvaBlock
    except ImportError:
        EvaBlock = Block
    return type(block) in (Block, EvaBlock) and isinstance(getattr(block, "norm2", None), nn.Module)


def _checkpointed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


class FastGIFT(GIFTModelBase):
    """GIFT on a frozen ``backbone``: same constructor, attributes and checkpoints as `GIFTReference`.

    Args:
        backbone: a timm ViT (or any ``nn.Module`` with the targets).
        config: the ``GIFTConfig``.
        memory: ``"none"``; ``"mlp"`` recomputes each block's MLP in backward; ``"block"`` checkpoints
            whole blocks (``backbone.blocks``).
        backbone_dtype: store the frozen backbone weights in this dtype (e.g. ``torch.bfloat16``);
            forward then runs the backbone under autocast in that dtype. The head and the generator
            keep their own dtypes.
        kernels: ``"auto" | "torch" | "triton"`` for the fused ops (default: ``GIFT_KERNELS``, else
            auto: Triton on CUDA); see `gift_kernels.dispatch`.
    """

    def __init__(self, backbone: nn.Module, config: GIFTConfig | None = None, memory: str = "none",
                 backbone_dtype: torch.dtype | None = None, kernels: str | None = None):
        super().__init__(backbone, config)
        self.kernels = kernels
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory={memory!r} is unknown; choose one of {MEMORY_MODES}.")
        groups = []
        for group in self.target_groups:
            wrapped = tuple(GIFTLinear.wrap(m) for m in group.modules)
            for module in wrapped:
                module.kernels = kernels
            for name, module in zip(group.names, wrapped):
                _replace_module(self.backbone, name, module)
            groups.append(TargetGroup(group.key, group.names, wrapped))
        self.target_groups = groups
        self.backbone_dtype = backbone_dtype
        if backbone_dtype is not None:
            head = set(map(id, self.head_parameters()))
            for p in self.backbone.parameters():
                if id(p) not in head and p.is_floating_point():
                    p.data = p.data.to(backbone_dtype)
        self.memory = "none"
        self._checkpointed_modules: list[nn.Module] = []
        self.set_memory(memory)
        self._merged_tokens: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ memory modes
    def _blocks(self) -> list[nn.Module]:
        blocks = getattr(self.backbone, "blocks", None)
        if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
            raise ValueError(f"memory modes 'mlp' and 'block' need backbone.blocks (a timm ViT); "
                             f"{type(self.backbone).__name__} has none. Use memory='none'.")
        return list(blocks)

    def set_memory(self, memory: str) -> None:
        """Switch between ``"none"``, ``"mlp"`` and ``"block"`` recomputation (reversible)."""
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory={memory!r} is unknown; choose one of {MEMORY_MODES}.")
        for module in self._checkpointed_modules:
            del module.forward
        self._checkpointed_modules = []
        patched = []
        if memory == "mlp":
            blocks = [b for b in self._blocks() if isinstance(getattr(b, "mlp", None), nn.Module)]
            if not blocks:
                raise ValueError("memory='mlp' needs blocks with an .mlp submodule (timm ViT); use 'block' or 'none'.")
            for block in blocks:
                mlp_forward = type(block.mlp).forward.__get__(block.mlp)
                if _is_prenorm_block(block):
                    # recompute norm2 too: y = mlp(norm2(x)) becomes mlp'(x), norm2' = identity
                    norm_forward = type(block.norm2).forward.__get__(block.norm2)
                    block.mlp.forward = functools.partial(_checkpointed, lambda x, n=norm_forward, f=mlp_forward: f(n(x)))
                    block.norm2.forward = _identity
                    patched += [block.mlp, block.norm2]
                else:
                    block.mlp.forward = functools.partial(_checkpointed, mlp_forward)
                    patched.append(block.mlp)
        elif memory == "block":
            for block in self._blocks():
                block.forward = functools.partial(_checkpointed, type(block).forward.__get__(block))
                patched.append(block)
        self._checkpointed_modules = patched
        self.memory = memory

    # ------------------------------------------------------------------ the generator
    def generator_tokens(self, key: str) -> torch.Tensor:
        """T = Hypernet(W phi^T) for all L layers of ``key`` at once: ``(L, d_out, r)``, generator dtype."""
        device_type = self.in_projections[key].weight.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return run_hypernet(self.hypernets[key], self.input_tokens(key), self.kernels)

    def _out_projection(self, key: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """psi (d_in x r') and tokens (..., d_out, r') such that dW = tokens psi^T (bias folded in)."""
        out = self.out_projections[key]
        if out.bias is None:
            return out.weight, tokens
        ones = tokens.new_ones(*tokens.shape[:-1], 1)
        return torch.cat([out.weight, out.bias[:, None]], dim=1), torch.cat([tokens, ones], dim=-1)

    def delta_weight(self, key: str, layer: int) -> torch.Tensor:
        """dW_l = T_l psi^T: ``(d_out, d_in)`` in the target weight's dtype (for inspection and merge)."""
        psi, tokens = self._out_projection(key, self.generator_tokens(key)[layer])
        group = self.target_group(key)
        return (tokens @ psi.t()).to(group.modules[layer].weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged_tokens is None:
            for group in self.target_groups:
                psi, tokens = self._out_projection(group.key, self.generator_tokens(group.key))
                for layer, module in enumerate(group.modules):
                    module.set_residual(psi, tokens[layer])
        elif torch.is_grad_enabled() and any(p.requires_grad for p in self.gift_parameters()):
            raise RuntimeError("FastGIFT is merged; call unmerge() before training (or run under torch.no_grad()).")
        if self.backbone_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.backbone_dtype):
                return self.backbone(x)
        return self.backbone(x)

    # ------------------------------------------------------------------ deployment
    @torch.no_grad()
    def merge(self) -> None:
        """Fold every dW_l into W_l: afterwards the backbone runs with no GIFT overhead.

        Refuses (and changes nothing) when a merged weight would not be finite, like PEFT's safe_merge.
        """
        if self._merged_tokens is not None:
            raise RuntimeError("FastGIFT is already merged; call unmerge() first.")
        merged_weights, tokens_by_key = [], {}
        for group in self.target_groups:
            tokens_by_key[group.key] = tokens = self.generator_tokens(group.key)
            psi, folded = self._out_projection(group.key, tokens)
            for layer, module in enumerate(group.modules):
                merged = module.weight + (folded[layer] @ psi.t()).to(module.weight.dtype)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"Merging GIFT into {group.names[layer]!r} gives non-finite weights; not merged.")
                merged_weights.append((module, merged))
        for module, merged in merged_weights:
            module.weight.copy_(merged)
            module.merged = True
        self._merged_tokens = tokens_by_key

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the residuals folded in by `merge()` (the same dW, from the tokens kept at merge)."""
        if self._merged_tokens is None:
            raise RuntimeError("FastGIFT is not merged.")
        for group in self.target_groups:
            psi, folded = self._out_projection(group.key, self._merged_tokens[group.key])
            for layer, module in enumerate(group.modules):
                module.weight.sub_((folded[layer] @ psi.t()).to(module.weight.dtype))
                module.merged = False
        self._merged_tokens = None

    def merge_and_unload(self) -> nn.Module:
        """Merge, then return the plain backbone (targets back to ``nn.Linear``) for deployment."""
        self.merge()
        self.set_memory("none")
        for group in self.target_groups:
            for name, module in zip(group.names, group.modules):
                _replace_module(self.backbone, name, module.unwrap())
        return self.backbone
