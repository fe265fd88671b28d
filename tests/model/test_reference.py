"""GIFTReference: zero-init start, training touches only GIFT + head, timm models, checkpoints, errors."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from gift import GIFTConfig, GIFTReference
from gift.testing import randomize_gift_
from tests.helpers import ToyViT


def test_zero_initialised_model_equals_backbone_then_one_step_changes_only_gift_and_head(toy_vit):
    bare = copy.deepcopy(toy_vit)
    model = GIFTReference(toy_vit, GIFTConfig(rank=4, num_clusters=3))
    x = torch.randn(2, 5, 12)
    assert torch.equal(model(x), bare(x))

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    F.cross_entropy(model(x), torch.tensor([0, 2])).backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert not torch.equal(model(x), bare(x))
    assert "out_projections.attn:proj.weight" in changed and "backbone.head.weight" in changed
    assert all(k.startswith(("in_projections.", "hypernets.", "out_projections.", "backbone.head.")) for k in changed)


def test_only_gift_and_head_are_trainable(toy_vit):
    model = GIFTReference(toy_vit, GIFTConfig(rank=4, num_clusters=3))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.gift_state_dict().items()}
    assert model.num_trainable_parameters() == model.num_gift_parameters() + 12 * 3 + 3


def _manual_output(model, x):
    """The spec's y = x (W + dW)^T + b, dW built densely, substituted into a copy of the backbone."""
    model.remove_hooks()
    backbone = copy.deepcopy(model.backbone)
    for group in model.target_groups:
        phi = model.in_projections[group.key].weight
        psi = model.out_projections[group.key].weight
        for name in group.names:
            linear = backbone.get_submodule(name)
            tokens = model.hypernets[group.key](linear.weight @ phi.T)
            linear.weight = nn.Parameter(linear.weight + tokens @ psi.T)
    return backbone(x)


@pytest.mark.parametrize("block", ["paca", "paca_attn", "identity"])
def test_output_is_backbone_with_dense_residual_added(toy_vit, block):
    model = randomize_gift_(GIFTReference(toy_vit, GIFTConfig(rank=6, num_clusters=5, num_heads=3, block=block)))
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        got = model(x)
        want = _manual_output(model, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_float64_model_computes_in_float64_throughout(toy_vit):
    model = GIFTReference(toy_vit, GIFTConfig(rank=4, num_clusters=3, dtype="float64")).to(torch.float64)
    randomize_gift_(model)
    seen = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda m, a, o: seen.add(o.dtype))
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    out = model(x)
    assert out.dtype == torch.float64 and seen == {torch.float64}
    assert model.delta_weight("attn:proj", 0).dtype == torch.float64


def test_gradcheck_through_the_residual(toy_vit):
    cfg = GIFTConfig(rank=4, num_clusters=3, num_heads=2, dtype="float64")
    model = randomize_gift_(GIFTReference(ToyViT(dim=6, depth=2, hidden=8), cfg).to(torch.float64))
    names = [n for n, _ in model.named_parameters() if n.startswith(("in_proj", "hypernets", "out_proj"))]
    params = tuple(model.get_parameter(n).detach().clone().requires_grad_(True) for n in names)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,), strict=False)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("block, rank, expected", [("identity", 16, 24_576), ("paca", 64, 135_680)])
def test_parameter_counts_of_spec_section_6(block, rank, expected):
    backbone = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    model = GIFTReference(backbone, GIFTConfig(block=block, rank=rank, num_clusters=64, num_heads=1))
    assert model.num_gift_parameters() == expected
    assert model.num_trainable_parameters() == expected  # num_classes=0: the head has no parameters
    assert len(model.target_groups[0]) == 12


@pytest.mark.parametrize(
    "name",
    [
        "vit_tiny_patch16_224",
        "vit_small_patch16_224",
        "deit_small_patch16_224",
        "eva02_tiny_patch14_224",
        "vit_little_patch16_reg4_gap_256",
    ],
)
def test_works_on_timm_vits(name):
    torch.manual_seed(0)
    backbone = timm.create_model(name, pretrained=False, num_classes=5)
    bare = copy.deepcopy(backbone)
    model = GIFTReference(backbone, GIFTConfig(rank=8, num_clusters=4))
    x = torch.randn(1, *backbone.pretrained_cfg["input_size"])
    with torch.no_grad():
        assert torch.equal(model(x), bare(x))
    randomize_gift_(model, scale=0.05)
    out = model(x)
    assert out.shape == (1, 5) and torch.isfinite(out).all()
    assert not torch.equal(out, bare(x))  # (layer-scale models shrink the change: no tolerance here)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.gift_parameters())
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if not n.startswith("head."))


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


def test_target_that_matches_nothing_lists_close_candidates(toy_vit):
    with pytest.raises(ValueError, match=r"'attn\.prj' matches no module of ToyViT\. Close candidates: 'attn\.proj'"):
        GIFTReference(toy_vit, GIFTConfig(target_modules=("attn.prj",)))


def test_target_that_is_not_linear_is_refused(toy_vit):
    with pytest.raises(TypeError, match=r"matched 'blocks\.0\.attn', a ToyAttention, not an nn\.Linear"):
        GIFTReference(toy_vit, GIFTConfig(target_modules=("attn",)))


def test_targets_of_different_shapes_under_one_key_are_refused(toy_vit):
    toy_vit.blocks[1].attn.proj = nn.Linear(10, 12)
    with pytest.raises(
        ValueError, match=r"'blocks\.1\.attn\.proj' is 12x10 \(out x in\) while 'blocks\.0\.attn\.proj' is 12x12"
    ):
        GIFTReference(toy_vit, GIFTConfig())


def test_module_claimed_by_two_targets_is_refused(toy_vit):
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.proj' is matched by both target 'attn\.proj' and 'proj'"):
        GIFTReference(toy_vit, GIFTConfig(target_modules=("attn.proj", "proj")))
