"""FastGIFT's generated residuals: one owner, made once and in effect everywhere (gift.residuals).

Gradient accumulation (one generator forward and backward per optimizer step, the gradients of one batch,
DDP), the entry points of the backbone (bare calls, timm feature extraction, a Hugging Face generate),
caching while the weights stand, concurrent inference, disable_adapter(), merge / load / unmerge, and a
second wrapper on an adapted backbone."""
import contextlib
import copy
import os
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gift import FastGIFT, GIFTConfig, GIFTReference
from gift.fast import WeightTokens
from gift.memory import SavedTensorCounter
from gift.testing import assert_model_agrees, model_exact_and_baseline, outputs_and_grads, randomize_gift_, twin_models
from gift.wrapper import GIFT_PREFIXES
from tests.helpers import ToyViT, tiny_timm_vit

TWO_KEYS = GIFTConfig(rank=6, num_clusters=5, target_modules=("attn.proj", "mlp.fc2"), in_projection_bias=True,
                      out_projection_bias=True)


def accumulated_outputs_and_grads(model, x, y, micro_batches, call=None, losses=1, accumulate=True):
    """`gift.testing.outputs_and_grads` with a cross-entropy target, as ``micro_batches`` micro-batches of one
    ``accumulate`` block (each loss divided by their count: the mean over the batch), through ``call(model, x)``
    (default: the wrapper's forward); ``losses`` > 1 splits each micro-batch's loss into as many backwards;
    ``accumulate=False``: the same loop without the block (the generator runs for every micro-batch)."""
    model.zero_grad(set_to_none=True)
    outputs = []
    with model.accumulate(micro_batches) if accumulate else contextlib.nullcontext():
        for xb, yb in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            out = model(xb) if call is None else call(model, xb)
            outputs.append(out.detach())
            loss = F.cross_entropy(out if out.dtype == torch.float64 else out.float(), yb) / micro_batches
            for i in range(losses):
                (loss / losses).backward(retain_graph=i < losses - 1)
    result = {"output": torch.cat(outputs)}
    result.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return result


class Calling(nn.Module):
    """``call(model, x)`` as a module around ``model``, so `outputs_and_grads` can run any entry point of it."""

    def __init__(self, model, call):
        super().__init__()
        self.model, self.call = model, call

    def forward(self, x):
        return self.call(self.model, x)


def outputs_and_grads_of(model, call, x, y=None):
    """`gift.testing.outputs_and_grads` of ``call(model, x)``, keyed by ``model``'s own parameter names."""
    return {k.removeprefix("model."): v for k, v in outputs_and_grads(Calling(model, call), x, y).items()}


class GeneratorCalls:
    """Counts a model's generator runs: forwards outside a backward, recomputations inside one, and backwards
    (a hook on every output of a forward outside a backward)."""

    def __init__(self, model):
        self.forwards = self.recomputations = self.backwards = 0
        original = model.generator_tokens

        def counted(key):
            if torch._C._current_graph_task_id() != -1:
                self.recomputations += 1  # counted first: a recomputation stops early, inside `original`
                return original(key)
            self.forwards += 1
            tokens = original(key)
            if tokens.requires_grad:
                tokens.register_hook(self._backward)
            return tokens

        model.generator_tokens = counted

    def _backward(self, grad):
        self.backwards += 1

    def take(self) -> tuple[int, int, int]:
        counts = (self.forwards, self.recomputations, self.backwards)
        self.forwards = self.recomputations = self.backwards = 0
        return counts


# ------------------------------------------------------------------------------------ gradient accumulation
@pytest.mark.parametrize("memory, recompute_generator", [("none", None), ("mlp", None), ("block", None),
                                                         ("none", True)])
