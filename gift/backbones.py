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
from .files import content_sha256, file_sha256, read_state_dict
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
                    pretrained: bool = False, **model_kwargs) -> nn.Module:
    """``timm.create_model(name, num_classes=..., drop_path_rate=..., **model_kwargs)`` with weights from a local
    file (``pretrained_file``, `load_pretrained_file`), from timm's hub (``pretrained``), or random (the
    current torch RNG)."""
    check_model_name(name)
    if pretrained and pretrained_file:
        raise ValueError("give either pretrained=True (timm's hub) or a pretrained file, not both")
    if pretrained_file:
        return load_pretrained_file(name, num_classes, drop_path, pretrained_file, **model_kwargs)
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, num_classes=num_classes, drop_path_rate=drop_path,
                                     **model_kwargs)
        except Exception as e:  # huggingface_hub / urllib raise many types when offline
            raise PretrainedUnavailable(
                f"could not get the pretrained weights of {name} from timm's hub ({type(e).__name__}); timm wanted "
                f"{hub_weights_name(name)}: fetch it where you are online and pass --pretrained-file FILE") from None
    return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path, **model_kwargs)


def load_pretrained_file(name: str, num_classes: int, drop_path: float, path: str, **model_kwargs) -> nn.Module:
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
        own = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
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
                                  pretrained_cfg_overlay=overlay, **model_kwargs)
    except RuntimeError as e:  # torch's load_state_dict: a classifier weight and bias of different sizes
        details = "; ".join(line.strip() for line in str(e).splitlines()[1:6] if line.strip())
        raise ValueError(f"pretrained file {path!r} does not fit {type(own).__name__} ({details}); "
                         f"is it for another model or size?") from None
    model.pretrained_cfg.pop("state_dict", None)  # the config outlives the load: keep no second copy of the weights
    model.pretrained_cfg["file"] = os.path.abspath(path)  # where the weights came from, as timm's file overlay says
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
    (the caller's RNG is left as it is; the caller's own RNG state must not matter); an identity recorded from a
    backbone built in Python (`recorded_identity`) has no seed: its weights are checked by their digest instead."""
    kwargs = dict(identity["kwargs"])
    num_classes, drop_path = kwargs.pop("num_classes"), kwargs.pop("drop_path_rate")
    if isinstance(kwargs.get("img_size"), list):
        kwargs["img_size"] = tuple(kwargs["img_size"])
    with torch.random.fork_rng(devices=[]):
        if identity["init_seed"] is not None:
            torch.manual_seed(identity["init_seed"])
        return create_backbone(identity["timm_name"], num_classes, drop_path, pretrained_file,
                               identity["pretrained"] == "hub", **kwargs)


# what `recorded_identity` reads back from a timm model: the constructor arguments its attributes keep
RECORDED_ATTRIBUTES = ("img_size", "global_pool", "dynamic_img_size")


def weights_digest(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> str | None:
    """`gift.files.content_sha256` of the tensors of ``state`` (floating tensors cast to ``dtype`` when given), or
    None when one is not a plain tensor (a quantized weight)."""
    if any(type(t) is not torch.Tensor and not isinstance(t, nn.Parameter) for t in state.values()):
        return None
    cast = {k: t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()
            for k, t in state.items()}
    return content_sha256(cast)


def frozen_dtype(state: dict[str, torch.Tensor]) -> str | None:
    """The dtype of the floating tensors of ``state`` when they share one (``"float32"``), else None."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else None


