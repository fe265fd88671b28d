"""FastGIFT agrees with GIFTReference and has the deployment and memory features of a PEFT adapter."""
import copy

import pytest
import torch
import torch.nn as nn

from gift import FastGIFT, GIFTConfig, GIFTReference
from gift.fast import GIFTLinear
from gift.testing import (
    assert_model_agrees,
    model_exact_and_baseline,
    outputs_and_grads,
    randomize_gift_,
    twin_models,
    zero_gradient_names,
)
from gift_kernels.testing import assert_agree
from tests.helpers import ToyViT, tiny_hf_vit, tiny_timm_vit

# ---------------------------------------------------------------- agreement with the reference
RAGGED = {
    "ragged_heads": GIFTConfig(rank=24, num_heads=3, num_clusters=5),
    "two_blocks": GIFTConfig(rank=8, num_clusters=5, num_blocks=2),
    "identity": GIFTConfig(rank=8, block="identity"),
    "paca_attn_softmax": GIFTConfig(
        rank=6, num_heads=2, num_clusters=3, block="paca_attn", cluster_activation="softmax"
    ),
    "two_keys_with_biases": GIFTConfig(
        rank=6,
        num_clusters=5,
        target_modules=("attn.proj", "mlp.fc2"),
        in_projection_bias=True,
        out_projection_bias=True,
    ),
}


@pytest.mark.parametrize("name", sorted(RAGGED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_agrees_with_reference_on_ragged_configs(name, dtype):
    cfg = RAGGED[name]
    if dtype == torch.float64:
        cfg = GIFTConfig.from_dict({**cfg.to_dict(), "dtype": "float64"})
    torch.manual_seed(0)
    ref, fast = twin_models(ToyViT(dim=12, depth=3, hidden=20), cfg, dtype)  # 12: not a multiple of 8
    x = torch.randn(3, 7, 12, dtype=dtype)
    got = outputs_and_grads(fast, x)
    exact, want = model_exact_and_baseline(ref, x)
    assert got["output"].dtype == dtype
    assert set(got) == set(want) and len(got) > 3
    # against the exact answer; fp32 may be off by 1e-5 of each tensor plus twice the fp32 reference's own error
    assert_model_agrees(got, exact, want if dtype != torch.float64 else None, ref)


def test_fast_keeps_the_parameter_names_and_storage_of_the_backbone():
    backbone = ToyViT()
    names = [n for n, _ in backbone.named_parameters()]
    weight = backbone.blocks[0].attn.proj.weight
    fast = FastGIFT(backbone, GIFTConfig(rank=4, num_clusters=3))
    assert [n[len("backbone."):] for n, _ in fast.named_parameters() if n.startswith("backbone.")] == names
    assert isinstance(fast.backbone.blocks[0].attn.proj, GIFTLinear)
    assert fast.backbone.blocks[0].attn.proj.weight is weight
    ref = GIFTReference(ToyViT(), GIFTConfig(rank=4, num_clusters=3))
    assert list(fast.gift_state_dict()) == list(ref.gift_state_dict())


def test_zero_initialised_fast_model_equals_backbone(toy_vit):
    bare = copy.deepcopy(toy_vit)
    fast = FastGIFT(toy_vit, GIFTConfig(rank=4, num_clusters=3))
    x = torch.randn(2, 5, 12)
    assert torch.equal(fast(x), bare(x))


# ---------------------------------------------------------------- merge / unmerge
def test_merge_unmerge_and_merge_and_unload():
    torch.manual_seed(0)
    fast = randomize_gift_(FastGIFT(ToyViT(), GIFTConfig(rank=4, num_clusters=3, target_modules=("attn.proj", "fc2"))))
    original = {k: v.clone() for k, v in fast.backbone.state_dict().items()}
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        before = fast(x)
        fast.merge()
        merged = fast(x)
        assert fast.merged
        with pytest.raises(RuntimeError, match="already merged"):
            fast.merge()
    with pytest.raises(RuntimeError, match="call unmerge\\(\\) before training"):
        fast(x)
    with torch.no_grad():
        fast.unmerge()
        after = fast(x)
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-7)
    for k, v in fast.backbone.state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=0, atol=1e-6)
    plain = fast.merge_and_unload()
    assert not any(isinstance(m, GIFTLinear) for m in plain.modules())
    assert type(plain.blocks[0].attn.proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(x), before, rtol=1e-5, atol=1e-6)


