"""FastGIFT as a drop-in for PEFT, timm and Hugging Face users: ``model(**batch)`` with the backbone's own output,
heads and ``modules_to_save`` trained and saved, timm attributes passed through, reentrant HF checkpointing,
deployables in one dtype, merged state dicts, PEFT's conveniences, bounded explain maps, per-stage targets."""
import copy
import io
import re
from contextlib import redirect_stdout

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import gift
from gift import FastGIFT, GIFTConfig
from gift.targets import find_targets
from gift.testing import assert_model_agrees, outputs_and_grads, randomize_gift_
from tests.helpers import tiny_hf_vit, tiny_timm_vit

CFG = GIFTConfig(rank=8, num_clusters=5)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


HF_CFG = GIFTConfig(rank=8, num_clusters=5, target_modules=("attention.o_proj",))


def hf_model():
    return randomize_gift_(FastGIFT(tiny_hf_vit(), HF_CFG), seed=1, scale=0.2, psi_scale=0.2)


# ---------------------------------------------------------------- forward(*args, **kwargs), output types
def test_hugging_face_vit_takes_the_batch_and_returns_its_loss():
    model = hf_model()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    out = model(pixel_values=x, labels=y)
    assert type(out) is type(model.backbone(pixel_values=x))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, y))
    out.loss.backward()
    assert all(p.grad is not None for p in model.gift_parameters())


def test_hugging_face_llama_takes_the_batch_and_returns_its_loss():
    model = randomize_gift_(FastGIFT(tiny_llama(), GIFTConfig(rank=8, num_clusters=4, target_modules=("o_proj",))),
                            seed=1, scale=0.2, psi_scale=0.2)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out = model(**batch)
    logits = out.logits[:, :-1].reshape(-1, 64)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, ids[:, 1:].reshape(-1)))
    out.loss.backward()
    assert all(p.grad is not None for p in model.gift_parameters())


@pytest.mark.parametrize("labels_first", [False, True])
def test_hugging_face_memory_auto_plans_the_modes_it_can_take_on_pixel_values(labels_first):
    """``memory="auto"`` on a backbone without ``blocks`` plans only ``none``, from ``pixel_values`` in whatever
    order the batch's keywords come (``labels`` is a tensor too, of another shape)."""
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    plain = hf_model()
    model = FastGIFT(tiny_hf_vit(), HF_CFG, memory="auto", memory_budget="8GiB")
    model.load_state_dict(plain.state_dict())
    batch = dict(labels=y, pixel_values=x) if labels_first else dict(pixel_values=x, labels=y)
    out = model(**batch)
    assert model.memory == "none" and not model.memory_pending
    assert model.memory_reason.startswith("memory=none: predicted peak")
    torch.testing.assert_close(out.loss, plain(pixel_values=x, labels=y).loss, rtol=0, atol=0)


def test_memory_modes_a_backbone_can_take():
    assert FastGIFT(tiny_hf_vit(), HF_CFG).supported_memory_modes == ("none",)
    assert FastGIFT(tiny_timm_vit(), CFG).supported_memory_modes == gift.config.MEMORY_MODES


# ---------------------------------------------------------------- heads and modules_to_save
def test_hugging_face_classifier_trains_and_is_saved(tmp_path):
    model = hf_model()
    assert model.head_name == "classifier"
    assert all(p.requires_grad for p in model.backbone.classifier.parameters())
    with torch.no_grad():
        model.backbone.classifier.weight.add_(1.0)
    model.save_adapter(tmp_path)
    loaded = FastGIFT.from_adapter(tiny_hf_vit(), tmp_path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_modules_to_save_trains_and_saves_llama_lm_head(tmp_path):
    cfg = GIFTConfig(rank=8, num_clusters=4, target_modules=("o_proj",), modules_to_save=("lm_head",))
    model = FastGIFT(tiny_llama(), cfg)
    assert model.saved_module_names == ("lm_head",)
    assert model.backbone.lm_head.weight.requires_grad
    assert not model.backbone.model.embed_tokens.weight.requires_grad
    with torch.no_grad():
        model.backbone.lm_head.weight.mul_(-1.0)
    model.save_adapter(tmp_path)
    loaded = FastGIFT.from_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded.backbone.lm_head.weight, model.backbone.lm_head.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="matches no module"):
        FastGIFT(tiny_llama(), GIFTConfig(rank=8, num_clusters=4, target_modules=("o_proj",),
                                          modules_to_save=("lm_heads",)))


