"""gift.wrapper, what both GIFT wrappers share: parameter counts, the GIFT state dict (the authors' checkpoints
too), and adapter folders."""
import os

import pytest
import timm
import torch

from gift import FastGIFT, GIFTConfig, GIFTReference
from gift.testing import randomize_gift_
from tests.helpers import ToyViT


@pytest.mark.parametrize("block, rank, expected", [("identity", 16, 24_576), ("paca", 64, 135_680)])
def test_parameter_counts_of_spec_section_6(block, rank, expected):
    backbone = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    model = GIFTReference(backbone, GIFTConfig(block=block, rank=rank, num_clusters=64, num_heads=1))
    assert model.num_gift_parameters() == expected
    assert model.num_trainable_parameters() == expected  # num_classes=0: the head has no parameters
    assert len(model.target_groups[0]) == 12


def _round_trip_models(cfg):
    torch.manual_seed(0)
    src = randomize_gift_(GIFTReference(ToyViT(), cfg), seed=5)
    with torch.no_grad():
        src.backbone.head.weight.add_(1.0)
    torch.manual_seed(0)
    dst = GIFTReference(ToyViT(), cfg)
    return src, dst


@pytest.mark.parametrize("form", ["dict", "checkpoint", "torch_file", "safetensors_file"])
def test_gift_state_dict_round_trip(tmp_path, form):
    cfg = GIFTConfig(rank=6, num_clusters=5, num_heads=2, num_blocks=2)
    src, dst = _round_trip_models(cfg)
    sd = src.gift_state_dict()
    assert "in_projections.attn:proj.weight" in sd and "hypernets.attn:proj.blocks.1.attn.cluster.cluster.bias" in sd
    if form == "dict":
        obj = sd
    elif form == "checkpoint":  # the authors' training script: full state under "state_dict", plus other entries
        obj = {"epoch": 3, "state_dict": src.state_dict(), "arch": "vit"}
    elif form == "torch_file":
        obj = tmp_path / "last.pth.tar"
        torch.save({"state_dict": dict(sd), "args": {"lr": 1e-4}}, obj)
    else:
        from safetensors.torch import save_file

        obj = str(tmp_path / "gift.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, obj)
    x = torch.randn(2, 5, 12)
    assert not torch.equal(src(x), dst(x))
    dst.load_gift_state_dict(obj)
    assert torch.equal(src(x), dst(x))


def test_load_lists_missing_unexpected_and_misshapen_keys():
    _, dst = _round_trip_models(GIFTConfig(rank=6, num_clusters=5))
    other = GIFTReference(ToyViT(), GIFTConfig(rank=6, num_clusters=5, block="paca_attn")).gift_state_dict()
    with pytest.raises(KeyError, match=r"missing keys \[.*blocks\.0\.mlp\.fc1\.bias"):
        dst.load_gift_state_dict(other)
    extra = dict(dst.gift_state_dict())
    extra["hypernets.attn:proj.blocks.1.attn.q.weight"] = torch.zeros(6, 6)
    with pytest.raises(KeyError, match=r"unexpected keys \['hypernets\.attn:proj\.blocks\.1\.attn\.q\.weight'\]"):
        dst.load_gift_state_dict(extra)
    wide = GIFTReference(ToyViT(dim=16), GIFTConfig(rank=6, num_clusters=5)).gift_state_dict()
    with pytest.raises(ValueError, match=r"in_projections\.attn:proj\.weight: checkpoint \(6, 16\) vs model \(6, 12\)"):
        dst.load_gift_state_dict(wide)


def test_adapter_round_trip_is_small_and_atomic(tmp_path):
    cfg = GIFTConfig(rank=6, num_clusters=5, num_heads=2)
    torch.manual_seed(0)
    src = randomize_gift_(FastGIFT(ToyViT(), cfg))
    src.save_adapter(tmp_path / "adapter")
    files = sorted(os.listdir(tmp_path / "adapter"))
    assert files == ["gift_adapter.safetensors", "gift_config.json"]  # no temp files left
    torch.manual_seed(0)
    dst = FastGIFT.from_adapter(ToyViT(), tmp_path / "adapter")
    x = torch.randn(2, 5, 12)
    assert torch.equal(src(x), dst(x))
    torch.manual_seed(0)
    ref = GIFTReference.from_adapter(ToyViT(), tmp_path / "adapter")  # same format for both wrappers
    torch.testing.assert_close(ref(x), src(x), rtol=1e-5, atol=1e-6)


def test_adapter_for_another_backbone_is_refused(tmp_path):
    FastGIFT(ToyViT(dim=12), GIFTConfig(rank=4, num_clusters=3)).save_adapter(tmp_path)
    with pytest.raises(
        ValueError, match=r"is for targets \{'attn:proj': \[2, 12, 12\]\}.*\[2, 16, 16\]\}: wrong backbone"
    ):
        FastGIFT(ToyViT(dim=16), GIFTConfig(rank=4, num_clusters=3)).load_adapter(tmp_path)
    with pytest.raises(ValueError, match="was saved with GIFTConfig"):
        FastGIFT(ToyViT(dim=12), GIFTConfig(rank=8, num_clusters=3)).load_adapter(tmp_path)
    with pytest.raises(FileNotFoundError, match="gift_config.json' does not exist"):
        FastGIFT(ToyViT(dim=12), GIFTConfig(rank=4, num_clusters=3)).load_adapter(tmp_path / "nowhere")