def test_every_entry_point_of_the_backbone_runs_adapted_and_merge_adds_the_residuals_once():
    """The wrapper's forward, ``backbone(x)``, ``forward_features`` and ``forward_intermediates`` all run the
    adapted model (before and after a training step); merged, they give the same outputs, not twice the residual."""
    fast = randomize_gift_(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3)), seed=1, scale=0.3)
    plain = copy.deepcopy(tiny_timm_vit()).eval()
    x = torch.randn(2, 3, 32, 32)
    fast.train()(x).sum().backward()
    fast.eval()
    with torch.no_grad():
        adapted = fast(x)
        features = fast.backbone.forward_features(x)
        assert (adapted - plain(x)).abs().max() > 1e-3  # the adapter changes the output
        torch.testing.assert_close(fast.backbone(x), adapted, rtol=0, atol=0)
        torch.testing.assert_close(fast.backbone.forward_head(features), adapted, rtol=0, atol=0)
        intermediates = fast.backbone.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(intermediates[-1], fast.backbone.forward_intermediates(x)[1][-1], rtol=0, atol=0)
        assert (intermediates[-1] - plain.forward_intermediates(x, intermediates_only=True)[-1]).abs().max() > 1e-3
        fast.merge()
        torch.testing.assert_close(fast.backbone(x), adapted, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x), adapted, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.backbone.forward_features(x), features, rtol=1e-5, atol=1e-5)


def test_merge_refuses_non_finite_weights_and_changes_nothing():
    fast = randomize_gift_(FastGIFT(ToyViT(), GIFTConfig(rank=4, block="identity")))
    with torch.no_grad():
        fast.out_projections["attn:proj"].weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in fast.backbone.state_dict().items()}
    with pytest.raises(ValueError, match=r"Merging GIFT into 'blocks\.0\.attn\.proj' gives non-finite weights"):
        fast.merge()
    assert all(torch.equal(v, before[k]) for k, v in fast.backbone.state_dict().items())
    assert not fast.merged


# ---------------------------------------------------------------- memory, precision, compile
def test_autocast_bf16_keeps_the_generator_in_fp32():
    ref, fast = twin_models(tiny_timm_vit(), GIFTConfig(rank=8, num_clusters=5))
    x = torch.randn(2, 3, 32, 32)
    want = outputs_and_grads(ref, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
    assert out.dtype == torch.bfloat16
    out.float().mul(torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in fast.gift_parameters())
    torch.testing.assert_close(out.float(), want["output"], rtol=0.1, atol=0.1)


def test_backbone_weights_stored_in_bf16():
    ref, fast = twin_models(tiny_timm_vit(), GIFTConfig(rank=8, num_clusters=5), backbone_dtype=torch.bfloat16)
    assert fast.backbone.blocks[0].attn.proj.weight.dtype == torch.bfloat16
    assert fast.backbone.head.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in fast.gift_parameters())
    x = torch.randn(2, 3, 32, 32)
    got = outputs_and_grads(fast, x)
    grads = [g for k, g in got.items() if k != "output"]
    assert len(grads) > 3 and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(got["output"].float(), outputs_and_grads(ref, x)["output"], rtol=0.1, atol=0.1)


@pytest.mark.parametrize(
    "cfg",
    [GIFTConfig(rank=16, num_clusters=5), GIFTConfig(rank=24, num_heads=3, num_clusters=7, num_blocks=2)],
    ids=["paca-r16", "paca-r24-h3-2blocks"],
)
def test_fast_with_triton_kernels_agrees_with_reference(cfg, monkeypatch):
    import gift_kernels.residual_triton as residual_triton
    from gift_kernels.paca_triton import PacaAttentionTriton

    monkeypatch.setenv("GIFT_BACKEND", "triton")  # on CPU tensors: the Triton interpreter (conftest sets it)
    calls = []
    original = PacaAttentionTriton.apply
    monkeypatch.setattr(PacaAttentionTriton, "apply", lambda *a: calls.append("PacaAttentionTriton") or original(*a))
    original_mm = residual_triton.matmul_lowrank_epilogue
    monkeypatch.setattr(residual_triton, "matmul_lowrank_epilogue",
                        lambda *a: calls.append("matmul_lowrank_epilogue") or original_mm(*a))
    backbone = tiny_timm_vit()
    ref, fast = twin_models(backbone, cfg)
    x = torch.randn(2, 3, 32, 32)
    got = outputs_and_grads(fast, x)
    exact, want = model_exact_and_baseline(ref, x)
    # 3 target layers: one fused GEMM forward each, one backward (dx) for layers 1 and 2 (block 0's
    # attention output needs no gradient: frozen weights, an input that needs none)
    assert calls.count("PacaAttentionTriton") == cfg.num_blocks and calls.count("matmul_lowrank_epilogue") == 5
    assert_model_agrees(got, exact, want, ref)


