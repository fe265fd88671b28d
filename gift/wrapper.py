"""`GIFTModelBase`, what both GIFT wrappers share: the frozen backbone and its targets, one generator
per target key, the classifier head, the authors' checkpoint layout and the PEFT-style adapter folder
(GIFT_SPEC.md, sections 1 and 5)."""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any, Iterator

import torch
import torch.nn as nn

from .config import GIFTConfig
from .files import atomic_write, atomic_write_json, content_sha256, read_state_dict
from .generator import Hypernet, l2_normalize
from .targets import TargetGroup, classifier_name, find_targets

GIFT_PREFIXES = ("in_projections.", "hypernets.", "out_projections.")
ADAPTER_WEIGHTS = "gift_adapter.safetensors"
ADAPTER_CONFIG = "gift_config.json"
#: the metadata key of ``gift_adapter.safetensors`` that holds the `content_sha256` of its tensors
WEIGHTS_CHECKSUM = "gift_content_sha256"


def block_index_argument(block_index: int, block: int | None) -> int:
    """The generator block number of a call that may give it by its old keyword ``block=``."""
    if block is None:
        return block_index
    if block_index != 0:
        raise TypeError("give block_index= (block= is its old name), not both")
    return block


def refuse_adapted_backbone(backbone: nn.Module, groups: list[TargetGroup]) -> None:
    """Raise when a target of ``backbone`` is already adapted by another GIFT wrapper (a `FastGIFT` layer or a
    `GIFTReference` hook: both say ``gift_adapted``): wrapping it again would silently switch the first
    wrapper off (its layers replaced, or its residual added twice)."""
    for group in groups:
        for name, module in zip(group.names, group.modules):
            hooks = getattr(module, "_forward_hooks", {}).values()
            if getattr(module, "gift_adapted", False) or any(getattr(h, "gift_adapted", False) for h in hooks):
                raise ValueError(
                    f"this {type(backbone).__name__} is already wrapped by GIFT ({name!r} is adapted by another "
                    f"FastGIFT or GIFTReference); wrapping it again would switch the first model off. Wrap a fresh "
                    f"backbone (timm.create_model(...)) or keep using the first model (its merge_and_unload() "
                    f"returns the plain backbone)."
                )


