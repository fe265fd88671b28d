"""What every GIFT wrapper shares: target discovery, the generator's parameters, the head, the
authors' checkpoint layout (GIFT_SPEC.md, sections 1 and 5)."""
from __future__ import annotations

import difflib
import json
import os
import tempfile
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from .config import GIFTConfig
from .generator import Hypernet

GIFT_PREFIXES = ("in_projections.", "hypernets.", "out_projections.")
ADAPTER_WEIGHTS = "gift_adapter.safetensors"
ADAPTER_CONFIG = "gift_config.json"


def atomic_write(path: str, write) -> None:
    """Write a file through ``write(tmp_path)`` then rename it over ``path``: a crash leaves the old file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a file written normally gets the umask's permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """`atomic_write` of a UTF-8 text file."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def target_key(suffix: str) -> str:
    """Checkpoint key of a target suffix: the module path with ':' for '.' (``attn.proj -> attn:proj``)."""
    return suffix.replace(".", ":")


@dataclass(frozen=True)
class TargetGroup:
    """The L frozen linear layers adapted by one generator; each weight is ``(out_features, in_features)``."""

    key: str
    names: tuple[str, ...]
    modules: tuple[nn.Linear, ...]

    @property
    def in_features(self) -> int:
        return self.modules[0].in_features

    @property
    def out_features(self) -> int:
        return self.modules[0].out_features

    def __len__(self) -> int:
        return len(self.modules)


def _close_candidates(suffix: str, module_names: list[str]) -> list[str]:
    suffixes = set()
    for name in module_names:
        parts = name.split(".")
        for k in range(1, min(3, len(parts)) + 1):
            suffixes.add(".".join(parts[-k:]))
    return difflib.get_close_matches(suffix, sorted(suffixes), n=5, cutoff=0.5)


def find_targets(backbone: nn.Module, target_modules: tuple[str, ...]) -> list[TargetGroup]:
    """Match ``target_modules`` against ``backbone``'s module names by suffix, as PEFT does.

    Raises a ``ValueError`` or ``TypeError`` naming the module and the fix when a suffix matches
    nothing, matches a module that is not ``nn.Linear``, or matches layers of different shapes.
    """
    named = [(n, m) for n, m in backbone.named_modules() if n]
    all_names = [n for n, _ in named]
    groups, claimed = [], {}
    for suffix in target_modules:
        matches = [(n, m) for n, m in named if n == suffix or n.endswith("." + suffix)]
        if not matches:
            hint = _close_candidates(suffix, all_names)
            hint_text = f" Close candidates: {', '.join(repr(h) for h in hint)}." if hint else ""
            raise ValueError(
                f"GIFT target {suffix!r} matches no module of {type(backbone).__name__}.{hint_text} "
                f"Set GIFTConfig(target_modules=...) to suffixes of names from backbone.named_modules()."
            )
        for name, module in matches:
            if not isinstance(module, nn.Linear):
                raise TypeError(
                    f"GIFT target {suffix!r} matched {name!r}, a {type(module).__name__}, not an nn.Linear. "
                    f"GIFT adapts linear layers only: pick a longer suffix that names a Linear inside it."
                )
            if name in claimed:
                raise ValueError(
                    f"Module {name!r} is matched by both target {claimed[name]!r} and {suffix!r}; "
                    f"make the target_modules suffixes disjoint."
                )
            claimed[name] = suffix
        first_name, first = matches[0]
        for name, module in matches[1:]:
            if (module.out_features, module.in_features) != (first.out_features, first.in_features):
                raise ValueError(
                    f"GIFT target {suffix!r} shares one generator across its layers, so they need one shape, "
                    f"but {name!r} is {module.out_features}x{module.in_features} (out x in) while {first_name!r} "
                    f"is {first.out_features}x{first.in_features}. Give the differently shaped layers their own, "
                    f"longer target suffix."
                )
        groups.append(TargetGroup(target_key(suffix), tuple(n for n, _ in matches), tuple(m for _, m in matches)))
    return groups


def classifier_name(backbone: nn.Module) -> str | None:
    """Module name of ``backbone.get_classifier()`` (timm API), or None."""
    get_classifier = getattr(backbone, "get_classifier", None)
    if get_classifier is None:
        return None
    head = get_classifier()
    if not isinstance(head, nn.Module):
        return None
    for name, module in backbone.named_modules():
        if module is head and name:
            return name
    return None