@pytest.mark.parametrize("cfg", [GIFTConfig(rank=8, num_clusters=5), TWO_KEYS], ids=["one-key", "two-keys-biases"])
def test_accumulated_gradients_equal_one_batch(cfg, memory, recompute_generator):
    """Every trainable gradient of 4 accumulated micro-batches equals that of the whole batch: against the same
    model in float64 on the whole batch, with its fp32 error on the whole batch as slack (to rounding)."""
    _, fast = twin_models(tiny_timm_vit(), cfg, memory=memory, recompute_generator=recompute_generator)
    torch.manual_seed(3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    exact, baseline = model_exact_and_baseline(fast, x, y)
    got = accumulated_outputs_and_grads(fast.train(), x, y, 4)
    assert set(got) == set(exact) and len(got) > 10
    assert_model_agrees(got, exact, baseline, fast)
    assert fast.residuals.accumulation is None


def test_the_accumulation_check_fails_a_wrong_gradient():
    """The check above on a known-bad case: a micro-batch's loss not divided by the count (its gradient 4x)."""
    _, fast = twin_models(tiny_timm_vit(), GIFTConfig(rank=8, num_clusters=5))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    exact, baseline = model_exact_and_baseline(fast, x, y)
    fast.zero_grad(set_to_none=True)
    with fast.accumulate(4):
        for i, (xb, yb) in enumerate(zip(x.chunk(4), y.chunk(4))):
            (F.cross_entropy(fast(xb), yb) / (1 if i == 3 else 4)).backward()
    got = {"output": exact["output"].float(), **{n: p.grad for n, p in fast.named_parameters() if p.requires_grad}}
    with pytest.raises(AssertionError, match="tensors disagree"):
        assert_model_agrees(got, exact, baseline, fast)


@pytest.mark.parametrize("memory", ["none", "mlp", "block"])
def test_one_generator_forward_and_one_backward_per_optimizer_step(memory):
    fast = randomize_gift_(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3), memory=memory))
    calls = GeneratorCalls(fast)
    opt = torch.optim.AdamW([p for p in fast.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    recomputed = 1 if memory == "block" else 0  # memory="block" recomputes the generator in its backward
    for _ in range(2):
        with fast.accumulate(4):
            for xb, yb in zip(x.chunk(4), y.chunk(4)):
                (F.cross_entropy(fast(xb), yb) / 4).backward()
        opt.step()
        opt.zero_grad()
        assert calls.take() == (1, recomputed, 1)
    # the same loop without accumulate(): the generator runs for every micro-batch (what the count tells apart)
    for xb, yb in zip(x.chunk(4), y.chunk(4)):
        (F.cross_entropy(fast(xb), yb) / 4).backward()
    assert calls.take() == (4, 4 * recomputed, 4)


def test_a_wrong_number_of_micro_batches_is_a_clear_error_and_nothing_stays_behind():
    fast = randomize_gift_(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3)))
    keys = list(fast.state_dict())
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2,))
    with pytest.raises(RuntimeError, match=r"accumulate\(3\): 2 micro-batch forward\(s\) .* and 2 backward\(s\)"):
        with fast.accumulate(3):
            for _ in range(2):
                F.cross_entropy(fast(x), y).backward()
    with pytest.raises(RuntimeError, match=r"accumulate\(2\): a forward after the 2 micro-batches"):
        with fast.accumulate(2):
            for _ in range(3):
                F.cross_entropy(fast(x), y).backward()
    with pytest.raises(RuntimeError, match=r"micro-batch 2's forward began before the backward of micro-batch 1"):
        with fast.accumulate(2):
            [F.cross_entropy(fast(x), y) for _ in range(2)]
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)  # another model's optimizer may step meanwhile
    with fast.accumulate(2):
        for _ in range(2):
            F.cross_entropy(fast(x), y).backward()
            other.step()
    opt = torch.optim.SGD([p for p in fast.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(RuntimeError, match=r"optimizer.step\(\) ran inside FastGIFT.accumulate\(2\)"):
        with fast.accumulate(2):
            F.cross_entropy(fast(x), y).backward()
            opt.step()
            fast(x)
    with pytest.raises(ValueError, match="positive int"):
        with fast.accumulate(0):
            pass
    # after each failed block the model trains as before, and a copy, its state dict and an EMA carry nothing
    assert fast.residuals.accumulation is None
    from timm.utils import ModelEmaV3

    copies = [copy.deepcopy(fast), ModelEmaV3(fast).module]
    assert all(c.residuals.accumulation is None and not c.residuals._training and not c.residuals._latest
               for c in copies)
    assert list(fast.state_dict()) == keys
    fast.zero_grad()
    with fast.accumulate(2):
        for _ in range(2):
            F.cross_entropy(fast(x), y).backward()
    assert all(p.grad is not None for p in fast.gift_parameters())


def test_an_exception_inside_accumulate_drops_its_state():
    fast = FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3))
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(KeyboardInterrupt):
        with fast.accumulate(4):
            fast(x).sum().backward()
            raise KeyboardInterrupt
    assert fast.residuals.accumulation is None
    with fast.accumulate(1):
        fast(x).sum().backward()


def bare_backbone(model, x):
    return model.backbone(x)


