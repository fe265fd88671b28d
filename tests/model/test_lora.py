"""gift.lora, the PEFT LoRA baseline: the layers GIFT adapts at rank lora_rank with the classifier trained, and
its adapter folder round trip on the recorded backbone."""
import pytest
import torch

from gift.backbones import backbone_identity, seeded_backbone

pytest.importorskip("peft", reason="the LoRA baseline needs the lora extra: pip install 'gift[lora]'")

from gift.lora import LORA_RUN, load_lora_adapter, lora_model, save_lora_adapter  # noqa: E402  (after importorskip)

MICRO = "gift_vit_micro_patch4_32"


def test_lora_adapts_the_targets_at_its_rank_and_trains_the_classifier():
    model = lora_model(seeded_backbone(backbone_identity(MICRO, 4, 0.0, seed=0)), lora_rank=2)
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    lora = {n: s for n, s in trainable.items() if ".lora_" in n}
    assert len(lora) == 2 * 4 and all(n.split(".blocks.")[1].split(".")[1:3] == ["attn", "proj"] for n in lora)
    assert all(2 in s for s in lora.values())
    assert {n for n in trainable if n not in lora} == {"base_model.model.head.modules_to_save.default.weight",
                                                       "base_model.model.head.modules_to_save.default.bias"}


def test_a_lora_adapter_round_trip_on_its_recorded_backbone(tmp_path):
    identity = backbone_identity(MICRO, 4, 0.0, seed=1)
    model = lora_model(seeded_backbone(identity), lora_rank=2).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B" in n:
                p.normal_()  # LoRA starts at zero: make the adapter change the output
    save_lora_adapter(model, str(tmp_path), {"backbone": identity})
    assert {LORA_RUN, "adapter_config.json", "adapter_model.safetensors"} <= set(p.name for p in tmp_path.iterdir())
    loaded, run = load_lora_adapter(str(tmp_path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert run == {"backbone": identity}
