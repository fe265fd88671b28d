"""gift.testing, the model-level checks built on gift_kernels.testing's (tests/kernels/test_testing.py): the
zero-by-construction gradient names, and the agreement check sees a 1% error in any gradient (gross ones
under 16-bit autocast)."""
import pytest
import torch

from gift import GIFTConfig, GIFTReference
from gift.testing import (
    model_disagreements,
    model_exact_and_baseline,
    outputs_and_grads,
    randomize_gift_,
    twin_models,
    zero_gradient_names,
)
from tests.helpers import ToyViT, tiny_hf_vit, tiny_timm_vit


@pytest.mark.parametrize(
    "backbone,cfg",
    [
        (
            tiny_timm_vit,
            GIFTConfig(rank=8, num_clusters=5, num_blocks=2, out_projection_bias=True, in_projection_bias=True),
        ),
        (
            tiny_timm_vit,
            GIFTConfig(
                rank=6,
                num_clusters=3,
                num_heads=2,
                block="paca_attn",
                cluster_activation="softmax",
                target_modules=("attn.proj", "mlp.fc2", "attn.qkv"),
                out_projection_bias=True,
            ),
        ),
        (tiny_timm_vit, GIFTConfig(rank=6, block="identity", in_projection_bias=True, out_projection_bias=True)),
        (lambda: ToyViT(dim=12, depth=2, hidden=20), GIFTConfig(rank=6, num_clusters=5, out_projection_bias=True)),
        (tiny_hf_vit, GIFTConfig(rank=4, num_clusters=3, target_modules=("attention.o_proj", "mlp.fc2"),
                                 out_projection_bias=True)),
    ],
    ids=["timm-paca-2blocks", "timm-paca_attn-softmax-3targets", "timm-identity", "toy-no-layernorm", "hf-vit"],
)
def test_model_zero_gradient_names_are_exactly_the_zero_gradients(backbone, cfg):
    model = randomize_gift_(GIFTReference(backbone(), cfg).to(torch.float64), seed=3, scale=0.3)
    if hasattr(model.backbone, "patch_embed"):
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    elif hasattr(model.backbone, "vit"):
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    else:
        x = torch.randn(2, 5, 12, dtype=torch.float64)
    grads = {k: v for k, v in outputs_and_grads(model, x).items() if k != "output"}
    largest = max(v.abs().max().item() for v in grads.values())
    tiny = {k for k, v in grads.items() if v.abs().max().item() <= 1e-11 * largest}
    assert tiny == set(zero_gradient_names(model))


def test_model_level_mutation_fails():
    ref, fast = twin_models(tiny_timm_vit(), GIFTConfig(rank=8, num_clusters=5, num_heads=2))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = outputs_and_grads(fast, x)
    exact, baseline = model_exact_and_baseline(ref, x)
    assert model_disagreements(got, exact, baseline, ref) == []
    zero = zero_gradient_names(ref)
    missed = [key for key in exact if key not in zero
              if model_disagreements({**got, key: got[key] * 1.01}, exact, baseline, ref) == []]
    assert not missed, f"a 1% error in these went unseen: {missed}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_model_level_16bit_autocast_sees_zeroed_and_negated_gradients(dtype):
    """What gift.testing promises under 16-bit autocast (MODEL_BASELINE_FACTOR times the autocast reference's
    own, percent-level, error): the real result passes, a zeroed or negated gradient fails, naming it."""
    ref, fast = twin_models(tiny_timm_vit(), GIFTConfig(rank=8, num_clusters=5, num_heads=1))
    x, y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1])
    got = outputs_and_grads(fast, x, y, dtype)
    exact, baseline = model_exact_and_baseline(ref, x, y, dtype)
    assert model_disagreements(got, exact, baseline, ref, dtype) == []
    zero = zero_gradient_names(ref)
    missed = [(key, name) for key in exact if key not in zero for name, mutate in (("zeroed", torch.zeros_like),
                                                                                    ("negated", torch.neg))
              if [line.rsplit(": abs ", 1)[0] for line in
                  model_disagreements({**got, key: mutate(got[key])}, exact, baseline, ref, dtype)] != [key]]
    assert not missed, f"gross errors the 16-bit check did not see (or blamed on another tensor): {missed}"


def test_zero_gradient_names_do_not_depend_on_the_memory_mode():
    """memory="mlp" moves norm2 inside the recomputed MLP: the shift-invariant biases stay zero by construction."""
    from gift import FastGIFT

    names = {mode: zero_gradient_names(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=8, num_clusters=5), memory=mode))
             for mode in ("none", "mlp", "block")}
    assert any(n.endswith("mlp.fc2.bias") for n in names["none"])
    assert names["mlp"] == names["none"] == names["block"]