@pytest.mark.parametrize("memory, recompute_generator", [("mlp", None), ("block", False), ("block", None)])
@pytest.mark.parametrize("targets", [("mlp.fc2",), ("attn.proj", "mlp.fc2")], ids=["fc2", "proj-fc2"])
def test_accumulating_bare_backbone_calls_whose_generator_runs_inside_a_checkpointed_block(targets, memory,
                                                                                         recompute_generator):
    """``model.backbone(x)`` inside ``accumulate``: the first target layer asks for the residuals inside a block that
    ``memory`` recomputes, so the generator runs there; its graph must not belong to that block's checkpoint (the
    last micro-batch's backward would unpack tensors of micro-batch 1's checkpoint). The gradients are one batch's,
    with one generator forward per key and step, and its recomputation only where the generator is recomputed."""
    cfg = GIFTConfig(rank=6, num_clusters=5, target_modules=targets)
    _, fast = twin_models(tiny_timm_vit(), cfg, memory=memory, recompute_generator=recompute_generator)
    torch.manual_seed(3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    exact, baseline = model_exact_and_baseline(fast, x, y)
    calls = GeneratorCalls(fast)
    got = accumulated_outputs_and_grads(fast.train(), x, y, 4, call=bare_backbone)
    assert_model_agrees(got, exact, baseline, fast)
    keys = len(fast.target_groups)
    assert calls.take() == (keys, keys if fast.generator_recomputed else 0, keys)


def test_accumulate_trains_with_the_generator_frozen():
    """psi-only and head-only training inside ``accumulate`` (the generator's tokens need no gradient, so no
    micro-batch hands one back): the trainable gradients are one batch's."""
    for frozen in (("in_projections.", "hypernets."), ("in_projections.", "hypernets.", "out_projections.")):
        _, fast = twin_models(tiny_timm_vit(), TWO_KEYS)
        for name, p in fast.named_parameters():
            p.requires_grad_(p.requires_grad and not name.startswith(frozen))
        torch.manual_seed(3)
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
        exact, baseline = model_exact_and_baseline(fast, x, y)
        got = accumulated_outputs_and_grads(fast.train(), x, y, 4)
        assert set(got) == set(exact) and any(n.startswith("backbone.head") for n in got)
        assert_model_agrees(got, exact, baseline, fast)


def test_several_backwards_per_micro_batch_accumulate_like_one():
    """Each micro-batch's loss in 2 backwards (``retain_graph``): the gradients are one batch's. The baseline is the
    same split loop without ``accumulate`` in fp32 (the split rounds differently from one batch, which shows on the
    gradients that cancel to nearly zero)."""
    _, fast = twin_models(tiny_timm_vit(), TWO_KEYS)
    torch.manual_seed(3)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    exact, _ = model_exact_and_baseline(fast, x, y)
    baseline = accumulated_outputs_and_grads(fast.train(), x, y, 3, losses=2, accumulate=False)
    got = accumulated_outputs_and_grads(fast, x, y, 3, losses=2)
    assert_model_agrees(got, exact, baseline, fast)


def test_zero_grad_between_micro_batches_is_a_clear_error():
    """``zero_grad()`` (either kind) inside the block would drop the earlier micro-batches from psi's and the head's
    gradients but not from the generator's: the next backward raises."""
    fast = randomize_gift_(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3))).train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2,))
    for set_to_none in (True, False):
        fast.zero_grad()
        with pytest.raises(RuntimeError, match=r"\.grad was zeroed, replaced or changed between the micro-batches"):
            with fast.accumulate(2):
                for _ in range(2):
                    F.cross_entropy(fast(x), y).backward()
                    fast.zero_grad(set_to_none=set_to_none)
        assert fast.residuals.accumulation is None
    # without the zero_grad the same loop passes, and the hooks are gone after the block
    fast.zero_grad()
    with fast.accumulate(2):
        for _ in range(2):
            F.cross_entropy(fast(x), y).backward()
    fast.zero_grad(set_to_none=False)
    F.cross_entropy(fast(x), y).backward()
    F.cross_entropy(fast(x), y).backward()


def _hf_vit(reentrant):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       image_size=32, patch_size=8, num_labels=5)
    vit = ViTForImageClassification(config)
    if reentrant is not None:
        vit.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        vit.enable_input_require_grads()
    cfg = GIFTConfig(rank=8, num_clusters=16, target_modules=("attention.o_proj",))
    return randomize_gift_(FastGIFT(vit, cfg), seed=3, scale=0.2).train()


def hf_logits(model, x):
    return model(x).logits


def test_hugging_face_reentrant_checkpointing_inside_accumulate():
    """PEFT's recipe (``use_reentrant=True``: each layer's forward under ``no_grad``, recomputed in a backward of its
    own) and the non-reentrant one inside ``accumulate(2)``, through the wrapper and the bare backbone: one batch's
    gradients, one generator forward and one backward per step."""
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 3, 0, 4])
    plain = _hf_vit(None)
    exact, baseline = (
        {k.removeprefix("model."): v for k, v in r.items()}
        for r in model_exact_and_baseline(Calling(plain, hf_logits), x, y)
    )
    for reentrant in (True, False):
        for call in (hf_logits, lambda m, x: m.backbone(x).logits):
            model = _hf_vit(reentrant)
            calls = GeneratorCalls(model)
            got = accumulated_outputs_and_grads(model, x, y, 2, call=call)
            assert_model_agrees(got, exact, baseline, plain)
            assert calls.take() == (1, 0, 1)


