"""Small timm ViTs registered by gift (``import gift`` makes them visible to ``timm.create_model``).

``gift_vit_micro_patch4_32``: 32x32 inputs, 4x4 patches (64 tokens + CLS), width 96, depth 4,
3 heads: the demo's model, quick to pretrain and fine-tune on a 2-core CPU.
"""
from __future__ import annotations

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer


@register_model
def gift_vit_micro_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    if pretrained:
        raise ValueError("gift_vit_micro_patch4_32 has no hub weights; pass --pretrained-file with a local file.")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's loader options: no hub here
        kwargs.pop(key, None)
    args = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0)
    args.update(kwargs)
    model = VisionTransformer(**args)
    model.pretrained_cfg = {"input_size": (3, args["img_size"], args["img_size"]), "mean": (0.5, 0.5, 0.5),
                            "std": (0.5, 0.5, 0.5), "num_classes": model.num_classes, "architecture": "gift_vit_micro_patch4_32"}
    return model