def recorded_identity(backbone: nn.Module, frozen_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The identity of a backbone built in Python (no ``run`` given to ``save_adapter``), as far as it can be read
    back: the timm model name and the constructor arguments its attributes keep (`RECORDED_ATTRIBUTES`, checked by
    building the model on the meta device: the same parameter names and shapes), the local file its weights came
    from (timm's ``pretrained_cfg["file"]``, as ``pretrained_cfg_overlay=dict(file=...)`` or `create_backbone`
    leave it) with its SHA-256, and a digest of ``frozen_state`` (what the adapter does not hold). Where the backbone
    cannot be rebuilt, ``pretrained`` is ``"unknown"`` and ``missing`` says what is not known."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    dtype = frozen_dtype(frozen_state)
    identity: dict[str, Any] = {"format": IDENTITY_FORMAT, "timm_name": name, "init_seed": None,
                                "weights_dtype": dtype, "weights_sha256": weights_digest(frozen_state)}
    if not isinstance(name, str) or not timm.is_model(name):
        return {**identity, "pretrained": "unknown",
                "missing": f"the model: {type(backbone).__name__} is not a timm model gift can build by name"}
    kwargs: dict[str, Any] = {"num_classes": int(getattr(backbone, "num_classes", 0)), "drop_path_rate": 0.0}
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        kwargs["img_size"] = list(patch_embed.img_size)
    if isinstance(getattr(backbone, "global_pool", None), str):
        kwargs["global_pool"] = backbone.global_pool
    if getattr(backbone, "dynamic_img_size", False) is True:
        kwargs["dynamic_img_size"] = True
    identity["kwargs"] = kwargs
    rebuilt_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items() if k != "drop_path_rate"}
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in timm.create_model(name, **rebuilt_kwargs).state_dict().items()}
    except Exception as e:  # timm raises many types for arguments a model does not take
        shapes = {"": (type(e).__name__,)}
    own = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    if shapes != own:
        return {**identity, "pretrained": "unknown",
                "missing": f"its constructor arguments: timm.create_model({name!r}, {_call_text(rebuilt_kwargs)}) "
                           f"has other parameters than this backbone, which was built with arguments gift cannot "
                           f"read back"}
    path = cfg.get("file")
    if not isinstance(path, str) or not os.path.isfile(path):
        return {**identity, "pretrained": "unknown",
                "missing": f"where its weights came from: {name} was not loaded from a local file (timm's "
                           f"pretrained_cfg_overlay=dict(file=...)), so its weights may be timm's hub weights, "
                           f"random or changed in Python"}
    return {**identity, "pretrained": "file", "pretrained_file": os.path.basename(path),
            "pretrained_path": os.path.abspath(path), "pretrained_sha256": file_sha256(path)}


def _call_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def check_weights(identity: dict[str, Any], frozen_state: dict[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` when ``frozen_state`` (of ``what``, e.g. "the rebuilt backbone") is not the one whose
    digest ``identity`` records (cast to the recorded dtype first); nothing to check when none is recorded."""
    want = identity.get("weights_sha256")
    if want is None:
        return
    dtype = identity.get("weights_dtype")
    got = weights_digest(frozen_state, getattr(torch, dtype) if dtype else None)
    if got is not None and got != want:
        raise ValueError(f"{what} does not have the frozen weights the adapter was trained on (weights digest "
                         f"{got[:12]}... vs {want[:12]}... recorded): another file, other weights or another model")


def rebuild_backbone(identity: dict[str, Any], pretrained_file: str | None = None) -> nn.Module:
    """Exactly the backbone ``identity`` describes. A pretrained file is taken from ``pretrained_file``
    or else from the recorded path, and must have the recorded SHA-256 (the weights digest of an identity recorded
    from a backbone built in Python is checked by the caller, `check_weights`, on what the adapter does not hold).

    Raises ``FileNotFoundError`` naming the file when it is nowhere to be found, ``ValueError`` when
    the given file is another one or the identity says what it does not know (a backbone built in Python from
    other than a local file: pass it yourself), `PretrainedUnavailable` when timm's hub cannot be reached.
    """
    if not isinstance(identity, dict) or identity.get("format") != IDENTITY_FORMAT:
        raise ValueError("the adapter records no backbone identity (save_adapter() was given a run record without "
                         "one, or an older gift wrote it): pass the backbone it was trained on, "
                         "load_gift_adapter(directory, backbone=...) or FastGIFT.from_adapter(backbone, directory)")
    if identity["pretrained"] == "unknown":
        raise ValueError(f"the adapter's backbone ({identity.get('timm_name') or 'not a timm model'}) was built in "
                         f"Python and cannot be rebuilt: the adapter does not know {identity['missing']}. Pass the "
                         f"backbone it was trained on: load_gift_adapter(directory, backbone=...) or "
                         f"FastGIFT.from_adapter(backbone, directory)")
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
