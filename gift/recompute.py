"""Memory modes of a timm ViT: what is recomputed in backward instead of kept (non-reentrant
``torch.utils.checkpoint``), applied to a backbone and undone, reversibly, with state-dict keys
unchanged (see `gift.config.MEMORY_MODES`):

* ``"mlp"``: each block's MLP (with its pre-norm, moved inside) is a `Recomputed` module;
* ``"block"``: timm's ``set_grad_checkpointing()`` where the backbone has it, else each of
  ``backbone.blocks`` wrapped in a `Recomputed` module.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import use_reentrant_ckpt
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from .config import MEMORY_MODES

try:
    from timm.models.eva import EvaBlock
except ImportError:  # older timm
    EvaBlock = Block


class KeysAsBefore:
    """A state-dict hook for a module whose children were moved into a `Recomputed` wrapper: as a
    ``state_dict`` post-hook (``saving=True``) it shows the keys as they were before the move, as a
    ``load_state_dict`` pre-hook (``saving=False``) it takes them so. ``moves``: (path before, path now)
    pairs relative to the module, e.g. ``("mlp.", "mlp.body.")``."""

    def __init__(self, moves: list[tuple[str, str]], saving: bool):
        self.moves, self.saving = moves, saving

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, *hook_args) -> None:
        for key in list(state_dict):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            for before, now in self.moves:
                old, new = (now, before) if self.saving else (before, now)
                if rest.startswith(old) and (self.saving or not rest.startswith(now)):
                    state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                    break


class Recomputed(nn.Module):
    """``body(norm(x))`` recomputed in backward instead of keeping its activations
    (non-reentrant ``torch.utils.checkpoint``): what ``memory="mlp"`` puts in place of each block's MLP
    (with the block's pre-norm moved inside) and ``memory="block"`` around blocks of backbones without
    timm's ``set_grad_checkpointing``. Its submodules are ``norm`` (``nn.Identity`` if none) and ``body``:
    module paths under it gain ``.norm`` / ``.body`` while it is in place, but state-dict keys do not
    (`KeysAsBefore` on the parent module); ``set_memory("none")`` restores the original modules."""

    def __init__(self, body: nn.Module, norm: nn.Module | None = None):
        super().__init__()
        self.norm = nn.Identity() if norm is None else norm
        self.body = body

    def _run(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.body(self.norm(x), *args, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(self._run, x, *args, use_reentrant=False, **kwargs)
        return self._run(x, *args, **kwargs)


def is_prenorm_block(block: nn.Module) -> bool:
    """timm's pre-norm ViT blocks compute ``x + ls2(mlp(norm2(x)))``: norm2 feeds mlp and nothing else."""
    return type(block) in (Block, EvaBlock) and isinstance(getattr(block, "norm2", None), nn.Module)


def timm_grad_checkpointing(backbone: nn.Module) -> bool:
    """Whether ``backbone`` offers timm's ``set_grad_checkpointing()`` (and its ``grad_checkpointing`` flag)."""
    return callable(getattr(backbone, "set_grad_checkpointing", None)) and hasattr(backbone, "grad_checkpointing")


def refuse_reentrant_checkpointing() -> None:
    """Raise when timm checkpoints reentrantly: the recomputed blocks would not reach the generator."""
    if use_reentrant_ckpt():
        raise ValueError("timm's grad checkpointing (memory='block') needs its non-reentrant mode (reentrant drops "
                         "the generator's gradients); call timm.layers.set_reentrant_ckpt(False).")


def hf_reentrant_checkpointing(backbone: nn.Module) -> bool:
    """Whether a Hugging Face model checkpoints some layer reentrantly (``gradient_checkpointing_enable(
    gradient_checkpointing_kwargs={"use_reentrant": True})``: each layer's ``_gradient_checkpointing_func``)."""
    if not hasattr(backbone, "supports_gradient_checkpointing"):  # not a transformers PreTrainedModel
        return False
    for module in backbone.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if module.__dict__.get("gradient_checkpointing") is True and func is not None:
            if getattr(func, "keywords", {}).get("use_reentrant") is True:
                return True
    return False


def refuse_hf_reentrant_without_input_grads(backbone: nn.Module) -> None:
    """Raise when a Hugging Face model checkpoints reentrantly and its input embeddings' output does not require a
    gradient: a reentrant checkpoint whose inputs need no gradient never runs its backward, so the recomputed layers
    would not reach the generator (no error, no gradient). ``enable_input_require_grads()`` (PEFT's recipe) fixes it."""
    if hf_reentrant_checkpointing(backbone) and not (getattr(backbone, "_require_grads_hooks", None)
                                                     or getattr(backbone, "_require_grads_hook", None)):
        raise ValueError(f"{type(backbone).__name__} checkpoints its layers reentrantly (use_reentrant=True) and its "
                         f"input embeddings need no gradient, so the checkpointed layers would never reach the "
                         f"generator; call backbone.enable_input_require_grads() (as PEFT does), or enable "
                         f"checkpointing with gradient_checkpointing_kwargs={{'use_reentrant': False}}.")


def vit_blocks(backbone: nn.Module) -> nn.Module:
    """``backbone.blocks`` (a timm ViT's); ``ValueError`` naming the fix when there is none."""
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise ValueError(f"memory modes 'mlp' and 'block' need backbone.blocks (a timm ViT); "
                         f"{type(backbone).__name__} has none. Use memory='none'.")
    return blocks


def check_memory_mode(backbone: nn.Module, memory: str) -> None:
    """Raise ``ValueError`` (naming the fix) when ``backbone`` cannot take memory mode ``memory``."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory={memory!r} is unknown; choose one of {MEMORY_MODES}.")
    if memory == "mlp" and not [b for b in vit_blocks(backbone) if isinstance(getattr(b, "mlp", None), nn.Module)]:
        raise ValueError("memory='mlp' needs blocks with an .mlp submodule (timm ViT); use 'block' or 'none'.")
    if memory == "block" and not timm_grad_checkpointing(backbone):
        vit_blocks(backbone)


def supported_memory_modes(backbone: nn.Module) -> tuple[str, ...]:
    """The memory modes `check_memory_mode` lets ``backbone`` take, fastest first (``"none"`` always)."""
    supported = []
    for memory in MEMORY_MODES:
        try:
            check_memory_mode(backbone, memory)
        except ValueError:
            continue
        supported.append(memory)
    return tuple(supported)


def _move_keys(parent: nn.Module, moves: list[tuple[str, str]]) -> list:
    return [parent.register_state_dict_post_hook(KeysAsBefore(moves, saving=True)),
            parent.register_load_state_dict_pre_hook(KeysAsBefore(moves, saving=False))]


def apply_memory_mode(backbone: nn.Module, memory: str) -> list:
    """Put memory mode ``memory`` in place on a backbone in mode ``"none"`` (checked by `check_memory_mode`
    first); returns the state-dict hook handles that `undo_memory_mode` removes."""
    check_memory_mode(backbone, memory)
    handles: list = []
    if memory == "mlp":
        for block in vit_blocks(backbone):
            if not isinstance(getattr(block, "mlp", None), nn.Module):
                continue
            if is_prenorm_block(block):  # recompute norm2 too: x + ls2(mlp(norm2(x))) -> x + ls2(mlp'(x))
                block.mlp, block.norm2 = Recomputed(block.mlp, norm=block.norm2), nn.Identity()
                handles += _move_keys(block, [("mlp.", "mlp.body."), ("norm2.", "mlp.norm.")])
            else:
                block.mlp = Recomputed(block.mlp)
                handles += _move_keys(block, [("mlp.", "mlp.body.")])
    elif memory == "block":
        if timm_grad_checkpointing(backbone):
            refuse_reentrant_checkpointing()
            backbone.set_grad_checkpointing(True)
        else:
            blocks = vit_blocks(backbone)
            for i, block in enumerate(blocks):
                blocks[i] = Recomputed(block)
            handles += _move_keys(blocks, [(f"{i}.", f"{i}.body.") for i in range(len(blocks))])
    return handles


def undo_memory_mode(backbone: nn.Module, memory: str, handles: list) -> None:
    """Back to mode ``"none"`` from ``memory`` (as `apply_memory_mode` left it): the original modules in
    place, the state-dict ``handles`` removed."""
    for handle in handles:
        handle.remove()
    if memory == "none":
        return
    blocks = vit_blocks(backbone)
    for i, block in enumerate(blocks):
        if isinstance(block, Recomputed):
            blocks[i] = block = block.body
        if isinstance(getattr(block, "mlp", None), Recomputed):
            wrapper = block.mlp
            block.mlp = wrapper.body
            if not isinstance(wrapper.norm, nn.Identity):
                block.norm2 = wrapper.norm
    if timm_grad_checkpointing(backbone):
        backbone.set_grad_checkpointing(False)
