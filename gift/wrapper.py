"""`GIFTModelBase`, what both GIFT wrappers share: the frozen backbone and its targets, one generator
per target key, the classifier head, the authors' checkpoint layout and the PEFT-style adapter folder
(GIFT_SPEC.md, sections 1 and 5)."""
from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from typing import Any, Iterator

import torch
import torch.nn as nn

from .backbones import recorded_identity
from .config import GIFTConfig
from .files import atomic_write, atomic_write_json, content_sha256, read_state_dict
from .generator import Hypernet, l2_normalize
from .targets import TargetGroup, find_targets, saved_modules

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


def refuse_adapted_backbone(backbone: nn.Module) -> None:
    """Raise when any module of ``backbone`` is already adapted by a GIFT wrapper (a `FastGIFT` layer or a
    `GIFTReference` hook: both say ``gift_adapted``), whatever the new targets: wrapping it again would silently
    switch the first wrapper off or change its outputs (its layers replaced, or residuals added twice)."""
    for name, module in backbone.named_modules():
        hooks = getattr(module, "_forward_hooks", {}).values()
        if getattr(module, "gift_adapted", False) or any(getattr(h, "gift_adapted", False) for h in hooks):
            raise ValueError(
                f"this {type(backbone).__name__} is already wrapped by GIFT ({name!r} is adapted by another "
                f"FastGIFT or GIFTReference); wrapping it again would switch the first model off. Wrap a fresh "
                f"backbone (timm.create_model(...)) or keep using the first model (its merge_and_unload() "
                f"returns the plain backbone)."
            )


class SharedStates(dict):
    """A dict of CPU tensors or state dicts, never changed in place, that a copy of the model shares (so a deepcopy,
    also one under ``FakeTensorMode``, copies no tensor)."""

    def __deepcopy__(self, memo) -> "SharedStates":
        return SharedStates((k, dict(v) if isinstance(v, dict) else v) for k, v in self.items())