def _read_checkpoint(obj: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GIFT checkpoint {path!r} does not exist.")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path)
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                warnings.warn(
                    f"{path!r} holds Python objects besides tensors (e.g. training arguments); loading it with "
                    f"weights_only=False. Only load checkpoints you trust.",
                    stacklevel=3,
                )
                obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"Expected a state dict, a checkpoint dict with 'state_dict', or a path; got {type(obj).__name__}.")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


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
            raise TypeError(f"backbone must be an nn.Module (e.g. timm.create_model(...)), got {type(backbone).__name__}.")
        self.config = config
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.target_groups = find_targets(backbone, config.target_modules)
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
        lines = [f"{name:<{width}}  {count:>12,}  {100.0 * count / max(backbone_total, 1):8.4f}%" for name, count in rows]
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
    def cluster_assignments(self, key: str | None = None, block: int = 0) -> torch.Tensor:
        """The explainer's clusters (GIFT_SPEC.md section 4) for every layer of ``key``: ``(L, d_out, M)``.

        C = sigmoid(S) of PaCa block ``block`` (before the 1/N; softmax over tokens if so configured),
        computed from the frozen weights. With the ``identity`` block: the r columns of T = W phi^T.
        """
        group = self.target_group(key)
        if self.merged:
            raise RuntimeError("the model is merged: its weights hold W + dW; call unmerge() before explaining.")
        tokens = self.input_tokens(group.key)
        blocks = self.hypernets[group.key].blocks
        if len(blocks) == 0:
            return tokens
        if not 0 <= block < len(blocks):
            raise ValueError(f"block={block} is out of range: this generator has {len(blocks)} block(s).")
        for b in blocks[:block]:
            tokens = b(tokens)
        from .generator import l2_normalize

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

        Raises ``KeyError`` listing missing/unexpected GIFT keys, ``ValueError`` listing shape mismatches.
        """
        given = _read_checkpoint(obj)
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
        targets = dict(self.named_parameters())
        targets.update(dict(self.named_buffers()))
        with torch.no_grad():
            for k in own:
                targets[k].copy_(given_gift[k])

    # ------------------------------------------------------------------ adapters (PEFT-style)
    def _target_shapes(self) -> dict[str, list[int]]:
        return {g.key: [len(g), g.out_features, g.in_features] for g in self.target_groups}

    def save_adapter(self, directory: str | os.PathLike, run: dict | None = None) -> None:
        """Write ``gift_adapter.safetensors`` (GIFT weights and the head) and ``gift_config.json``,
        each atomically (temp file, then rename). The frozen backbone is never written; ``run`` (e.g.
        the timm model name and the local pretrained file) is kept in the JSON for tools like ``gift explain``."""
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.gift_state_dict().items()}
        meta = {"format": "gift-adapter-v1", "config": self.config.to_dict(), "targets": self._target_shapes(),
                "head": self.head_name, "backbone_class": type(self.backbone).__name__, "run": run or {}}
        atomic_write(os.path.join(directory, ADAPTER_WEIGHTS), lambda tmp: save_file(tensors, tmp))

        def write_json(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, sort_keys=True)

        atomic_write(os.path.join(directory, ADAPTER_CONFIG), write_json)

    @staticmethod
    def read_adapter_config(directory: str | os.PathLike) -> dict:
        path = os.path.join(os.fspath(directory), ADAPTER_CONFIG)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} does not exist: is {os.fspath(directory)!r} a directory written by save_adapter()?")
        with open(path, encoding="utf-8") as f:
            return json.load(f)

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
        self.load_gift_state_dict(os.path.join(os.fspath(directory), ADAPTER_WEIGHTS))

    @classmethod
    def from_adapter(cls, backbone: nn.Module, directory: str | os.PathLike, **kwargs):
        """Build this wrapper around ``backbone`` with the saved config and load the saved weights."""
        model = cls(backbone, GIFTConfig.from_dict(cls.read_adapter_config(directory)["config"]), **kwargs)
        model.load_adapter(directory)
        return model

    def extra_repr(self) -> str:
        groups = ", ".join(f"{g.key}: {len(g)}x({g.out_features}x{g.in_features})" for g in self.target_groups)
        return f"block={self.config.block}, rank={self.config.rank}, targets=[{groups}]"
