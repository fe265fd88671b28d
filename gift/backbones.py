"""timm backbones for GIFT: creation by name with local or hub pretrained weights (both through
timm's own loader: ``pretrained_cfg_overlay=dict(state_dict=...)`` for a local file), the input a model
expects (timm's ``resolve_model_data_config``), and the *backbone identity* an adapter records so
that it is only ever used on the exact backbone it was trained on.

The identity (a JSON-able dict) names the timm model and its keyword arguments and says where the
frozen weights came from: a local file (its name, path and SHA-256), timm's hub (the pretrained tag),
or a random initialisation (the seed of ``torch.manual_seed`` right before ``timm.create_model``).
`rebuild_backbone` makes exactly that backbone again or raises, naming what is missing.

Library code: plain exceptions (``ValueError``, ``FileNotFoundError``, `PretrainedUnavailable`).
"""
from __future__ import annotations

import difflib
import os
from typing import Any, NamedTuple

import timm
import torch
import torch.nn as nn
from timm.data import resolve_model_data_config
from timm.models import get_pretrained_cfg

from . import timm_models  # noqa: F401  (registers the gift_* models with timm)
from .files import file_sha256, read_state_dict
from .targets import classifier_name

IDENTITY_FORMAT = "gift-backbone-v1"
# names this module had before the library was layered, and their homes now (in layers above this module,
# which therefore cannot re-export them)
MOVED = {
    "load_gift_adapter": "gift.adapters.load_gift_adapter",
    "lora_model": "gift.lora.lora_model (its rank parameter is now named lora_rank)",
    "save_lora_adapter": "gift.lora.save_lora_adapter",
    "load_lora_adapter": "gift.lora.load_lora_adapter",
    "LORA_RUN": "gift.lora.LORA_RUN",
    "read_weights": "gift.files.read_state_dict(path, unwrap=('state_dict', 'model'))",
    "load_pretrained": "gift.backbones.create_backbone(name, num_classes, pretrained_file=path)",
}


