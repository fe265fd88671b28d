"""gift.adapters: an adapter folder loads on exactly the backbone it records, GIFT or LoRA told apart by its
files, and a folder that is neither is named."""
import pytest
import torch

from gift import FastGIFT, GIFTConfig
from gift.adapters import load_adapter, load_gift_adapter
from gift.backbones import backbone_identity, seeded_backbone
from gift.testing import randomize_gift_

MICRO = "gift_vit_micro_patch4_32"


def test_a_gift_adapter_loads_on_its_recorded_backbone_with_the_same_logits(tmp_path):
    identity = backbone_identity(MICRO, 4, 0.0, seed=3)
    model = randomize_gift_(FastGIFT(seeded_backbone(identity), GIFTConfig(rank=4, num_clusters=3))).eval()
    model.save_adapter(tmp_path, run={"backbone": identity, "classes": ["a", "b", "c", "d"]})
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(99)  # the caller's RNG state does not matter: the backbone is rebuilt from its seed
    loaded = load_gift_adapter(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    again, backbone, run = load_adapter(str(tmp_path))
    assert backbone is again.backbone and not again.training and run["classes"] == ["a", "b", "c", "d"]


def test_a_folder_that_holds_no_adapter_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no gift_config.json \(GIFT\) or adapter_config.json \(LoRA\)"):
        load_adapter(str(tmp_path))
