"""gift.timm_models: the micro ViT is a timm model like any other, built at any size, with a local weights file
loaded through timm's pretrained_cfg_overlay."""
import timm
import torch
from safetensors.torch import save_file

import gift.timm_models  # noqa: F401  (registers gift's models with timm)


def test_the_micro_vit_is_registered_with_timm_and_builds_at_any_size():
    assert timm.is_model("gift_vit_micro_patch4_32")
    model = timm.create_model("gift_vit_micro_patch4_32", num_classes=4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert model.patch_embed.num_patches == 64 and model.embed_dim == 96 and len(model.blocks) == 4
    wide = timm.create_model("gift_vit_micro_patch4_32", img_size=64)
    assert wide.pretrained_cfg["input_size"] == (3, 64, 64) and wide.patch_embed.num_patches == 256


def test_a_local_weights_file_loads_through_timms_overlay(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("gift_vit_micro_patch4_32", num_classes=4)
    path = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    loaded = timm.create_model("gift_vit_micro_patch4_32", num_classes=4, pretrained=True,
                               pretrained_cfg_overlay=dict(file=path, num_classes=4))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())
