"""Loading what `gift finetune` saved, in one place: a GIFT adapter (`load_gift_adapter`) or any
adapter folder, GIFT or PEFT LoRA, told apart by its files (`load_adapter`), each on exactly the
backbone it was trained on (its recorded identity, `gift.backbones.rebuild_backbone`)."""
from __future__ import annotations

import os

import torch.nn as nn

from .backbones import check_weights, rebuild_backbone
from .fast import FastGIFT
from .lora import LORA_CONFIG, load_lora_adapter
from .wrapper import ADAPTER_CONFIG, GIFTModelBase


def load_gift_adapter(directory: str, pretrained_file: str | None = None, backbone: nn.Module | None = None,
                      **fast_kwargs) -> FastGIFT:
    """A `FastGIFT` on exactly the backbone the adapter in ``directory`` was trained on, with the adapter
    loaded: any adapter `save_adapter` wrote, from ``gift finetune`` or from a backbone built in Python (rebuilt
    from what it records: the timm name, the constructor arguments it could read back, the local weights file
    and a digest of the frozen weights, `gift.backbones.recorded_identity`).

    ``backbone``: the backbone to load the adapter on, where the adapter cannot rebuild it (the error says
    what it does not know); checked against the recorded weights digest when there is one.
    Raises as `rebuild_backbone` does, and ``ValueError`` when the adapter does not fit that backbone."""
    meta = GIFTModelBase.read_adapter_config(directory)
    identity = meta.get("run", {}).get("backbone")
    if backbone is None:
        backbone, what = rebuild_backbone(identity, pretrained_file), "the rebuilt backbone"
    else:
        what = f"the given {type(backbone).__name__}"
    if isinstance(identity, dict):
        held = tuple(GIFTModelBase.adapter_saved_modules(meta))
        frozen = {k: v for k, v in backbone.state_dict().items() if not any(k.startswith(m + ".") for m in held)}
        check_weights(identity, frozen, what)
    return FastGIFT.from_adapter(backbone, directory, **fast_kwargs)


def load_adapter(directory: str, pretrained_file: str | None = None) -> tuple[nn.Module, nn.Module, dict]:
    """A GIFT (``gift_config.json``) or PEFT LoRA (``adapter_config.json``) adapter folder on its recorded
    backbone, in eval mode: ``(model, backbone, run record)``. Raises ``FileNotFoundError`` when
    ``directory`` is neither, ``ImportError`` naming ``gift[lora]`` for a LoRA adapter without peft."""
    if os.path.isfile(os.path.join(directory, ADAPTER_CONFIG)):
        model = load_gift_adapter(directory, pretrained_file).eval()
        return model, model.backbone, model.read_adapter_config(directory).get("run", {})
    if os.path.isfile(os.path.join(directory, LORA_CONFIG)):
        try:
            import peft  # noqa: F401  (only whether it imports: the error below names the extra)
        except ImportError:
            raise ImportError("a LoRA adapter needs peft, which is not installed: pip install 'gift[lora]'") from None
        model, run = load_lora_adapter(directory, pretrained_file)
        return model.eval(), model.get_base_model(), run
    raise FileNotFoundError(f"{directory!r} holds no {ADAPTER_CONFIG} (GIFT) or {LORA_CONFIG} (LoRA): it does not "
                            f"exist or is not an adapter folder written by gift finetune")