# ---------------------------------------------------------------- no per-step tensors on the modules
def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _copies_work(model, x):
    """deepcopy, pickle and timm's ModelEmaV3 of ``model`` work and give the model's eval output."""
    import io
    import pickle

    from timm.utils import ModelEmaV3

    for module in model.modules():
        if isinstance(module, GIFTLinear):
            assert not any(isinstance(v, torch.Tensor) for v in vars(module).values())
    with torch.no_grad():
        want = _logits(model.eval()(x))
    model.train()
    buffer = io.BytesIO()
    pickle.dump(model, buffer)
    copies = [copy.deepcopy(model), pickle.loads(buffer.getvalue()), ModelEmaV3(model).module]
    for other in copies:
        assert other.residuals is not model.residuals and other.residuals.model is other
        assert not other.residuals._inference and not other.residuals._training  # no tensors of the original's
        layer = other.target_groups[0].modules[0]
        assert layer.residuals is other.residuals and layer.weight is not model.target_groups[0].modules[0].weight
        with torch.no_grad():
            torch.testing.assert_close(_logits(other.eval()(x)), want)
    ema = ModelEmaV3(model, decay=0.5)
    ema.update(model)
    return want


@pytest.mark.parametrize(
    "backbone, memory", [("timm", "none"), ("timm", "mlp"), ("timm", "block"), ("transformers", "none")]
)
def test_deepcopy_pickle_and_timm_ema_after_forward_and_after_backward(backbone, memory):
    if backbone == "timm":
        model, x = tiny_timm_vit(), torch.randn(2, 3, 32, 32)
        cfg = GIFTConfig(rank=4, num_clusters=3)
    else:
        model, x = tiny_hf_vit(), torch.randn(2, 3, 16, 16)
        cfg = GIFTConfig(rank=4, num_clusters=3, target_modules=("attention.o_proj",))
    fast = randomize_gift_(FastGIFT(model, cfg, memory=memory))
    out = _logits(fast.train()(x))
    _copies_work(fast, x)
    out.float().pow(2).sum().backward()
    _copies_work(fast, x)
    zero = set(zero_gradient_names(fast))  # exactly 0 on one CPU, ~1e-9 on another: not asserted non-zero
    assert all(p.grad is not None for p in fast.gift_parameters())
    gift = {id(p) for p in fast.gift_parameters()}
    assert all(p.grad.abs().sum() > 0 for name, p in fast.named_parameters() if id(p) in gift and name not in zero)


# ---------------------------------------------------------------- memory="auto"
def test_memory_auto_picks_the_fastest_mode_that_fits_at_the_first_training_step():
    from gift.plan import FIT_FRACTION, DoesNotFit, plan_model

    x = torch.randn(2, 3, 32, 32)
    probe = FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3))
    # budgets for which a predicted peak fits (the margin for the CUDA allocator kept)
    peaks = {m: int(b.peak / FIT_FRACTION) + 1 for m, b in plan_model(probe, x.shape, None).modes.items()}
    assert peaks["none"] > peaks["mlp"] > peaks["block"]
    fast = FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3), memory="auto",
                    memory_budget=(peaks["mlp"] + peaks["block"]) // 2)
    assert fast.memory == "none" and fast.memory_pending
    with torch.no_grad():
        fast(x)  # evaluation decides nothing
    assert fast.memory_pending
    fast(x).sum().backward()
    assert fast.memory == "block" and not fast.memory_pending
    assert fast.memory_reason.startswith("memory=block: predicted peak") and "memory=mlp needs" in fast.memory_reason
    assert fast.choose_memory(x.shape, budget=peaks["none"]) == "none"
    with pytest.raises(DoesNotFit, match=r"batch size 2 does not fit .* in any memory mode.*batch size 1 would fit"):
        fast.choose_memory(
            x.shape,
            budget=(
                peaks["block"] + int(plan_model(probe, (1, 3, 32, 32), None).modes["block"].peak / FIT_FRACTION) + 1
            )
            // 2,
        )


def test_two_forwards_then_one_backward_recompute_with_the_right_residuals():
    """Gradient accumulation in a checkpointed mode: both forwards' blocks are recomputed in one backward."""
    _, fast = twin_models(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3))
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)

    def grads():
        fast.zero_grad(set_to_none=True)
        (fast(x1).pow(2).sum() + fast(x2).pow(2).sum()).backward()
        return {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}

    want = grads()
    for memory in ("mlp", "block"):
        fast.set_memory(memory)
        assert_agree(grads(), want, torch.float32)
