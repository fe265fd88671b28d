"""gift.backbones: a local weights file loads through timm's own loader, and what a model expects."""
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

import gift.backbones
from gift.backbones import create_backbone, data_config

MICRO = "gift_vit_micro_patch4_32"


def _save(model, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_a_local_file_loads_with_its_head_when_it_fits_and_without_it_when_not(tmp_path):
    torch.manual_seed(1)
    source = create_backbone(MICRO, 4)
    path = _save(source, tmp_path / "w.safetensors")
    same = create_backbone(MICRO, 4, pretrained_file=path)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in same.state_dict().items())
    other = create_backbone(MICRO, 7, pretrained_file=path)
    assert other.head.weight.shape == (7, 96)
    kept = {k: v for k, v in other.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in kept.items())


def test_a_file_of_another_width_or_with_keys_missing_is_named(tmp_path):
    narrow = _save(create_backbone(MICRO, 4).__class__(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                                       num_classes=4), tmp_path / "narrow.safetensors")
    with pytest.raises(ValueError, match=r"narrow.safetensors' does not fit VisionTransformer \(cls_token: file "
                                         r"\(1, 1, 48\) vs model \(1, 1, 96\)"):
        create_backbone(MICRO, 4, pretrained_file=narrow)
    torch.save({"patch_embed.proj.weight": torch.zeros(96, 3, 4, 4)}, tmp_path / "part.pth")
    with pytest.raises(ValueError, match=r"does not fit VisionTransformer \(missing \['cls_token'"):
        create_backbone(MICRO, 4, pretrained_file=str(tmp_path / "part.pth"))


def test_a_file_is_read_as_before_the_ema_copy_beside_its_weights_and_keys_the_model_lacks_ignored(tmp_path):
    torch.manual_seed(1)
    weights = create_backbone(MICRO, 4).state_dict()
    ema = {k: v + 1 for k, v in weights.items()}
    torch.save({"state_dict": weights, "state_dict_ema": ema, "epoch": 3}, tmp_path / "train.pth")
    loaded = create_backbone(MICRO, 4, pretrained_file=str(tmp_path / "train.pth")).state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in loaded.items())
    torch.save({"model": {**weights, "extra.buffer": torch.zeros(3)}}, tmp_path / "extra.pth")
    loaded = create_backbone(MICRO, 4, pretrained_file=str(tmp_path / "extra.pth")).state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in loaded.items())


def test_a_file_for_another_image_size_is_refused_not_resampled(tmp_path):
    small = _save(timm.create_model(MICRO, num_classes=4, img_size=16), tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match=r"\(pos_embed: file \(1, 17, 96\) vs model \(1, 65, 96\)\)"):
        create_backbone(MICRO, 4, pretrained_file=small)


def test_data_config_is_timms_for_the_micro_vit_at_any_size():
    assert data_config(create_backbone(MICRO, 4)) == ((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with torch.device("meta"):
        assert data_config(timm.create_model(MICRO, img_size=64)).input_size == (3, 64, 64)


@pytest.mark.parametrize("name, home", [("load_gift_adapter", "gift.adapters.load_gift_adapter"),
                                        ("lora_model", "gift.lora.lora_model (its rank parameter is now named "
                                                       "lora_rank)"),
                                        ("load_lora_adapter", "gift.lora.load_lora_adapter")])
def test_a_name_that_moved_out_of_backbones_says_where_it_is_now(name, home):
    with pytest.raises(ImportError, match=re.escape(f"gift.backbones.{name} has moved: use {home}")):
        exec(f"from gift.backbones import {name}")
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        gift.backbones.no_such_name


def test_hub_weights_are_pinned_by_their_tag_in_the_identity():
    from timm.models import get_pretrained_cfg

    from gift.backbones import backbone_identity

    identity = backbone_identity("vit_tiny_patch16_224", 3, 0.1, 0, pretrained=True)
    default_tag = get_pretrained_cfg("vit_tiny_patch16_224").tag  # augreg_in21k_ft_in1k in timm 1.0
    assert identity["timm_name"] == f"vit_tiny_patch16_224.{default_tag}" and identity["pretrained"] == "hub"
    assert backbone_identity("vit_tiny_patch16_224", 3, 0.1, 0)["timm_name"] == "vit_tiny_patch16_224"
