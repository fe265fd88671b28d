"""timm backbones for GIFT: creation by name, local or hub pretrained weights, the PEFT LoRA
baseline, and the *backbone identity* an adapter records so that it is only ever used on the exact
backbone it was trained on.

The identity (a JSON-able dict) names the timm model and its keyword arguments and says where the
frozen weights came from: a local file (its name, path and SHA-256), timm's hub (the pretrained tag),
or a random initialisation (the seed of ``torch.manual_seed`` right before ``timm.create_model``).
`rebuild_backbone` makes exactly that backbone again or raises, naming what is missing.

Library code: plain exceptions (``ValueError``, ``FileNotFoundError``, `PretrainedUnavailable`).
"""
from __future__ import annotations

import difflib
import hashlib
import os
from typing import Any

import torch
import torch.nn as nn

from .base import classifier_name

IDENTITY_FORMAT = "gift-backbone-v1"


class PretrainedUnavailable(RuntimeError):
    """timm could not fetch a model's pretrained weights (offline, or no weights for that name)."""


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` (with close names) when timm does not know ``name``."""
    import timm

    from . import models  # noqa: F401  (registers the gift_* models with timm)

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (any timm model name works, e.g. vit_small_patch16_224)")


def hub_weights_name(name: str) -> str:
    """What timm would download for ``name`` with ``pretrained=True``: the hub id and file, or the URL."""
    from timm.models import get_pretrained_cfg

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
    (``pretrained_file``), from timm's hub (``pretrained``), or random (the current torch RNG)."""
    import timm

    check_model_name(name)
    if pretrained and pretrained_file:
        raise ValueError("give either pretrained=True (timm's hub) or a pretrained file, not both")
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, num_classes=num_classes, drop_path_rate=drop_path)
        except Exception as e:  # huggingface_hub / urllib raise many types when offline
            raise PretrainedUnavailable(
                f"could not get the pretrained weights of {name} from timm's hub ({type(e).__name__}); timm wanted "
                f"{hub_weights_name(name)}: fetch it where you are online and pass --pretrained-file FILE") from None
    backbone = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path)
    if pretrained_file:
        load_pretrained(backbone, pretrained_file)
    return backbone


def read_weights(path: str) -> dict:
    """A state dict from ``.safetensors`` or a torch file (``{"state_dict": ...}`` / ``{"model": ...}`` unwrapped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read pretrained file {path!r}: {type(e).__name__}: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_pretrained(backbone: nn.Module, path: str) -> None:
    """Load a local timm state dict into ``backbone``; a classifier of another size is left as initialised."""
    state = read_weights(path)
    own = backbone.state_dict()
    head = classifier_name(backbone)
    head_keys = {k for k in own if head is not None and k.startswith(head + ".")}
    misshapen = [k for k in state if k in own and state[k].shape != own[k].shape and k not in head_keys]
    missing = [k for k in own if k not in state and k not in head_keys]
    if misshapen or missing:
        details = "; ".join([f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in misshapen[:5]]
                            + ([f"missing {missing[:5]}"] if missing else []))
        raise ValueError(f"pretrained file {path!r} does not fit {type(backbone).__name__} ({details}); "
                         f"is it for another model or size?")
    state = {k: v for k, v in state.items() if k in own and not (k in head_keys and v.shape != own[k].shape)}
    backbone.load_state_dict(state, strict=False)


def lora_model(backbone: nn.Module, rank: int, target_modules=("attn.proj",)) -> nn.Module:
    """PEFT LoRA on the same layers GIFT adapts (alpha = rank, no dropout), the classifier head trained."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(target_modules),
                     modules_to_save=[classifier_name(backbone)])
    return get_peft_model(backbone, cfg)


# ------------------------------------------------------------------------------------ identity
def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def backbone_identity(name: str, num_classes: int, drop_path: float, seed: int, pretrained_file: str | None = None,
                      pretrained: bool = False) -> dict[str, Any]:
    """The record `rebuild_backbone` needs: what `create_backbone` was called with, right after
    ``torch.manual_seed(seed)``, and the SHA-256 of the pretrained file. Hub weights are pinned by
    their pretrained tag (``name.tag``), so a later timm with another default tag gives the same ones."""
    if pretrained and "." not in name:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        name = f"{name}.{cfg.tag}" if cfg is not None and cfg.tag else name
    identity = {"format": IDENTITY_FORMAT, "timm_name": name,
                "kwargs": {"num_classes": int(num_classes), "drop_path_rate": float(drop_path)},
                "init_seed": int(seed), "pretrained": "hub" if pretrained else ("file" if pretrained_file else "random")}
    if pretrained_file:
        identity.update(pretrained_file=os.path.basename(pretrained_file), pretrained_path=os.path.abspath(pretrained_file),
                        pretrained_sha256=file_sha256(pretrained_file))
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


LORA_RUN = "gift_run.json"


def save_lora_adapter(model, directory: str, run: dict) -> None:
    """PEFT's ``save_pretrained`` (``adapter_model.safetensors``, ``adapter_config.json``) plus ``run``
    (with the backbone identity) in ``gift_run.json``; each file replaced atomically."""
    import json
    import shutil
    import tempfile

    from .base import atomic_write

    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(dir=directory, prefix=".tmp-")
    try:
        model.save_pretrained(staging)
        for name in os.listdir(staging):
            atomic_write(os.path.join(directory, name), lambda tmp, n=name: shutil.copyfile(os.path.join(staging, n), tmp))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(run, f, indent=2, sort_keys=True)

    atomic_write(os.path.join(directory, LORA_RUN), write_json)


def load_lora_adapter(directory: str, pretrained_file: str | None = None):
    """A PEFT LoRA model on exactly the backbone the adapter in ``directory`` was trained on; returns
    ``(model, run)``. Raises as `rebuild_backbone` does."""
    import json

    from peft import PeftModel

    path = os.path.join(directory, LORA_RUN)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist: is {directory!r} a LoRA adapter folder written by gift finetune?")
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    backbone = rebuild_backbone(run.get("backbone"), pretrained_file)
    return PeftModel.from_pretrained(backbone, directory), run


def load_gift_adapter(directory: str, pretrained_file: str | None = None, **fast_kwargs):
    """A `FastGIFT` on exactly the backbone the adapter in ``directory`` was trained on (its recorded
    identity, `rebuild_backbone`), with the adapter loaded. Raises as `rebuild_backbone` does, and
    ``ValueError`` when the adapter does not fit that backbone."""
    from .base import GIFTModelBase
    from .fast import FastGIFT

    meta = GIFTModelBase.read_adapter_config(directory)
    backbone = rebuild_backbone(meta.get("run", {}).get("backbone"), pretrained_file)
    return FastGIFT.from_adapter(backbone, directory, **fast_kwargs)
