"""The PEFT LoRA baseline on the layers GIFT adapts, and its adapter folder: PEFT's own files plus the
run record (with the backbone identity, `gift.backbones`) in ``gift_run.json``. Needs ``gift[lora]``
(peft), imported where it is used."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch.nn as nn

from .backbones import rebuild_backbone
from .files import TMP_PREFIX, atomic_write, atomic_write_json, file_sha256
from .targets import classifier_name

LORA_RUN = "gift_run.json"
#: the key of ``gift_run.json`` with the SHA-256 of each of PEFT's files
FILES_SHA256 = "files_sha256"
#: the file PEFT writes beside its weights; it tells a LoRA adapter folder from a GIFT one
LORA_CONFIG = "adapter_config.json"


def lora_model(backbone: nn.Module, lora_rank: int, target_modules=("attn.proj",)) -> nn.Module:
    """PEFT LoRA of rank ``lora_rank`` on the same layers GIFT adapts (alpha = rank, no dropout), the
    classifier head trained."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0, target_modules=list(target_modules),
                     modules_to_save=[classifier_name(backbone)])
    return get_peft_model(backbone, cfg)


def save_lora_adapter(model, directory: str, run: dict) -> None:
    """PEFT's ``save_pretrained`` (``adapter_model.safetensors``, ``adapter_config.json``) plus ``run``
    (with the backbone identity) and the SHA-256 of PEFT's files in ``gift_run.json``; each file replaced
    atomically."""
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(dir=directory, prefix=TMP_PREFIX)
    try:
        model.save_pretrained(staging)
        checksums = {name: file_sha256(os.path.join(staging, name)) for name in sorted(os.listdir(staging))}
        for name in checksums:
            atomic_write(
                os.path.join(directory, name), lambda tmp, n=name: shutil.copyfile(os.path.join(staging, n), tmp)
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(os.path.join(directory, LORA_RUN), {**run, FILES_SHA256: checksums}, sort_keys=True)


def load_lora_adapter(directory: str, pretrained_file: str | None = None):
    """A PEFT LoRA model on exactly the backbone the adapter in ``directory`` was trained on; returns
    ``(model, run)``. Raises as `gift.backbones.rebuild_backbone` does."""
    from peft import PeftModel

    path = os.path.join(directory, LORA_RUN)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path!r} does not exist: is {directory!r} a LoRA adapter folder written by gift finetune?"
        )
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r} is damaged: not valid JSON ({e})") from None
    for name, recorded in run.pop(FILES_SHA256, {}).items():  # adapters saved before the checksums have none
        file = os.path.join(directory, name)
        if os.path.isfile(file) and file_sha256(file) != recorded:
            raise ValueError(f"{file!r} is damaged: it does not match the checksum in {LORA_RUN} (a flipped bit or "
                             f"a partial copy); restore it from a copy (a gift finetune run writes it again from its "
                             f"checkpoint.pt with --resume)")
    backbone = rebuild_backbone(run.get("backbone"), pretrained_file)
    return PeftModel.from_pretrained(backbone, directory), run
