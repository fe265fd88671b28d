"""The clustering-based explainer: shapes, prefix tokens, non-square and dynamic grids, no hooks
left behind, one forward pass, agreement with a by-hand computation, the CLI and its errors."""

import pytest
import timm
import torch
import torch.nn.functional as F

from gift import FastGIFT, GIFTConfig, GIFTReference, explain
from gift.testing import randomize_gift_


def vit(**kw):
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args)


def hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("wrapper", [GIFTReference, FastGIFT])
def test_maps_and_segmentation_shapes_values_and_no_leftover_hooks(wrapper):
    model = randomize_gift_(wrapper(vit(), GIFTConfig(rank=8, num_clusters=5))).eval()
    images = torch.randn(2, 3, 32, 32)
    before = hooks(model)
    calls = []
    model.backbone.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        result = explain(model, images)
    assert len(calls) == 1  # one forward pass for all layers
    assert hooks(model) == before + 1  # only the counter above remains
    assert sorted(result.maps) == [0, 1] and result.grid == (4, 4)
    for layer, maps in result.maps.items():
        assert maps.shape == (2, 5, 32, 32)
        flat = maps.flatten(2)
        assert torch.allclose(flat.min(-1).values, torch.zeros(2, 5)) and torch.allclose(
            flat.max(-1).values, torch.ones(2, 5)
        )
        assert torch.equal(result.segmentation[layer], maps.argmax(1))


def test_maps_equal_the_spec_computed_by_hand():
    model = randomize_gift_(FastGIFT(vit(), GIFTConfig(rank=8, num_clusters=5))).eval()
    images = torch.randn(2, 3, 32, 32)
    outputs = []
    handle = model.backbone.blocks[1].attn.proj.register_forward_hook(lambda m, a, o: outputs.append(o))
    with torch.no_grad():
        model(images)
        handle.remove()
        group = model.target_groups[0]
        phi = model.in_projections["attn:proj"].weight
        t = group.modules[1].weight @ phi.T
        u = t / t.norm(dim=-1, keepdim=True)
        c = torch.sigmoid(model.hypernets["attn:proj"].blocks[0].attn.cluster.cluster(u))  # no 1/N
        maps = (outputs[0][:, 1:] @ c).transpose(1, 2).reshape(2, 5, 4, 4)
        maps = F.interpolate(maps, size=(32, 32), mode="bilinear", align_corners=False)
        lo, hi = maps.amin((2, 3), keepdim=True), maps.amax((2, 3), keepdim=True)
        want = (maps - lo) / (hi - lo)
        got = explain(model, images, layers=[1]).maps[1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_and_fast_explain_alike_and_pre_delta_differs():
    torch.manual_seed(0)
    ref = randomize_gift_(GIFTReference(vit(), GIFTConfig(rank=8, num_clusters=5)), scale=0.3).eval()
    fast = FastGIFT(vit(), GIFTConfig(rank=8, num_clusters=5)).eval()
    fast.load_gift_state_dict(ref.gift_state_dict())
    images = torch.randn(2, 3, 32, 32)
    a, b = explain(ref, images), explain(fast, images)
    for layer in a.maps:
        torch.testing.assert_close(a.maps[layer], b.maps[layer], rtol=1e-4, atol=1e-4)
    pre = explain(fast, images, pre_delta=True)
    assert not torch.allclose(pre.maps[1], b.maps[1], atol=1e-3)


def test_prefix_tokens_and_non_square_grids():
    model = randomize_gift_(FastGIFT(vit(reg_tokens=4, img_size=(32, 48)), GIFTConfig(rank=8, num_clusters=5))).eval()
    assert model.backbone.num_prefix_tokens == 5
    result = explain(model, torch.randn(1, 3, 32, 48))
    assert result.grid == (4, 6) and result.maps[0].shape == (1, 5, 32, 48)
    dynamic = randomize_gift_(FastGIFT(vit(dynamic_img_size=True, class_token=False, global_pool="avg"),
                                       GIFTConfig(rank=8, num_clusters=5))).eval()
    result = explain(dynamic, torch.randn(1, 3, 40, 24))
    assert result.grid == (5, 3) and result.maps[1].shape == (1, 5, 40, 24)


def test_identity_block_uses_the_columns_of_t_and_training_mode_is_kept():
    model = randomize_gift_(FastGIFT(vit(), GIFTConfig(rank=6, block="identity")))
    model.train()
    result = explain(model, torch.randn(1, 3, 32, 32))
    assert result.maps[0].shape == (1, 6, 32, 32) and model.training


def test_bad_inputs():
    model = FastGIFT(vit(), GIFTConfig(rank=8, num_clusters=5))
    with pytest.raises(IndexError, match=r"layer index 2 is out of range: attn:proj has layers 0\.\.1"):
        explain(model, torch.randn(1, 3, 32, 32), layers=[2])
    with pytest.raises(TypeError, match="needs a model wrapped with GIFT"):
        explain(vit(), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"images are \(32, 40\) but the model takes \(32, 32\)"):
        explain(model, torch.randn(1, 3, 32, 40))
    model.merge()
    with pytest.raises(RuntimeError, match="call unmerge\\(\\) before explaining"):
        explain(model, torch.randn(1, 3, 32, 32))


def test_iou_selection_and_scoring_on_maps_with_a_known_answer():
    from gift.explainer import select_and_score

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(12, 8, 8, generator=g) > 0.6
    labels = torch.tensor([0, 1] * 6)
    noise = torch.rand(12, 8, 8, generator=g)

    def candidates(index):  # the "images" are image indices, so batches can be looked up
        i = index.long()
        # 0: noise; 1: the mask itself for class 0 images, noise otherwise; 2: the mask inverted
        exact = torch.where((labels[i] == 0)[:, None, None], masks[i].float(), noise[i])
        return torch.stack([noise[i], exact, 1.0 - masks[i].float()], 1)

    index = torch.arange(12)
    result = select_and_score(candidates, index, masks, labels, index, masks, labels, batch_size=5)
    assert result["choices"][0][0] == 1 and result["per_class"][0] == pytest.approx(1.0)
    assert 0.0 < result["per_class"][1] < 0.9  # class 1 gets only noise-like candidates
    assert result["miou"] == pytest.approx((1.0 + result["per_class"][1]) / 2)


def test_the_generator_block_is_block_index_and_the_old_keyword_block_still_works():
    model = randomize_gift_(FastGIFT(vit(), GIFTConfig(rank=8, num_clusters=5, num_blocks=2))).eval()
    images = torch.randn(1, 3, 32, 32)
    second = model.cluster_assignments(block_index=1)
    assert torch.equal(model.cluster_assignments(block=1), second)
    assert torch.equal(model.cluster_assignments(None, 1), second)
    with torch.no_grad():
        new, old = explain(model, images, block_index=1), explain(model, images, block=1)
    assert all(torch.equal(new.maps[i], old.maps[i]) for i in new.maps)
    with pytest.raises(ValueError, match=r"block_index=2 is out of range: this generator has 2 block\(s\)"):
        model.cluster_assignments(block_index=2)
    with pytest.raises(TypeError, match="not both"):
        explain(model, images, block_index=1, block=1)