class GIFTModelBase(nn.Module):
    """Freezes ``backbone``, finds its targets and holds one generator per target key.

    Attributes:
        backbone: the wrapped model (frozen but for its classifier head).
        config: the ``GIFTConfig``.
        in_projections / hypernets / out_projections: ``nn.ModuleDict`` keyed by target key
            (``attn:proj``), holding phi (r x d_in), the hyper-Transformer and psi (d_in x r).
        target_groups: list of ``TargetGroup``, in ``config.target_modules`` order.
    """

    def __init__(self, backbone: nn.Module, config: GIFTConfig | None = None):
        super().__init__()
        config = GIFTConfig() if config is None else config
        if not isinstance(config, GIFTConfig):
            raise TypeError(f"config must be a GIFTConfig, got {type(config).__name__}.")
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                f"backbone must be an nn.Module (e.g. timm.create_model(...)), got {type(backbone).__name__}."
            )
        self.config = config
        self.target_groups = find_targets(backbone, config.target_modules)
        refuse_adapted_backbone(backbone, self.target_groups)
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.head_name = classifier_name(backbone)
        if self.head_name is not None:
            self.backbone.get_submodule(self.head_name).requires_grad_(True)

        self.in_projections = nn.ModuleDict()
        self.hypernets = nn.ModuleDict()
        self.out_projections = nn.ModuleDict()
        for group in self.target_groups:
            self.in_projections[group.key] = nn.Linear(group.in_features, config.rank, bias=config.in_projection_bias)
            self.hypernets[group.key] = Hypernet(config)
            out_projection = nn.Linear(config.rank, group.in_features, bias=config.out_projection_bias)
            nn.init.zeros_(out_projection.weight)
            if out_projection.bias is not None:
                nn.init.zeros_(out_projection.bias)
            self.out_projections[group.key] = out_projection
        for container in (self.in_projections, self.hypernets, self.out_projections):
            container.to(device=self._backbone_device(), dtype=config.torch_dtype)

    @property
    def merged(self) -> bool:
        """Whether the residuals are folded into the frozen weights (only `FastGIFT` merges)."""
        return False

    def _backbone_device(self) -> torch.device:
        for p in self.backbone.parameters():
            return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ parameters
    def gift_parameters(self) -> Iterator[nn.Parameter]:
        """The generators' parameters (phi, hyper-Transformers, psi), without the head."""
        for container in (self.in_projections, self.hypernets, self.out_projections):
            yield from container.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        if self.head_name is not None:
            yield from self.backbone.get_submodule(self.head_name).parameters()

    def num_gift_parameters(self) -> int:
        return sum(p.numel() for p in self.gift_parameters())

    def num_trainable_parameters(self) -> int:
        """Parameters that receive gradients: the generators and the classifier head."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def parameter_table(self) -> str:
        """A small text table: trainable parameters per group and their share of the backbone."""
        backbone_total = sum(p.numel() for p in self.backbone.parameters())
        rows = [(f"generator {g.key} ({len(g)} layers {g.out_features}x{g.in_features})",
                 sum(p.numel() for c in (self.in_projections, self.hypernets, self.out_projections)
                     for p in c[g.key].parameters())) for g in self.target_groups]
        rows.append((f"head {self.head_name}", sum(p.numel() for p in self.head_parameters())))
        rows.append(("trainable total", self.num_trainable_parameters()))
        width = max(len(r[0]) for r in rows)
        lines = [
            f"{name:<{width}}  {count:>12,}  {100.0 * count / max(backbone_total, 1):8.4f}%" for name, count in rows
        ]
        lines.append(f"{'backbone (frozen)':<{width}}  {backbone_total:>12,}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ the generator
    def target_group(self, key: str | None = None) -> TargetGroup:
        """The layers adapted under ``key`` (default: the first target key)."""
        for group in self.target_groups:
            if key is None or group.key == key:
                return group
        raise KeyError(f"No target key {key!r}; this model has {[g.key for g in self.target_groups]}.")

    def generator_dtype(self, key: str) -> torch.dtype:
        return self.in_projections[key].weight.dtype

    def input_tokens(self, key: str | None = None) -> torch.Tensor:
        """T = W_l phi^T for every layer of ``key``, read from the frozen weights in place: ``(L, d_out, r)``."""
        group = self.target_group(key)
        phi, dtype = self.in_projections[group.key], self.generator_dtype(group.key)
        return torch.stack([phi(m.weight.to(dtype)) for m in group.modules])

    @torch.no_grad()
    def cluster_assignments(self, key: str | None = None, block_index: int = 0, *,
                            block: int | None = None) -> torch.Tensor:
        """The explainer's clusters (GIFT_SPEC.md section 4) for every layer of ``key``: ``(L, d_out, M)``.

        C = sigmoid(S) of the generator's PaCa block number ``block_index`` (``block``: its old name; before
        the 1/N; softmax over tokens if so configured), computed from the frozen weights. With the
        ``identity`` block type: the r columns of T = W phi^T.
        """
        block = block_index_argument(block_index, block)
        group = self.target_group(key)
        if self.merged:
            raise RuntimeError("the model is merged: its weights hold W + dW; call unmerge() before explaining.")
        tokens = self.input_tokens(group.key)
        blocks = self.hypernets[group.key].blocks
        if len(blocks) == 0:
            return tokens
        if not 0 <= block < len(blocks):
            raise ValueError(f"block_index={block} is out of range: this generator has {len(blocks)} block(s).")
        for b in blocks[:block]:
            tokens = b(tokens)
        return blocks[block].attn.cluster_assignment(l2_normalize(tokens), divide_by_n=False)

    # ------------------------------------------------------------------ checkpoints
    def _is_gift_key(self, key: str) -> bool:
        return key.startswith(GIFT_PREFIXES) or (
            self.head_name is not None and key.startswith(f"backbone.{self.head_name}.")
        )

    def gift_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """GIFT parameters and the head, in the authors' key layout (GIFT_SPEC.md section 5)."""
        return OrderedDict((k, v) for k, v in self.state_dict().items() if self._is_gift_key(k))

    def load_gift_state_dict(self, obj: Any) -> None:
        """Load GIFT weights and the head from a state dict, a ``{"state_dict": ...}`` checkpoint or a path
        (``.pth``/``.pth.tar``/``.safetensors``). Other backbone keys in a full checkpoint are ignored.

        Raises ``KeyError`` listing missing/unexpected GIFT keys, ``ValueError`` listing shape mismatches
        (or for a ``gift_adapter.safetensors`` whose tensors fail its checksum); nothing is loaded then.
        """
        self.copy_gift_state(self.checked_gift_state(obj))

    def checked_gift_state(self, obj: Any) -> dict[str, torch.Tensor]:
        """The GIFT weights and head of ``obj`` (as `load_gift_state_dict` takes it), checked against this model
        (raising as `load_gift_state_dict` says), by key of `gift_state_dict`; nothing is loaded."""
        if isinstance(obj, (str, os.PathLike)) and os.path.basename(os.fspath(obj)) == ADAPTER_WEIGHTS:
            obj = self.read_adapter_weights(os.path.dirname(os.fspath(obj)))  # checked against its checksum
        given = read_state_dict(obj, what="GIFT checkpoint", trust_pickles=True)
        own = self.gift_state_dict()
        given_gift = {k: v for k, v in given.items() if self._is_gift_key(k) or k.startswith(GIFT_PREFIXES)}
        missing = sorted(set(own) - set(given_gift))
        unexpected = sorted(set(given_gift) - set(own))
        if missing or unexpected:
            raise KeyError(
                "GIFT checkpoint does not fit this model's config "
                f"({self.config.block}, rank={self.config.rank}, target_modules={list(self.config.target_modules)}): "
                f"missing keys {missing}, unexpected keys {unexpected}. Build the model with the GIFTConfig the "
                f"checkpoint was trained with."
            )
        mismatched = [
            f"{k}: checkpoint {tuple(given_gift[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own if tuple(given_gift[k].shape) != tuple(own[k].shape)
        ]
        if mismatched:
            raise ValueError(
                "GIFT checkpoint shapes do not fit this backbone (another model size, rank or number of classes?): "
                + "; ".join(mismatched)
            )
        return {k: given_gift[k] for k in own}

    def copy_gift_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a `checked_gift_state` into the model's parameters and buffers (in place)."""
        targets = dict(self.named_parameters())
        targets.update(dict(self.named_buffers()))
        with torch.no_grad():
            for k, value in state.items():
                targets[k].copy_(value)

    # ------------------------------------------------------------------ adapters (PEFT-style)
    def _target_shapes(self) -> dict[str, list[int]]:
        return {g.key: [len(g), g.out_features, g.in_features] for g in self.target_groups}

    def save_adapter(self, directory: str | os.PathLike, run: dict | None = None) -> None:
        """Write ``gift_adapter.safetensors`` (GIFT weights and the head, with the `content_sha256` of its
        tensors in the file's metadata) and ``gift_config.json``, each atomically (temp file, then rename).
        The frozen backbone is never written; ``run`` (e.g. the timm model name and the local pretrained
        file) is kept in the JSON for tools like ``gift explain``."""
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.gift_state_dict().items()}
        checksum = {"format": "pt", WEIGHTS_CHECKSUM: content_sha256(tensors)}
        meta = {"format": "gift-adapter-v1", "config": self.config.to_dict(), "targets": self._target_shapes(),
                "head": self.head_name, "backbone_class": type(self.backbone).__name__, "run": run or {}}
        atomic_write(os.path.join(directory, ADAPTER_WEIGHTS), lambda tmp: save_file(tensors, tmp, metadata=checksum))
        atomic_write_json(os.path.join(directory, ADAPTER_CONFIG), meta, sort_keys=True)

    @staticmethod
    def read_adapter_config(directory: str | os.PathLike) -> dict:
        path = os.path.join(os.fspath(directory), ADAPTER_CONFIG)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path!r} does not exist: is {os.fspath(directory)!r} a directory written by save_adapter()?"
            )
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path!r} is damaged: not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{path!r} is damaged: not a JSON object")
        return meta

    @staticmethod
    def read_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
        """The tensors of ``gift_adapter.safetensors``, checked against the checksum in its metadata (adapters
        saved before the checksum have none). ``ValueError`` for a damaged file."""
        from safetensors import safe_open

        path = os.path.join(os.fspath(directory), ADAPTER_WEIGHTS)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GIFT checkpoint {path!r} does not exist.")
        try:
            with safe_open(path, framework="pt") as f:
                recorded = (f.metadata() or {}).get(WEIGHTS_CHECKSUM)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a broken file
            raise ValueError(f"cannot read GIFT checkpoint {path!r}: {type(e).__name__}: {e}") from None
        if recorded is not None and content_sha256(tensors) != recorded:
            raise ValueError(f"{path!r} is damaged: its tensors do not match the checksum they were saved with "
                             f"(a flipped bit or a partial copy); restore it from a copy (a gift finetune run "
                             f"writes it again from its checkpoint.pt with --resume)")
        return tensors

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Restore what `save_adapter` wrote. Raises ``ValueError`` when the adapter was made for another
        backbone shape or another GIFT config, naming both."""
        meta = self.read_adapter_config(directory)
        saved = GIFTConfig.from_dict(meta["config"])
        if saved != self.config:
            raise ValueError(f"Adapter in {os.fspath(directory)!r} was saved with {saved}, but this model has "
                             f"{self.config}. Build the model with GIFTConfig.from_dict(<gift_config.json>['config']).")
        if meta["targets"] != self._target_shapes():
            raise ValueError(f"Adapter in {os.fspath(directory)!r} is for targets {meta['targets']} (layers, out, in) "
                             f"but this backbone has {self._target_shapes()}: wrong backbone model.")
        self.load_gift_state_dict(self.read_adapter_weights(directory))

    @classmethod
    def from_adapter(cls, backbone: nn.Module, directory: str | os.PathLike, **kwargs):
        """Build this wrapper around ``backbone`` with the saved config and load the saved weights."""
        model = cls(backbone, GIFTConfig.from_dict(cls.read_adapter_config(directory)["config"]), **kwargs)
        model.load_adapter(directory)
        return model

    def extra_repr(self) -> str:
        groups = ", ".join(f"{g.key}: {len(g)}x({g.out_features}x{g.in_features})" for g in self.target_groups)
        return f"block={self.config.block}, rank={self.config.rank}, targets=[{groups}]"