def __getattr__(name: str):
    if name in MOVED:
        raise ImportError(f"gift.backbones.{name} has moved: use {MOVED[name]}", name=name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class PretrainedUnavailable(RuntimeError):
    """timm could not fetch a model's pretrained weights (offline, or no weights for that name)."""


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` (with close names) when timm does not know ``name``."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (any timm model name works, e.g. vit_small_patch16_224)")


def hub_weights_name(name: str) -> str:
    """What timm would download for ``name`` with ``pretrained=True``: the hub id and file, or the URL."""
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return f"weights for {name}"
    if getattr(cfg, "hf_hub_id", None):
        filename = getattr(cfg, "hf_hub_filename", None) or "model.safetensors"
        return f"hf-hub:{cfg.hf_hub_id} ({filename})"
    if getattr(cfg, "url", None):
        return cfg.url
    return f"weights for {name}"


def create_backbone(name: str, num_classes: int, drop_path: float = 0.0, pretrained_file: str | None = None,
                    pretrained: bool = False) -> nn.Module:
    """``timm.create_model(name, num_classes=..., drop_path_rate=...)`` with weights from a local file
    (``pretrained_file``, `load_pretrained_file`), from timm's hub (``pretrained``), or random (the
    current torch RNG)."""
    check_model_name(name)
    if pretrained and pretrained_file:
        raise ValueError("give either pretrained=True (timm's hub) or a pretrained file, not both")
    if pretrained_file:
        return load_pretrained_file(name, num_classes, drop_path, pretrained_file)
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, num_classes=num_classes, drop_path_rate=drop_path)
        except Exception as e:  # huggingface_hub / urllib raise many types when offline
            raise PretrainedUnavailable(
                f"could not get the pretrained weights of {name} from timm's hub ({type(e).__name__}); timm wanted "
                f"{hub_weights_name(name)}: fetch it where you are online and pass --pretrained-file FILE") from None
    return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path)


def load_pretrained_file(name: str, num_classes: int, drop_path: float, path: str) -> nn.Module:
    """The timm model ``name`` with the weights of the local state dict ``path``: read by
    `gift.files.read_state_dict` (``state_dict`` / ``model`` unwrapped; an EMA copy beside them is not
    taken), the keys the model does not have dropped, then loaded by timm's loader
    (``pretrained_cfg_overlay=dict(state_dict=...)``, the model's checkpoint filter applied). The file's
    classifier is used when it has ``num_classes`` outputs, else left as initialised (the current torch RNG).

    Raises ``ValueError`` naming the file when it lacks weights of the model or has misshapen ones (a
    position embedding of another image size too: create the model at the file's size instead).
    """
    state = read_state_dict(path, what="pretrained file", unwrap=("state_dict", "model"))
    with torch.device("meta"):
        own = timm.create_model(name, pretrained=False, num_classes=num_classes)
    own_state = own.state_dict()
    head = classifier_name(own)
    head_keys = {k for k in own_state if head is not None and k.startswith(head + ".")}
    misshapen = [k for k in own_state if k in state and k not in head_keys
                 and tuple(getattr(state[k], "shape", ())) != tuple(own_state[k].shape)]
    missing = [k for k in own_state if k not in state and k not in head_keys]
    if misshapen or missing:
        details = "; ".join([f"{k}: file {tuple(state[k].shape)} vs model {tuple(own_state[k].shape)}"
                             for k in misshapen[:5]] + ([f"missing {missing[:5]}"] if missing else []))
        raise ValueError(f"pretrained file {path!r} does not fit {type(own).__name__} ({details}); "
                         f"is it for another model or size?")
    state = {k: v for k, v in state.items() if k in own_state}
    file_head = state.get(f"{head}.weight")
    overlay = dict(state_dict=state, num_classes=file_head.shape[0] if file_head is not None else -1)
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, drop_path_rate=drop_path,
                                  pretrained_cfg_overlay=overlay)
    except RuntimeError as e:  # torch's load_state_dict: a classifier weight and bias of different sizes
        details = "; ".join(line.strip() for line in str(e).splitlines()[1:6] if line.strip())
        raise ValueError(f"pretrained file {path!r} does not fit {type(own).__name__} ({details}); "
                         f"is it for another model or size?") from None
    model.pretrained_cfg.pop("state_dict", None)  # the config outlives the load: keep no second copy of the weights
    return model


class DataConfig(NamedTuple):
    """What a model expects of its input (timm's ``resolve_model_data_config``): ``input_size`` (C, H, W)
    and the per-channel ``mean`` and ``std`` of its normalisation."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def data_config(model: nn.Module) -> DataConfig:
    """The `DataConfig` of a timm model (of its ``pretrained_cfg``; timm's defaults for others)."""
    cfg = resolve_model_data_config(model)
    return DataConfig(tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]))


# ------------------------------------------------------------------------------------ identity
def backbone_identity(name: str, num_classes: int, drop_path: float, seed: int, pretrained_file: str | None = None,
                      pretrained: bool = False) -> dict[str, Any]:
    """The record `rebuild_backbone` needs: what `create_backbone` was called with, right after
    ``torch.manual_seed(seed)``, and the SHA-256 of the pretrained file. Hub weights are pinned by
    their pretrained tag (``name.tag``), so a later timm with another default tag gives the same ones."""
    if pretrained and "." not in name:
        cfg = get_pretrained_cfg(name)
        name = f"{name}.{cfg.tag}" if cfg is not None and cfg.tag else name
    identity = {
        "format": IDENTITY_FORMAT,
        "timm_name": name,
        "kwargs": {"num_classes": int(num_classes), "drop_path_rate": float(drop_path)},
        "init_seed": int(seed),
        "pretrained": "hub" if pretrained else ("file" if pretrained_file else "random"),
    }
    if pretrained_file:
        identity.update(
            pretrained_file=os.path.basename(pretrained_file),
            pretrained_path=os.path.abspath(pretrained_file),
            pretrained_sha256=file_sha256(pretrained_file),
        )
    return identity


def seeded_backbone(identity: dict[str, Any], pretrained_file: str | None = None) -> nn.Module:
    """`create_backbone` as the identity says, right after ``torch.manual_seed(identity['init_seed'])``
    (the caller's RNG is left as it is; the caller's own RNG state must not matter)."""
    kwargs = identity["kwargs"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(identity["init_seed"])
        return create_backbone(identity["timm_name"], kwargs["num_classes"], kwargs["drop_path_rate"],
                               pretrained_file, identity["pretrained"] == "hub")


def rebuild_backbone(identity: dict[str, Any], pretrained_file: str | None = None) -> nn.Module:
    """Exactly the backbone ``identity`` describes. A pretrained file is taken from ``pretrained_file``
    or else from the recorded path, and must have the recorded SHA-256.

    Raises ``FileNotFoundError`` naming the file when it is nowhere to be found, ``ValueError`` when
    the given file is another one, `PretrainedUnavailable` when timm's hub cannot be reached.
    """
    if not isinstance(identity, dict) or identity.get("format") != IDENTITY_FORMAT:
        raise ValueError("the adapter records no backbone identity (written by an older gift); "
                         "retrain it, or build the backbone yourself and use FastGIFT.from_adapter")
    if identity["pretrained"] != "file":
        if pretrained_file:
            raise ValueError(f"the adapter was trained on a {identity['pretrained']} backbone "
                             f"({identity['timm_name']}), not on a pretrained file; drop --pretrained-file")
        return seeded_backbone(identity)
    path = pretrained_file or identity["pretrained_path"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the adapter's backbone weights {identity['pretrained_file']!r} (sha256 "
                                f"{identity['pretrained_sha256'][:12]}...) are not at {path!r}; "
                                f"pass --pretrained-file with that file")
    sha = file_sha256(path)
    if sha != identity["pretrained_sha256"]:
        raise ValueError(f"{path!r} (sha256 {sha[:12]}...) is not the file the adapter was trained on: "
                         f"{identity['pretrained_file']!r} (sha256 {identity['pretrained_sha256'][:12]}...)")
    return seeded_backbone(identity, path)