def _ddp_worker(rank, world_size, store, out, cfg, micro_batches):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        _, fast = twin_models(tiny_timm_vit(), cfg)
        names = {id(p): n for n, p in fast.named_parameters()}
        ddp = nn.parallel.DistributedDataParallel(fast)
        reduced = []  # (micro-batch, parameter names) of every bucket reduced

        def hook(state, bucket):
            reduced.append((state["micro_batch"], [names[id(p)] for p in bucket.parameters()]))
            return default_hooks.allreduce_hook(None, bucket)

        state = {"micro_batch": None}
        ddp.register_comm_hook(state, hook)
        torch.manual_seed(3)
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
        local = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
        with fast.accumulate(micro_batches):
            for i, (xb, yb) in enumerate(zip(local[0].chunk(micro_batches), local[1].chunk(micro_batches))):
                state["micro_batch"] = i
                sync = i == micro_batches - 1
                with ddp.no_sync() if not sync else torch.enable_grad():
                    (F.cross_entropy(ddp(xb), yb) / micro_batches).backward()
        grads = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
        torch.save({"grads": grads, "reduced": reduced}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_on_two_processes_reduces_the_generator_once_and_matches_one_process(tmp_path):
    """2 gloo processes x 2 accumulated micro-batches (no_sync() for the first) against the whole batch in one
    process: the same gradients, and each parameter reduced once, in the last micro-batch's backward."""
    cfg = GIFTConfig(rank=8, num_clusters=5)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path), cfg, 2), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    _, fast = twin_models(tiny_timm_vit(), cfg)
    torch.manual_seed(3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    exact, baseline = model_exact_and_baseline(fast, x, y)
    for result in results:
        got = {"output": exact["output"].float(), **result["grads"]}
        assert_model_agrees(got, exact, baseline, fast)
        reduced = [name for micro_batch, names in result["reduced"] for name in names]
        assert {micro_batch for micro_batch, _ in result["reduced"]} == {1}
        trainable = [n for n, p in fast.named_parameters() if p.requires_grad]
        assert sorted(reduced) == sorted(trainable) and any(n.startswith("hypernets.") for n in reduced)
    for name, grad in results[0]["grads"].items():
        assert torch.equal(grad, results[1]["grads"][name]), name  # all-reduced: the same on both processes


# ------------------------------------------------------------------------------------ entry points
def _perturbed_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    llama = LlamaForCausalLM(config).eval()
    plain = copy.deepcopy(llama)
    model = FastGIFT(llama, GIFTConfig(rank=8, num_clusters=16, target_modules=("o_proj",)))
    return randomize_gift_(model, seed=1, scale=0.2, psi_scale=0.2).eval(), plain


def test_a_wrapped_hugging_face_llama_generates_with_the_adapter():
    """``model.backbone.generate`` (greedy, with its KV cache) gives the tokens of greedy decoding through the
    wrapper's forward, not those of the plain Llama; the generator runs once for the whole generation."""
    model, plain = _perturbed_llama()
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(0))
    calls = GeneratorCalls(model)
    with torch.no_grad():
        generated = model.backbone.generate(ids, max_new_tokens=8, do_sample=False)
        assert calls.take()[0] == 1
        sequence = ids
        for _ in range(8):
            sequence = torch.cat([sequence, model(sequence).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        plain_generated = plain.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.tolist() == sequence.tolist()
    assert generated.tolist() != plain_generated.tolist()  # the adapter changes the tokens: the check can fail


def test_bare_backbone_and_feature_extraction_train_with_the_adapters_gradients():
    """A training step through ``forward_features``/``forward_head`` (not the wrapper) in every memory mode gives
    the wrapper's outputs and gradients."""
    _, fast = twin_models(tiny_timm_vit(), TWO_KEYS)
    x = torch.randn(2, 3, 32, 32)
    exact, baseline = model_exact_and_baseline(fast, x)
    for memory in ("none", "mlp", "block"):
        fast.set_memory(memory)
        got = outputs_and_grads_of(fast, lambda m, x: m.backbone.forward_head(m.backbone.forward_features(x)), x)
        assert_model_agrees(got, exact, baseline, fast)


# ------------------------------------------------------------------------------------ caching
def test_eval_forwards_reuse_the_residuals_until_a_weight_changes():
    fast = randomize_gift_(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3))).eval()
    calls = GeneratorCalls(fast)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = fast(x)
        for _ in range(4):
            assert torch.equal(fast(x), first)
        fast.backbone.forward_features(x)
    assert calls.take()[0] == 1

    def fresh_output():
        other = FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3)).eval()
        other.load_state_dict(fast.state_dict())
        with torch.no_grad():
            return other(x)

    # fused AdamW moves the parameters without bumping their version counters: the step count sees it
    fast.train()
    F.cross_entropy(fast(x), torch.tensor([0, 1])).backward()
    versions = [p._version for p in fast.gift_parameters()]
    torch.optim.AdamW([p for p in fast.parameters() if p.requires_grad], lr=0.1, fused=True).step()
    assert [p._version for p in fast.gift_parameters()] == versions
    calls.take()
    fast.eval()
    with torch.no_grad():
        stepped = fast(x)
    assert calls.take()[0] == 1 and not torch.equal(stepped, first)
    torch.testing.assert_close(stepped, fresh_output(), rtol=0, atol=0)
    with torch.no_grad():  # an in-place edit (load_state_dict, copy_, an EMA update) bumps the version
        fast.hypernets["attn:proj"].blocks[0].attn.q.weight.mul_(1.5)
        edited = fast(x)
    assert calls.take()[0] == 1
    torch.testing.assert_close(edited, fresh_output(), rtol=0, atol=0)
    with torch.no_grad():  # an edit through .data is invisible to autograd's counters: reset() is the way
        fast.hypernets["attn:proj"].blocks[0].attn.v.weight.data.mul_(2)
        assert torch.equal(fast(x), edited)
        fast.residuals.reset()
        latest = fast(x)
        torch.testing.assert_close(latest, fresh_output(), rtol=0, atol=0)
    calls.take()
    fast.to(torch.float64)  # a cast: new storages, so new residuals
    with torch.no_grad():
        out = fast(x.double())
    assert out.dtype == torch.float64 and calls.take()[0] == 1
    torch.testing.assert_close(out.float(), latest, rtol=1e-4, atol=1e-5)