def test_hand_unfrozen_parameters_outside_the_adapter_are_warned_about(tmp_path):
    model = FastGIFT(tiny_timm_vit(), CFG)
    model.backbone.norm.requires_grad_(True)
    with pytest.warns(UserWarning, match="modules_to_save"):
        model.save_adapter(tmp_path)


# ---------------------------------------------------------------- HF reentrant checkpointing
def test_hugging_face_reentrant_checkpointing_needs_input_grads_then_gives_the_gradients():
    model = hf_model()
    x = torch.randn(2, 3, 16, 16)
    exact = outputs_and_grads(copy.deepcopy(model).double(), x.double())
    eager = outputs_and_grads(model, x)
    model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with pytest.raises(ValueError, match="enable_input_require_grads"):
        model(x)
    model.backbone.enable_input_require_grads()
    got = outputs_and_grads(model, x)
    assert_model_agrees(got, exact, eager, model)


# ---------------------------------------------------------------- timm attributes
def test_timm_attributes_are_the_backbones():
    backbone = tiny_timm_vit()
    backbone.pretrained_cfg = dict(backbone.pretrained_cfg, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))
    model = FastGIFT(backbone, CFG)
    config = timm.data.resolve_data_config({}, model=model)
    assert config["mean"] == (0.48, 0.46, 0.41) and config["std"] == (0.27, 0.26, 0.28)
    assert model.num_classes == 4 and model.get_classifier() is backbone.head
    assert model.default_cfg is backbone.default_cfg
    x = torch.randn(1, 3, 32, 32)
    randomize_gift_(model, scale=0.5, psi_scale=0.5)  # psi no longer zero: the adapted and the plain backbone differ
    with torch.no_grad():
        adapted = model(x)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), adapted)
        with model.disable_adapter():
            assert (model(x) - adapted).abs().max() > 1e-4
    with pytest.raises(AttributeError):
        model.no_such_attribute


