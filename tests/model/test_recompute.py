"""gift.recompute, the memory modes: the same gradients in every mode, timm's own checkpointing where it has it,
state-dict keys unchanged, reversible, and reentrant checkpointing refused."""
import json

import pytest
import torch
import torch.nn as nn

from gift import FastGIFT, GIFTConfig
from gift.testing import assert_model_agrees, outputs_and_grads, randomize_gift_, twin_models
from gift_kernels.testing import assert_agree
from tests.helpers import ToyViT, tiny_timm_vit


def test_memory_modes_and_timm_grad_checkpointing_give_the_same_gradients():
    cfg = GIFTConfig(rank=8, num_clusters=5)
    ref, fast = twin_models(tiny_timm_vit(), cfg)
    x = torch.randn(2, 3, 32, 32)
    want = outputs_and_grads(fast, x)
    for memory in ("mlp", "block"):
        fast.set_memory(memory)
        assert_model_agrees(outputs_and_grads(fast.train(), x), want, None, fast)
    fast.set_memory("none")
    fast.backbone.set_grad_checkpointing(True)
    assert_model_agrees(outputs_and_grads(fast, x), want, None, fast)
    with pytest.raises(ValueError, match="memory='huge' is unknown"):
        fast.set_memory("huge")
    with pytest.raises(ValueError, match="need backbone.blocks"):
        FastGIFT(nn.Sequential(nn.Linear(4, 4)), GIFTConfig(rank=2, target_modules=("0",)), memory="block")


def test_timm_reentrant_checkpointing_is_refused_at_the_training_forward():
    """Reentrant checkpointing would drop the generator's gradients silently, however it was switched on."""
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    fast = FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3), memory="block")
    x, before = torch.randn(2, 3, 32, 32), use_reentrant_ckpt()
    set_reentrant_ckpt(True)
    try:
        with pytest.raises(ValueError, match="set_reentrant_ckpt\\(False\\)"):
            fast(x)
        with torch.no_grad():
            fast(x)  # evaluation recomputes nothing
        fast.set_memory("none")
        fast.backbone.set_grad_checkpointing(True)  # switched on behind FastGIFT's back
        with pytest.raises(ValueError, match="non-reentrant"):
            fast(x)
    finally:
        set_reentrant_ckpt(before)


@pytest.mark.parametrize("make", [tiny_timm_vit, ToyViT], ids=["timm", "toy"])
def test_state_dict_round_trip_after_a_training_forward_in_any_memory_mode(make):
    """Keys are those of memory='none' in every mode, so a checkpoint of one mode loads into another."""
    x = torch.randn(2, 3, 32, 32) if make is tiny_timm_vit else torch.randn(2, 5, 12)
    torch.manual_seed(0)
    reference_keys = list(FastGIFT(make(), GIFTConfig(rank=4, num_clusters=3)).state_dict())
    for saved_in, loaded_in in (("mlp", "none"), ("block", "mlp"), ("none", "block")):
        torch.manual_seed(0)
        fast = randomize_gift_(FastGIFT(make(), GIFTConfig(rank=4, num_clusters=3), memory=saved_in))
        fast(x).sum().backward()
        state = fast.state_dict()
        assert list(state) == reference_keys
        assert all(not t.requires_grad and t.grad_fn is None for t in state.values())
        other = FastGIFT(make(), GIFTConfig(rank=4, num_clusters=3), memory=loaded_in)
        with torch.no_grad():
            for p in other.parameters():
                p.zero_()
        other.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(other(x), fast(x))


def test_memory_modes_use_timm_checkpointing_and_a_wrapper_module_reversibly():
    """block: timm's own set_grad_checkpointing(); mlp: a `Recomputed` module around each MLP (with norm2 inside);
    none: the original modules back (gradients of all modes agree: test_memory_modes_and_timm_grad_checkpointing...)."""
    from gift.recompute import Recomputed

    fast = FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3))
    mlps, norms = [b.mlp for b in fast.backbone.blocks], [b.norm2 for b in fast.backbone.blocks]
    fast.set_memory("block")
    assert fast.backbone.grad_checkpointing and not any(isinstance(m, Recomputed) for m in fast.modules())
    fast.set_memory("mlp")
    assert not fast.backbone.grad_checkpointing
    assert all(isinstance(b.mlp, Recomputed) and isinstance(b.norm2, nn.Identity) for b in fast.backbone.blocks)
    assert [b.mlp.body for b in fast.backbone.blocks] == mlps and [b.mlp.norm for b in fast.backbone.blocks] == norms
    fast.set_memory("none")
    assert not any(isinstance(m, Recomputed) for m in fast.modules())
    assert [b.mlp for b in fast.backbone.blocks] == mlps and [b.norm2 for b in fast.backbone.blocks] == norms


def test_memory_block_without_timm_wraps_each_block():
    from gift.recompute import Recomputed

    _, fast = twin_models(ToyViT(), GIFTConfig(rank=4, num_clusters=3))
    x = torch.randn(2, 5, 12)
    want = outputs_and_grads(fast, x)
    fast.set_memory("block")
    assert all(isinstance(b, Recomputed) for b in fast.backbone.blocks)
    assert_agree(outputs_and_grads(fast, x), want, torch.float32)
    fast.set_memory("none")
    assert not any(isinstance(m, Recomputed) for m in fast.modules())


@pytest.mark.parametrize("memory", ["mlp", "block"])
def test_a_first_training_step_under_auto_checks_the_kernels_inside_the_checkpointed_blocks(memory, monkeypatch,
                                                                                             tmp_path):
    """auto's first-use checks (run on CPU under the interpreter, as on a GPU) happen inside the blocks'
    non-reentrant checkpoints: the step runs, both kernels are trusted, and the gradients are memory="none"'s."""
    from gift_kernels import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(dispatch.AUTO_ON_INTERPRETER_ENV, "1")
    monkeypatch.setenv("GIFT_BACKEND", "auto")
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "kernels.json"))
    for name in ("_CHOICES", "_DECIDED", "_IDENTITIES"):
        monkeypatch.setattr(dispatch, name, {})
    monkeypatch.setattr(dispatch, "_WARNED", set())
    monkeypatch.setattr(dispatch, "cpu_timer", lambda fn: 0.5 if fn.func.__name__ == "matmul_lowrank_epilogue" else 1.)
    cfg = GIFTConfig(rank=8, num_clusters=5, target_modules=("attn.proj", "mlp.fc1"))
    fast = FastGIFT(tiny_timm_vit(), cfg, memory=memory)
    randomize_gift_(fast)
    x = torch.randn(2, 3, 32, 32)
    got = outputs_and_grads(fast.train(), x)
    verdicts = {entry.split(" | ")[1]: (v["backend"], v["reason"]) for entry, v in
                json.loads((tmp_path / "kernels.json").read_text()).items()}
    assert verdicts == {"paca_attention": ("triton", None), "lowrank_residual_linear": ("triton", None)}, verdicts
    fast.set_memory("none")
    assert_model_agrees(outputs_and_grads(fast, x), got, None, fast)