def _fresh_output(model, x, state=None):
    """The output of a new model holding ``model``'s state (or ``state``): no residuals cached."""
    other = FastGIFT(tiny_timm_vit(), model.config).eval()
    other.load_state_dict(model.state_dict() if state is None else state)
    with torch.no_grad():
        return other(x)


def test_a_replaced_parameter_object_or_storage_makes_the_residuals_again():
    """The cached pair is checked against the live parameters at every call: a new GIFT parameter or target weight
    object, ``load_state_dict(assign=True)`` of a submodule, a submodule's cast round trip and
    ``torch.func.functional_call`` each give the output of a fresh model with that state."""
    x = torch.randn(2, 3, 32, 32)

    def cached_model():
        model = randomize_gift_(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3)), scale=0.3).eval()
        with torch.no_grad():
            model(x)  # fills the cache
        return model

    def replace_gift_parameter(m):
        q = m.hypernets["attn:proj"].blocks[0].attn.q
        q.weight = nn.Parameter(q.weight.detach() * 3)

    def replace_target_weight(m):
        layer = m.target_groups[0].modules[0]
        layer.weight = nn.Parameter(layer.weight.detach() * 2, requires_grad=False)

    def load_backbone_assigning(m):
        state = {k: v * 1.5 if "attn.proj.weight" in k else v for k, v in m.backbone.state_dict().items()}
        m.backbone.load_state_dict(state, assign=True)

    def load_hypernet_assigning(m):
        hypernet = m.hypernets["attn:proj"]
        hypernet.load_state_dict({k: v * 1.5 for k, v in hypernet.state_dict().items()}, assign=True)

    def cast_hypernets_round_trip(m):
        m.hypernets.double().float()  # new storages, versions unchanged

    for edit in (replace_gift_parameter, replace_target_weight, load_backbone_assigning, load_hypernet_assigning,
                 cast_hypernets_round_trip):
        model = cached_model()
        with torch.no_grad():
            before = model(x)
            edit(model)
            after = model(x)
        torch.testing.assert_close(after, _fresh_output(model, x), rtol=0, atol=0, msg=edit.__name__)
        if edit is not cast_hypernets_round_trip:
            assert (after - before).abs().max() > 1e-3, edit.__name__  # the edit shows: a stale pair would fail

    model = cached_model()
    params = {n: p.detach() * 1.5 for n, p in model.named_parameters() if n.startswith(GIFT_PREFIXES)}
    with torch.no_grad():
        plain = model(x)
        called = torch.func.functional_call(model, params, (x,))
        after = model(x)
    state = {**model.state_dict(), **params}
    torch.testing.assert_close(called, _fresh_output(model, x, state), rtol=0, atol=0)
    assert torch.equal(after, plain) and (called - plain).abs().max() > 1e-3
    fresh = randomize_gift_(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3)), scale=0.3).eval()
    with torch.no_grad():  # a first functional_call on an empty cache leaves no pair behind for plain calls
        torch.func.functional_call(fresh, params, (x,))
        torch.testing.assert_close(fresh(x), plain, rtol=0, atol=0)


def test_unfreezing_the_gift_parameters_gives_the_generator_its_gradients():
    """A grad-enabled pass with every GIFT parameter frozen makes a pair without a graph; after ``requires_grad_(True)``
    (no optimizer step between) the next pass must not reuse it: every GIFT parameter gets a gradient."""
    fast = randomize_gift_(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3))).train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2,))
    for call in (lambda m: m(x), lambda m: m.backbone(x)):
        fast.zero_grad(set_to_none=True)
        for p in fast.gift_parameters():
            p.requires_grad_(False)
        F.cross_entropy(call(fast), y).backward()
        for p in fast.gift_parameters():
            p.requires_grad_(True)
        F.cross_entropy(call(fast), y).backward()
        assert all(p.grad is not None for p in fast.gift_parameters())


