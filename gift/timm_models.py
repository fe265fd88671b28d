"""Small timm ViTs registered by gift (`gift.backbones` imports this module, so that
``timm.create_model`` knows them), built the timm way: ``build_model_with_cfg`` with a default
pretrained config and timm's ViT checkpoint filter, so that a local weights file loads through
``pretrained_cfg_overlay=dict(file=...)`` like any timm model's.

``gift_vit_micro_patch4_32``: 32x32 inputs, 4x4 patches (64 tokens + CLS), width 96, depth 4,
3 heads: the demo's model, quick to pretrain and fine-tune on a CPU. It has no hub weights.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

default_cfgs = generate_default_cfgs({
    # no url and no hub id: weights come from a local file only; num_classes is that of no weights at all
    "gift_vit_micro_patch4_32": dict(url="", num_classes=0, input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5),
                                     std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=1.0,
                                     first_conv="patch_embed.proj", classifier="head"),
})


@register_model
def gift_vit_micro_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    args = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0)
    args.update(kwargs)
    overlay = dict(args.pop("pretrained_cfg_overlay", None) or {})
    overlay.setdefault("input_size", (3, args["img_size"], args["img_size"]))  # the size it was built for
    return build_model_with_cfg(VisionTransformer, "gift_vit_micro_patch4_32", pretrained,
                                pretrained_cfg_overlay=overlay, pretrained_filter_fn=checkpoint_filter_fn, **args)
