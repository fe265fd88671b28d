"""4-bit NF4 frozen weights (torchao): the same numbers as the model whose frozen weights are their own
dequantised values, and the bytes `gift plan` predicts."""
import copy

import pytest
import torch
import torch.nn as nn

from gift import FastGIFT, GIFTConfig
from gift.testing import outputs_and_grads, randomize_gift_
from gift_kernels.testing import assert_agree

pytest.importorskip("torchao", reason="NF4 needs the nf4 extra: pip install 'gift[nf4]'")

from gift.nf4 import NF4Linear, quantize_frozen_linears  # noqa: E402  (after the importorskip of torchao)


def vit_128():
    """A timm ViT whose linear weights are multiples of NF4's 16384-weight granule (width 128)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=128,
                             depth=2, num_heads=2, num_classes=5)


def test_nf4_outputs_and_gift_gradients_match_the_dequantised_model():
    cfg = GIFTConfig(rank=8, num_clusters=5)
    backbone = vit_128()
    fast = randomize_gift_(FastGIFT(copy.deepcopy(backbone), cfg), seed=3, scale=0.2)
    names = quantize_frozen_linears(fast)
    assert sorted(names) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "mlp.fc1", "mlp.fc2"))
    assert not isinstance(fast.backbone.blocks[0].attn.proj, NF4Linear)  # GIFT's target keeps its weight
    assert fast.backbone.head.weight.requires_grad and type(fast.backbone.head) is nn.Linear
    dequantised = copy.deepcopy(backbone)
    with torch.no_grad():
        for name in names:
            dequantised.get_submodule(name).weight.copy_(fast.backbone.get_submodule(name).weight.to(torch.float32))
    reference = FastGIFT(dequantised, cfg)
    reference.load_gift_state_dict(fast.gift_state_dict())
    x = torch.randn(3, 3, 32, 32)
    got, want = outputs_and_grads(fast, x), outputs_and_grads(reference, x)
    assert set(got) == set(want) and len(got) > 5
    assert all(g.abs().sum() > 0 for g in got.values())
    assert_agree(got, want, torch.float32)
    # and the quantisation is real: NF4 weights differ from the original ones
    original = backbone.blocks[0].attn.qkv.weight.detach()
    assert not torch.equal(dequantised.blocks[0].attn.qkv.weight, original)
    torch.testing.assert_close(
        dequantised.blocks[0].attn.qkv.weight, original, atol=0.2 * original.abs().max().item(), rtol=0
    )


def test_nf4_bytes_are_what_gift_plan_predicts():
    from gift.memory import storage_bytes
    from gift.plan import TrainingSetup, compare_with_real_step

    torch.set_num_threads(1)
    rows = compare_with_real_step(TrainingSetup(model="vit_small_patch16_224", batch_size=2, backbone_dtype="nf4"))
    for mode, predicted, measured in rows:
        assert abs(predicted.saved_activation - measured.saved_activation) <= 0.03 * measured.saved_activation, mode
        for side in ("frozen", "trainable", "gradient", "optimizer"):
            assert getattr(predicted, side) == getattr(measured, side), (mode, side)
    # frozen storage: NF4 linears (~0.53 bytes a weight), everything else bf16: well under bf16's 2 bytes
    import timm

    fp32 = storage_bytes(timm.create_model("vit_small_patch16_224", num_classes=1000).parameters())
    assert rows[0][2].frozen < 0.45 * fp32 / 2


def test_missing_torchao_names_the_extra(monkeypatch):
    import builtins

    import gift.nf4

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(ImportError, match=r"pip install 'gift\[nf4\]'"):
        gift.nf4.quantize_frozen_linears(FastGIFT(vit_128(), GIFTConfig(rank=4, num_clusters=3)))
