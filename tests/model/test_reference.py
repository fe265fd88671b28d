"""GIFTReference: zero-init start, training touches only GIFT + head, the dense residual, float64, timm models
(its state dict and adapters: test_wrapper.py; its targets: test_targets.py)."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from gift import GIFTConfig, GIFTReference
from gift.testing import randomize_gift_, zero_gradient_names
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
    zero = set(zero_gradient_names(model))  # exactly 0 in exact arithmetic: rounding noise here, maybe 0 elsewhere
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")}
    assert zero < set(grads) and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n not in zero)
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if not n.startswith("head."))
