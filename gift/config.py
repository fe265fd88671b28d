"""`GIFTConfig`: every choice that shapes a GIFT generator, validated on construction; and the
vocabularies of the library, each defined here once: block types, cluster activations, memory modes,
fine-tuning methods (the dtype names are `gift.dtypes`')."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .dtypes import DTYPES

#: the generator's block: PaCa + FFN, PaCa only, or none (GIFT_SPEC.md, section 3)
BLOCK_TYPES = ("paca", "paca_attn", "identity")
CLUSTER_ACTIVATIONS = ("sigmoid", "softmax")
#: what `FastGIFT` recomputes in backward, fastest first: nothing, each block's MLP, whole blocks
MEMORY_MODES = ("none", "mlp", "block")
#: what a fine-tuning run trains: GIFT, PEFT LoRA, the head only (linear probe), everything
METHODS = ("gift", "lora", "linear", "full")


@dataclass
class GIFTConfig:
    """Configuration of a GIFT generator (see GIFT_SPEC.md, sections 2 and 3).

    Args:
        rank: width r of the hyper-Transformer (the rank of every generated residual).
        block: ``"paca"`` (PaCa + FFN), ``"paca_attn"`` (PaCa only) or ``"identity"`` (no block).
        num_blocks: hyper-Transformer blocks (ignored by ``"identity"``).
        num_clusters: M, the clusters of Parameter-to-Cluster Attention.
        num_heads: attention heads of PaCa; must divide ``rank``.
        mlp_ratio: FFN hidden width is ``round(mlp_ratio * rank)``.
        cluster_activation: ``"sigmoid"`` (sigmoid, then / N) or ``"softmax"`` over the N tokens.
        target_modules: module-name suffixes of the adapted ``nn.Linear`` layers (PEFT-style), one generator per
            entry, shared by the layers it matches; ``*`` stands for one module name, so that a pattern can pick
            one stage of a hierarchical model (``"layers.0.blocks.*.attn.proj"``).
        modules_to_save: module-name suffixes of the backbone modules that train whole and are saved with the
            adapter (PEFT's ``modules_to_save``, e.g. ``("lm_head",)``); None: the classifier head (timm's
            ``get_classifier()``, a Hugging Face ``classifier`` or ``score``), ``()``: none.
        in_projection_bias / out_projection_bias: biases on phi / psi.
        dtype: compute dtype of the generator ("float32", "float64", "bfloat16", "float16").
    """

    rank: int = 16
    block: str = "paca"
    num_blocks: int = 1
    num_clusters: int = 64
    num_heads: int = 1
    mlp_ratio: float = 2.0
    cluster_activation: str = "sigmoid"
    target_modules: tuple[str, ...] = field(default_factory=lambda: ("attn.proj",))
    modules_to_save: tuple[str, ...] | None = None
    in_projection_bias: bool = False
    out_projection_bias: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        if self.modules_to_save is not None:
            self.modules_to_save = tuple(self.modules_to_save)
            if not all(isinstance(m, str) and m for m in self.modules_to_save):
                raise ValueError(f"GIFTConfig.modules_to_save must be module-name suffixes (or None for the "
                                 f"classifier head), got {self.modules_to_save!r}.")
        for name in ("rank", "num_blocks", "num_clusters", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"GIFTConfig.{name} must be an int, got {type(value).__name__} {value!r}.")
            if value <= 0:
                raise ValueError(f"GIFTConfig.{name} must be a positive integer, got {value}.")
        if not self.mlp_ratio > 0:
            raise ValueError(f"GIFTConfig.mlp_ratio must be positive, got {self.mlp_ratio}.")
        if self.block not in BLOCK_TYPES:
            raise ValueError(f"GIFTConfig.block={self.block!r} is unknown; choose one of {BLOCK_TYPES}.")
        if self.cluster_activation not in CLUSTER_ACTIVATIONS:
            raise ValueError(
                f"GIFTConfig.cluster_activation={self.cluster_activation!r} is unknown; "
                f"choose one of {CLUSTER_ACTIVATIONS}."
            )
        if self.rank % self.num_heads != 0:
            raise ValueError(
                f"GIFTConfig.rank={self.rank} is not divisible by num_heads={self.num_heads}; "
                f"pick a rank that is a multiple of num_heads "
                f"(e.g. rank={self.num_heads * max(1, self.rank // self.num_heads)})."
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"GIFTConfig.dtype={self.dtype!r} is unknown; choose one of {tuple(DTYPES)}.")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(
                f"GIFTConfig.target_modules must be non-empty module-name suffixes, got {self.target_modules!r}."
            )

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_ratio * self.rank))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["modules_to_save"] = None if self.modules_to_save is None else list(self.modules_to_save)
        return d

    def same_generator(self, other: "GIFTConfig") -> bool:
        """Whether ``other`` makes the same generators (every field but ``modules_to_save``, which names what else
        an adapter holds)."""
        return dataclasses.replace(self, modules_to_save=None) == dataclasses.replace(other, modules_to_save=None)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GIFTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GIFTConfig.from_dict got unknown keys {unknown}; known keys are {sorted(known)}.")
        return cls(**dict(d))