class GIFTModelBase(nn.Module):
    """Freezes ``backbone``, finds its targets and holds one generator per target key.

    Attributes:
        backbone: the wrapped model (frozen but for the modules it trains whole).
        config: the ``GIFTConfig``.
        in_projections / hypernets / out_projections: ``nn.ModuleDict`` keyed by target key
            (``attn:proj``), holding phi (r x d_in), the hyper-Transformer and psi (d_in x r).
        target_groups: list of ``TargetGroup``, in ``config.target_modules`` order.
        saved_module_names: the backbone modules that train whole and are saved with the adapter
            (``config.modules_to_save``; by default the classifier head); ``head_name``: the first of them, or None.
        active_adapter: the name of the adapter the parameters hold (``"default"``); see `add_adapter`.

    An attribute the wrapper lacks is the backbone's, as PEFT's ``PeftModel`` forwards it to its base model:
    timm's ``pretrained_cfg``, ``default_cfg``, ``num_classes``, ``get_classifier``, ``reset_classifier``,
    ``set_grad_checkpointing``, ``forward_features``, ``forward_head`` (so ``timm.data.resolve_data_config({},
    model=wrapper)`` reads the backbone's mean and std), a Hugging Face model's ``generate``.
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
        refuse_adapted_backbone(backbone)
        self.saved_module_names = saved_modules(backbone, config.modules_to_save, self.target_groups)
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.head_name = self.saved_module_names[0] if self.saved_module_names else None
        for name in self.saved_module_names:
            self.backbone.get_submodule(name).requires_grad_(True)
        self.in_projections, self.hypernets, self.out_projections = self._new_generators()
        # named adapters: the inactive ones' states (on the CPU); the active one lives in the parameters
        self.active_adapter = "default"
        self._adapter_states = SharedStates(default=None)
        saved = {k: v for k, v in self.state_dict().items() if self._is_saved_module_key(k)}
        real = all(type(v) in (torch.Tensor, nn.Parameter) and not v.is_meta for v in saved.values())
        # what `add_adapter` starts the modules trained whole from (none for a model on meta or fake tensors)
        self._initial_saved_state = SharedStates((k, v.detach().to("cpu", copy=True)) for k, v in saved.items()) \
            if real else None

    def _new_generators(self) -> tuple[nn.ModuleDict, nn.ModuleDict, nn.ModuleDict]:
        """Freshly initialised phi, hyper-Transformers and psi (zero) for every target key, on the backbone's device
        in the config's dtype."""
        config = self.config
        in_projections, hypernets, out_projections = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        for group in self.target_groups:
            in_projections[group.key] = nn.Linear(group.in_features, config.rank, bias=config.in_projection_bias)
            hypernets[group.key] = Hypernet(config)
            out_projection = nn.Linear(config.rank, group.in_features, bias=config.out_projection_bias)
            nn.init.zeros_(out_projection.weight)
            if out_projection.bias is not None:
                nn.init.zeros_(out_projection.bias)
            out_projections[group.key] = out_projection
        for container in (in_projections, hypernets, out_projections):
            container.to(device=self._backbone_device(), dtype=config.torch_dtype)
        return in_projections, hypernets, out_projections

    def __getattr__(self, name: str):
        """The backbone's attribute where the wrapper has none (PEFT's ``PeftModel.__getattr__``); dunder names and
        ``backbone`` itself stay the wrapper's (copy and pickle look for them)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            backbone = self.__dict__.get("_modules", {}).get("backbone")
            if backbone is None or name.startswith("__"):
                raise
            return getattr(backbone, name)

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
        """The parameters of the modules trained whole (`saved_module_names`: the classifier head by default)."""
        seen = set()
        for name in self.saved_module_names:
            for p in self.backbone.get_submodule(name).parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def num_gift_parameters(self) -> int:
        return sum(p.numel() for p in self.gift_parameters())

    def num_trainable_parameters(self) -> int:
        """Parameters that receive gradients: the generators and the classifier head."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def parameter_table(self) -> str:
        """A small text table: trainable parameters per group and their share of the backbone. The rows add up to
        the trainable total (parameters made trainable by hand, outside the adapter, in a row of their own)."""
        backbone_total = sum(p.numel() for p in self.backbone.parameters())
        rows = [(f"generator {g.key} ({len(g)} layers {g.out_features}x{g.in_features})",
                 sum(p.numel() for p in self.residual_parameters(g.key))) for g in self.target_groups]
        if not self.saved_module_names:
            rows.append(("head None", 0))
        for name in self.saved_module_names:
            rows.append((f"head {name}" if name == self.head_name else f"saved {name}",
                         sum(p.numel() for p in self.backbone.get_submodule(name).parameters())))
        counted = {id(p) for p in self.gift_parameters()} | {id(p) for p in self.head_parameters()}
        other = sum(p.numel() for p in self.parameters() if p.requires_grad and id(p) not in counted)
        if other:
            rows.append(("other trainable (not saved with the adapter)", other))
        rows.append(("trainable total", self.num_trainable_parameters()))
        frozen = sum(p.numel() for p in self.backbone.parameters() if not p.requires_grad)
        width = max(len(r[0]) for r in rows)
        lines = [
            f"{name:<{width}}  {count:>12,}  {100.0 * count / max(backbone_total, 1):8.4f}%" for name, count in rows
        ]
        lines.append(f"{'backbone (frozen)':<{width}}  {frozen:>12,}")
        return "\n".join(lines)

    def print_trainable_parameters(self) -> None:
        """Print PEFT's one line: ``trainable params: N || all params: M || trainable%: P``."""
        total = sum(p.numel() for p in self.parameters())
        trainable = self.num_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100.0 * trainable / max(total, 1):.4f}")

    def residual_parameters(self, key: str) -> Iterator[nn.Parameter]:
        """The GIFT parameters the residuals of ``key`` are made of (phi, the hyper-Transformer, psi)."""
        for container in (self.in_projections, self.hypernets, self.out_projections):
            yield from container[key].parameters()

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
    def _is_saved_module_key(self, key: str) -> bool:
        return any(key.startswith(f"backbone.{name}.") for name in self.saved_module_names)

    def _is_gift_key(self, key: str) -> bool:
        return key.startswith(GIFT_PREFIXES) or self._is_saved_module_key(key)

    def gift_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """GIFT parameters and the modules trained whole (the head), in the authors' key layout (GIFT_SPEC.md
        section 5)."""
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

    def frozen_state(self) -> dict[str, torch.Tensor] | None:
        """The backbone's state that an adapter does not hold (everything but the modules trained whole), as the
        backbone had it before any merge; None when that is not at hand (merged)."""
        if self.merged:
            return None
        return {k: v for k, v in self.backbone.state_dict().items() if not self._is_saved_module_key("backbone." + k)}

    def save_adapter(self, directory: str | os.PathLike, run: dict | None = None,
                     adapter_name: str | None = None) -> None:
        """Write ``gift_adapter.safetensors`` (GIFT weights and the modules trained whole, `saved_module_names`,
        with the `content_sha256` of its tensors in the file's metadata) and ``gift_config.json``, each atomically
        (temp file, then rename). The frozen backbone is never written; ``run`` (e.g. the timm model name and the
        local pretrained file) is kept in the JSON for tools like ``gift explain``. Without a backbone identity in
        ``run`` (a backbone built in Python), the one `gift.backbones.recorded_identity` reads back from the backbone
        is recorded, for `load_gift_adapter`. ``adapter_name``: another of `adapter_names` than the active one."""
        from safetensors.torch import save_file

        state = self._adapter_state(adapter_name)
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        unsaved = sorted(trainable - set(state))
        if unsaved:
            warnings.warn(f"parameters {unsaved[:5]}{' ...' if len(unsaved) > 5 else ''} are trainable but not part "
                          f"of the adapter, so save_adapter() leaves them out; name their modules in "
                          f"GIFTConfig(modules_to_save=...) to save them.", stacklevel=2)
        run = dict(run or {})
        if "backbone" not in run:
            frozen = self.frozen_state()
            identity = recorded_identity(self.backbone, frozen if frozen is not None else {})
            if frozen is None:
                identity["weights_sha256"] = None
            run["backbone"] = identity
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        checksum = {"format": "pt", WEIGHTS_CHECKSUM: content_sha256(tensors)}
        meta = {"format": "gift-adapter-v1", "config": self.config.to_dict(), "targets": self._target_shapes(),
                "head": self.head_name, "modules_to_save": list(self.saved_module_names),
                "backbone_class": type(self.backbone).__name__, "run": run}
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

    @staticmethod
    def adapter_config(meta: dict) -> GIFTConfig:
        """The `GIFTConfig` an adapter's ``gift_config.json`` (``meta``) was saved with; for one written before
        ``modules_to_save`` existed, the modules it holds (its head, or none) named in ``modules_to_save``."""
        config = dict(meta["config"])
        if "modules_to_save" not in config:
            config["modules_to_save"] = [meta["head"]] if meta.get("head") else []
        return GIFTConfig.from_dict(config)

    @staticmethod
    def adapter_saved_modules(meta: dict) -> list[str]:
        """The names of the modules an adapter holds whole (``modules_to_save``; its head before that existed)."""
        if "modules_to_save" in meta:
            return list(meta["modules_to_save"])
        return [meta["head"]] if meta.get("head") else []

    def _checked_adapter(self, directory: str | os.PathLike) -> dict[str, torch.Tensor]:
        meta = self.read_adapter_config(directory)
        saved = self.adapter_config(meta)
        if not saved.same_generator(self.config):
            raise ValueError(f"Adapter in {os.fspath(directory)!r} was saved with {saved}, but this model has "
                             f"{self.config}. Build the model with GIFTModelBase.adapter_config(<gift_config.json>) "
                             f"(FastGIFT.from_adapter does).")
        if meta["targets"] != self._target_shapes():
            raise ValueError(f"Adapter in {os.fspath(directory)!r} is for targets {meta['targets']} (layers, out, in) "
                             f"but this backbone has {self._target_shapes()}: wrong backbone model.")
        held = self.adapter_saved_modules(meta)
        if held != list(self.saved_module_names):
            raise ValueError(f"Adapter in {os.fspath(directory)!r} holds the modules {held} whole, but this model "
                             f"trains {list(self.saved_module_names)}; build it with "
                             f"GIFTConfig(modules_to_save={tuple(held)!r}).")
        return self.checked_gift_state(self.read_adapter_weights(directory))

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Restore what `save_adapter` wrote, into the active adapter, or (``adapter_name``: a new name) as another
        named adapter, not activated (PEFT's ``load_adapter(..., adapter_name)``; `set_adapter` activates it).
        Raises ``ValueError`` when the adapter was made for another backbone shape, another GIFT config or other
        saved modules, naming both; nothing is loaded then."""
        state = self._checked_adapter(directory)
        if adapter_name is None or adapter_name == self.active_adapter:
            self.load_gift_state_dict(state)
            return
        if adapter_name in self._adapter_states:
            raise ValueError(f"an adapter named {adapter_name!r} exists; delete_adapter({adapter_name!r}) first.")
        self._adapter_states[adapter_name] = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    @classmethod
    def from_adapter(cls, backbone: nn.Module, directory: str | os.PathLike, **kwargs):
        """Build this wrapper around ``backbone`` with the saved config and load the saved weights."""
        model = cls(backbone, cls.adapter_config(cls.read_adapter_config(directory)), **kwargs)
        model.load_adapter(directory)
        return model

    # ------------------------------------------------------------------ named adapters (PEFT-style)
    @property
    def adapter_names(self) -> list[str]:
        """The names of the adapters this model holds; the parameters hold `active_adapter`'s."""
        return list(self._adapter_states)

    def _adapter_state(self, adapter_name: str | None) -> dict[str, torch.Tensor]:
        if adapter_name is None or adapter_name == self.active_adapter:
            return self.gift_state_dict()
        if adapter_name not in self._adapter_states:
            raise KeyError(f"no adapter named {adapter_name!r}; this model has {self.adapter_names}.")
        return self._adapter_states[adapter_name]

    def add_adapter(self, adapter_name: str) -> None:
        """Add a new adapter of this model's config, initialised as a new model's (phi and the hyper-Transformer
        random, psi zero) with the modules trained whole as they were when the backbone was wrapped; not
        activated (`set_adapter`). One config for all adapters of a model: a GIFT model of another config is
        another model."""
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}.")
        if adapter_name in self._adapter_states:
            raise ValueError(f"an adapter named {adapter_name!r} exists; delete_adapter({adapter_name!r}) first.")
        if self._initial_saved_state is None:
            raise RuntimeError("this model was built on meta or fake tensors: it has no weights to start an adapter "
                               "from.")
        state = dict(self._initial_saved_state)
        for prefix, container in zip(GIFT_PREFIXES, self._new_generators()):
            state.update({prefix + k: v.detach().to("cpu") for k, v in container.state_dict().items()})
        self._adapter_states[adapter_name] = {k: state[k] for k in self.gift_state_dict()}

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter: its weights go into the parameters (a merged model merges it,
        as `load_gift_state_dict` does), the active one's are kept under its name."""
        if adapter_name == self.active_adapter:
            return
        state = self._adapter_state(adapter_name)
        current = {k: v.detach().to("cpu", copy=True) for k, v in self.gift_state_dict().items()}
        self.load_gift_state_dict(state)
        self._adapter_states[self.active_adapter] = current
        self._adapter_states[adapter_name] = None
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Forget the adapter ``adapter_name`` (not the active one: `set_adapter` to another first)."""
        if adapter_name == self.active_adapter:
            raise ValueError(f"{adapter_name!r} is the active adapter; set_adapter() to another before deleting it.")
        self._adapter_state(adapter_name)  # KeyError naming the adapters for an unknown name
        del self._adapter_states[adapter_name]

    def extra_repr(self) -> str:
        groups = ", ".join(f"{g.key}: {len(g)}x({g.out_features}x{g.in_features})" for g in self.target_groups)
        return f"block={self.config.block}, rank={self.config.rank}, targets=[{groups}]"