def test_two_threads_training_through_one_model_keep_their_own_passes():
    """Two threads take input gradients (saliency) through one model, interleaved: B's first layer runs between A's
    first and second, A's backward before B's second layer. Each gets its single-thread gradient. And another
    thread's forward and backward during an ``accumulate`` block are not one of its micro-batches."""
    fast = randomize_gift_(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3)), scale=0.3).eval()
    xs = {"A": torch.randn(2, 3, 32, 32), "B": torch.randn(2, 3, 32, 32)}

    def saliency(x):
        x = x.clone().requires_grad_(True)
        return torch.autograd.grad(fast(x).square().sum(), x)[0]

    want = {name: saliency(x) for name, x in xs.items()}
    events = {name: threading.Event() for name in ("a_started", "b_layer0", "a_backward")}
    layer0, layer1 = fast.target_groups[0].modules[:2]

    def wait(name):
        events[name].wait(timeout=60)  # a missed interleaving only weakens the test; the results are checked below

    def before_layer0(module, args):
        if threading.current_thread().name == "A":
            events["a_started"].set()

    def after_layer0(module, args, out):
        if threading.current_thread().name == "B":
            events["b_layer0"].set()

    def before_layer1(module, args):
        name = threading.current_thread().name
        if name == "A":
            wait("b_layer0")
        elif name == "B":
            wait("a_backward")

    hooks = [layer0.register_forward_pre_hook(before_layer0), layer0.register_forward_hook(after_layer0),
             layer1.register_forward_pre_hook(before_layer1)]
    got, errors = {}, []

    def run(name):
        try:
            if name == "B":
                wait("a_started")
            got[name] = saliency(xs[name])
        except Exception as e:  # reported below
            errors.append(e)
        finally:
            if name == "A":
                events["a_backward"].set()

    threads = [threading.Thread(target=run, args=(name,), name=name) for name in xs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for hook in hooks:
        hook.remove()
    assert not errors, errors
    for name in xs:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)

    fast.train().set_memory("block")  # the other thread's backward recomputes its blocks: not the block's either
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    with fast.accumulate(2):
        for i, (xb, yb) in enumerate(zip(x.chunk(2), y.chunk(2))):
            loss = F.cross_entropy(fast(xb), yb) / 2
            if i == 0:  # between this micro-batch's forward and its backward
                other = threading.Thread(target=lambda: got.update(other=saliency(xs["A"])))
                other.start()
                other.join()
            loss.backward()
    assert "other" in got and all(p.grad is not None for p in fast.gift_parameters())


def test_concurrent_inference_gives_the_single_thread_outputs():
    """4 threads x 12 eval forwards on one unmerged model, with the residuals dropped now and then by another
    thread (so threads make them again while others run), all bit-equal to one thread's output."""
    fast = randomize_gift_(FastGIFT(tiny_timm_vit(), TWO_KEYS), seed=2, scale=0.3).eval()
    inputs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        want = [fast(x) for x in inputs]
        plain = copy.deepcopy(fast)
        with plain.disable_adapter():
            assert all((plain(x) - w).abs().max() > 1e-3 for x, w in zip(inputs, want))  # a wrong output shows
    wrong, errors, stop = [], [], threading.Event()

    def infer(i):
        try:
            with torch.no_grad():
                for _ in range(12):
                    out = fast(inputs[i]) if i % 2 == 0 else fast.backbone(inputs[i])
                    if not torch.equal(out, want[i]):
                        wrong.append(i)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def reset():
        while not stop.is_set():
            fast.residuals.reset()
            stop.wait(0.002)

    threads = [threading.Thread(target=infer, args=(i,)) for i in range(4)]
    resetter = threading.Thread(target=reset)
    resetter.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    resetter.join()
    assert not errors and not wrong


def test_disable_adapter_gives_the_plain_backbone_at_every_entry_point():
    backbone = tiny_timm_vit().eval()
    plain = copy.deepcopy(backbone)
    fast = randomize_gift_(FastGIFT(backbone, GIFTConfig(rank=4, num_clusters=3)), scale=0.3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted = fast(x)
        with fast.disable_adapter():
            torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)
            torch.testing.assert_close(fast.backbone.forward_features(x), plain.forward_features(x), rtol=0, atol=0)
            with fast.disable_adapter():
                torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)
            torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)
        assert torch.equal(fast(x), adapted) and (adapted - plain(x)).abs().max() > 1e-3
        fast.merge()
        with pytest.raises(RuntimeError, match="merged.*unmerge\\(\\) before disable_adapter"):
            with fast.disable_adapter():
                pass


# ------------------------------------------------------------------------------------ merge, load, unmerge
def test_merge_load_adapter_unmerge_sequences_leave_the_weights_exact(tmp_path):
    backbone = tiny_timm_vit()
    pretrained = {k: v.clone() for k, v in backbone.state_dict().items()}
    a = randomize_gift_(FastGIFT(backbone, GIFTConfig(rank=4, num_clusters=3)), seed=1, scale=0.3).eval()
    b = randomize_gift_(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3)), seed=2, scale=0.3).eval()
    b.save_adapter(tmp_path / "b")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out_a, out_b = a(x), b(x)

    def weights_exact():
        return all(torch.equal(a.backbone.state_dict()[k], pretrained[k]) for k in pretrained if "head" not in k)

    with torch.no_grad():
        for _ in range(3):
            a.merge()
            assert not weights_exact()
            a.unmerge()
            assert weights_exact()  # bit for bit, not W + dW - dW
        a.merge()
        a.load_adapter(tmp_path / "b")  # while merged: merged in its turn
        assert a.merged
        torch.testing.assert_close(a(x), out_b, rtol=1e-5, atol=1e-5)
        a.unmerge()
        assert weights_exact()
        torch.testing.assert_close(a(x), out_b, rtol=0, atol=0)
        a.merge()
        a.out_projections["attn:proj"].weight.mul_(2)  # an edit while merged: the merged weights are stale
        with pytest.raises(RuntimeError, match="GIFT weights changed while merged"):
            a(x)
        a.unmerge()
        assert weights_exact()
    deployable = a.merge_and_unload()
    with pytest.raises(RuntimeError, match="merge_and_unload\\(\\) handed the merged backbone over"):
        a.unmerge()
    assert not any(getattr(m, "gift_adapted", False) for m in deployable.modules())
    assert out_a.shape == out_b.shape