# ---------------------------------------------------------------- deployables
def test_merge_and_unload_gives_one_dtype():
    model = randomize_gift_(FastGIFT(tiny_timm_vit(), CFG, backbone_dtype=torch.bfloat16), seed=1, scale=0.2,
                            psi_scale=0.2)
    assert model.backbone.head.weight.dtype == torch.float32
    deployable = model.merge_and_unload()
    assert {p.dtype for p in deployable.parameters()} == {torch.bfloat16}
    assert deployable(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    wide = FastGIFT(tiny_timm_vit(), CFG, backbone_dtype=torch.bfloat16).merge_and_unload(dtype=torch.float32)
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    wide(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("into_merged", [False, True])
def test_a_merged_state_dict_applies_the_adapter_once(into_merged):
    model = randomize_gift_(FastGIFT(tiny_timm_vit(), CFG), seed=1, scale=0.2, psi_scale=0.2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        model.merge()
        state = model.state_dict()
        other = FastGIFT(tiny_timm_vit(), CFG).eval()
        if into_merged:
            other.merge()
        other.load_state_dict(state)
        assert other.merged == into_merged
        torch.testing.assert_close(other(x), want)
        other.merge() if not into_merged else other.unmerge()
        torch.testing.assert_close(other(x), want)
        torch.testing.assert_close(model(x), want)


# ---------------------------------------------------------------- PEFT conveniences
def test_print_trainable_parameters_as_peft():
    model = FastGIFT(tiny_timm_vit(), CFG)
    with redirect_stdout(io.StringIO()) as out:
        model.print_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert out.getvalue() == (f"trainable params: {trainable:,} || all params: {total:,} || "
                              f"trainable%: {100 * trainable / total:.4f}\n")


def test_named_adapters_switch_and_delete(tmp_path):
    model = randomize_gift_(FastGIFT(tiny_timm_vit(), CFG), seed=1, scale=0.2, psi_scale=0.2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = model(x)
        model.add_adapter("fresh")
        assert model.adapter_names == ["default", "fresh"] and model.active_adapter == "default"
        model.set_adapter("fresh")
        plain = copy.deepcopy(model.backbone)
        torch.testing.assert_close(model(x), tiny_timm_vit().eval()(x))  # psi zero: the backbone's output
        model.set_adapter("default")
        torch.testing.assert_close(model(x), first, rtol=0, atol=0)
        model.save_adapter(tmp_path, adapter_name="fresh")
        model.load_adapter(tmp_path, adapter_name="again")
        model.delete_adapter("fresh")
        assert model.adapter_names == ["default", "again"]
        with pytest.raises(ValueError, match="active adapter"):
            model.delete_adapter("default")
    del plain


def test_unload_gives_back_the_pretrained_backbone():
    model = randomize_gift_(FastGIFT(tiny_timm_vit(), CFG), seed=1, scale=0.2, psi_scale=0.2).eval()
    x = torch.randn(2, 3, 32, 32)
    model.merge()
    backbone = model.unload()
    assert not any(type(m).__name__ == "GIFTLinear" for m in backbone.modules())
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), tiny_timm_vit().eval()(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="unload"):
        model(x)


# ---------------------------------------------------------------- explain
def test_explain_keeps_only_the_asked_layers_at_the_asked_size():
    model = randomize_gift_(FastGIFT(tiny_timm_vit(), CFG), seed=1, scale=0.2, psi_scale=0.2).eval()
    images = torch.randn(2, 3, 32, 32)
    full = gift.explain(model, images)
    grid = gift.explain(model, images, layers=[-1], size="grid")
    assert list(grid.maps) == [2] and grid.maps[2].shape == (2, 5, 2, 2)
    small = gift.explain(model, images, layers=[0], size=8)
    assert small.maps[0].shape == (2, 5, 8, 8) and full.maps[0].shape == (2, 5, 32, 32)
    with pytest.raises(ValueError, match="size="):
        gift.explain(model, images, size=0)


# ---------------------------------------------------------------- per-stage targets
class TwoStages(nn.Module):
    """A hierarchical toy: ``layers.{0,1}.blocks.{0,1}.attn.proj`` of width 8 in stage 0 and 16 in stage 1."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList()
        for width in (8, 16):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            for _ in range(2):
                block = nn.Module()
                block.attn = nn.Module()
                block.attn.proj = nn.Linear(width, width)
                stage.blocks.append(block)
            self.layers.append(stage)


def test_per_stage_targets_each_get_a_generator():
    backbone = TwoStages()
    with pytest.raises(ValueError, match=r"'layers\.0\.blocks\.\*\.attn\.proj', 'layers\.1\.blocks\.\*\.attn\.proj'"):
        find_targets(backbone, ("attn.proj",))
    groups = find_targets(backbone, ("layers.0.blocks.*.attn.proj", "layers.1.blocks.*.attn.proj"))
    assert [(g.key, g.names, g.in_features) for g in groups] == [
        ("layers:0:blocks:*:attn:proj", ("layers.0.blocks.0.attn.proj", "layers.0.blocks.1.attn.proj"), 8),
        ("layers:1:blocks:*:attn:proj", ("layers.1.blocks.0.attn.proj", "layers.1.blocks.1.attn.proj"), 16),
    ]
    model = FastGIFT(backbone, GIFTConfig(rank=8, num_clusters=5, target_modules=(
        "layers.0.blocks.*.attn.proj", "layers.1.blocks.*.attn.proj")))
    assert len(model.hypernets) == 2


def test_timm_swin_trains_with_one_generator_per_stage():
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=24, depths=(2, 2), num_heads=(1, 2),
                             img_size=56, window_size=7, num_classes=3)
    stages = ("layers.0.blocks.*.attn.proj", "layers.1.blocks.*.attn.proj")
    with pytest.raises(ValueError, match=re.escape(repr(stages)[:-1])):
        FastGIFT(swin, CFG)
    model = FastGIFT(swin, GIFTConfig(rank=8, num_clusters=5, target_modules=stages))
    assert [(len(g), g.in_features) for g in model.target_groups] == [(2, 24), (2, 48)]
    model(torch.randn(2, 3, 56, 56)).sum().backward()
    assert all(p.grad is not None for p in model.gift_parameters())