def test_a_failed_load_while_merged_changes_nothing(tmp_path):
    a = randomize_gift_(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3)), scale=0.3).eval()
    FastGIFT(tiny_timm_vit(), GIFTConfig(rank=8, num_clusters=3)).save_adapter(tmp_path / "other_rank")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a.merge()
        merged = a(x)
        with pytest.raises(ValueError, match="was saved with GIFTConfig"):
            a.load_adapter(tmp_path / "other_rank")
        assert a.merged and torch.equal(a(x), merged)


def test_wrapping_an_adapted_backbone_again_is_refused_and_the_first_model_keeps_working():
    cfg = GIFTConfig(rank=4, num_clusters=3)
    first = randomize_gift_(FastGIFT(tiny_timm_vit(), cfg), scale=0.3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = first(x)
    for wrapper in (FastGIFT, GIFTReference):
        with pytest.raises(ValueError, match="already wrapped by GIFT .*'blocks.0.attn.proj'.*Wrap a fresh backbone"):
            wrapper(first.backbone, cfg)
    for other_targets in (("mlp.fc2",), ("mlp.fc1", "attn.qkv")):  # other targets than the first wrapper's too
        with pytest.raises(ValueError, match="already wrapped by GIFT .*'blocks.0.attn.proj'"):
            FastGIFT(first.backbone, GIFTConfig(rank=4, num_clusters=3, target_modules=other_targets))
    with pytest.raises(ValueError, match="Block is already wrapped by GIFT .*'attn.proj'"):
        FastGIFT(first.backbone.blocks[0], GIFTConfig(rank=4, num_clusters=3, target_modules=("mlp.fc2",)))
    reference = GIFTReference(ToyViT(), cfg)
    with pytest.raises(ValueError, match="already wrapped by GIFT"):
        FastGIFT(reference.backbone, cfg)
    with pytest.raises(ValueError, match="already wrapped by GIFT"):
        GIFTReference(reference.backbone, GIFTConfig(rank=4, num_clusters=3, target_modules=("mlp.fc2",)))
    with torch.no_grad():
        assert torch.equal(first(x), before)
    first.train()(x).sum().backward()
    assert all(p.grad is not None for p in first.gift_parameters())
    FastGIFT(first.merge_and_unload(), cfg)  # the plain backbone it hands over wraps again


# ------------------------------------------------------------------------------------ the generator's memory
def test_weight_tokens_keep_no_cast_copy_of_16_bit_weights_and_have_the_linear_gradients():
    torch.manual_seed(0)
    weights = [torch.randn(7, 5, dtype=torch.float64) for _ in range(3)]
    phi_w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    phi_b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, b: WeightTokens.apply(w, b, *weights), (phi_w, phi_b))
    bf16 = [nn.Parameter(w.to(torch.bfloat16), requires_grad=False) for w in weights]
    phi = nn.Linear(5, 4, bias=False)
    with SavedTensorCounter(exclude=bf16 + [phi.weight]) as ours:
        WeightTokens.apply(phi.weight, None, *bf16)
    with SavedTensorCounter(exclude=bf16 + [phi.weight]) as autograds:
        torch.stack([phi(w.float()) for w in bf16])
    assert ours.bytes == 0 and autograds.bytes == 3 * 7 * 5 * 4  # autograd's linear keeps each fp32 cast


def test_memory_block_recomputes_the_generator_and_the_plan_counts_it():
    from gift.plan import plan_model

    fast = FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3))
    plan = plan_model(fast, (2, 3, 32, 32), None)
    assert plan.modes["none"].generator_saved > 0 and plan.modes["mlp"].generator_saved > 0
    assert plan.modes["block"].generator_saved == 0
    fast.recompute_generator = True  # the option elsewhere
    assert fast.generator_recomputed and plan_model(fast, (2, 3, 32, 32), None).modes["none"].generator_saved == 0


def test_hugging_face_reentrant_checkpointing_gives_the_generators_gradients():
    """PEFT's recipe, ``gradient_checkpointing_enable(use_reentrant=True)`` with ``enable_input_require_grads()``,
    recomputes each layer in a backward of its own: each gets a fresh pair (the last one's backward has run), so the
    generator's gradients are those without checkpointing (they were all zero when the pair was shared)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       image_size=32, patch_size=8, num_labels=5)
    state = copy.deepcopy(ViTForImageClassification(config).state_dict())
    cfg = GIFTConfig(rank=8, num_clusters=16, target_modules=("attention.o_proj",))

    def wrapped(reentrant):
        vit = ViTForImageClassification(config)
        vit.load_state_dict(state)
        if reentrant is not None:
            vit.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            vit.enable_input_require_grads()
        return randomize_gift_(FastGIFT(vit, cfg), seed=3, scale=0.2).train()

    def logits(model, x):
        return model(x).logits

    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    plain = wrapped(None)
    exact, baseline = (
        {k.removeprefix("model."): v for k, v in r.items()}
        for r in model_exact_and_baseline(Calling(plain, logits), x, y)
    )
    for reentrant in (True, False):
        assert_model_agrees(outputs_and_grads_of(wrapped(reentrant), logits, x, y), exact, baseline, plain)


def test_memory_auto_inside_accumulate_plans_steps_of_its_micro_batches():
    from gift.plan import plan_model
    from tests.helpers import budget_for

    x = torch.randn(2, 3, 32, 32)
    probe = FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3))
    accumulated = plan_model(probe, x.shape, None, accumulation=4).modes
    fast = FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3), memory="auto",
                    memory_budget=budget_for(accumulated["block"].peak))
    with fast.accumulate(4):
        for _ in range(4):
            fast(x).sum().backward()
    assert fast.memory_reason.startswith("memory=") and "with 4 micro-batches of 2" in fast.memory_reason
    assert not fast.memory_pending


def test_a_checkpoint_around_the_whole_model_keeps_the_generators_graph_out_of_it():
    """``checkpoint(model, x)``: the wrapper's forward made the residuals inside the checkpointed region, outside its
    saved-tensor hooks, so the recomputation takes the same pair without running the generator again; the
    gradients are those without the checkpoint."""
    from torch.utils.checkpoint import checkpoint

    _, fast = twin_models(tiny_timm_vit(), TWO_KEYS)
    x = torch.randn(2, 3, 32, 32)
    exact, baseline = model_exact_and_baseline(fast, x)
    calls = GeneratorCalls(fast)
    for memory in ("none", "block"):
        fast.set_memory(memory)
        got = outputs_and_grads_of(fast, lambda m, x: checkpoint(m, x, use_reentrant=False), x)
        assert_model_agrees(got, exact, baseline, fast)
        keys = len(fast.target_groups)
        assert calls.take() == (keys, keys if fast.generator_recomputed else 0, keys)


def test_one_default_budget_for_every_plan(monkeypatch):
    """`gift.predict.default_memory_budget`: None off CUDA; on CUDA the driver's free memory, plus the caching
    allocator's unused reserve, plus the model's tensors on the device (here with the CUDA queries stubbed)."""
    from gift import predict

    assert predict.default_memory_budget("cpu", FastGIFT(ToyViT(), GIFTConfig(rank=4, num_clusters=3))) is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 5000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 300)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 100)
    assert predict.default_memory_budget("cuda:0") == 1200
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # a model with 64 bytes on the GPU, faked (no GPU here)
        weight = torch.empty(4, 4, device="cuda")
    model = ToyViT()  # and its CPU tensors, which the GPU's budget does not get
    model.held = nn.Parameter(weight, requires_grad=False)
    assert predict.default_memory_budget("cuda:0", model) == 1200 + 64


def test_the_graph_of_a_forward_without_backward_is_dropped_at_the_next_forward():
    """A grad-enabled forward whose output is dropped unused: its generator graph goes with the next forward's pair
    (or with ``reset()``), not kept for the model's lifetime."""
    import gc
    import weakref

    fast = randomize_gift_(FastGIFT(tiny_timm_vit(), GIFTConfig(rank=4, num_clusters=3))).train()
    x = torch.randn(2, 3, 32, 32)
    for drop in (lambda: fast(x), fast.residuals.reset):
        fast(x)  # no backward
        tokens = weakref.ref(fast.residuals._training["attn:proj"].tokens)
        drop()
        gc.collect()
        assert tokens() is None


# ---------------------------------------------------------------- torch.func
def test_torch_func_grad_of_functional_call_generates_for_the_call():
    """``torch.func.grad`` over ``functional_call`` with parameters other than the model's, after a forward that
    filled the cache: the residuals come from the call's parameters, and its gradients are plain autograd's on a
    model holding them (float64, both)."""
    torch.manual_seed(0)
    model = randomize_gift_(FastGIFT(ToyViT(), TWO_KEYS).to(torch.float64), seed=2)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    model(x).sum().backward()  # a training pair cached too
    model.zero_grad(set_to_none=True)
    params = {n: p.detach() * (1.5 if p.requires_grad else 1.0) for n, p in model.named_parameters()}
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in plain.named_parameters():
            p.copy_(params[n])
    exact = outputs_and_grads(plain, x)
    weights = torch.linspace(-1, 1, exact["output"].numel(), dtype=torch.float64).reshape(exact["output"].shape)

    def loss(p):
        out = torch.func.functional_call(model, p, (x,))
        return (out * weights).sum(), out.detach()

    grads, out = torch.func.grad(loss, has_aux=True)(params)
    got = {"output": out, **{n: g for n, g in grads.items() if n in exact}}
    assert_model_agrees(got, exact, None, model)
