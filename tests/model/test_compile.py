"""torch.compile of FastGIFT (torch path): fullgraph training in every memory mode, no recompile after the first
step, and compiled results that agree with the float64 answer. Tiny models only: each compile costs seconds."""
import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils

from gift import FastGIFT, GIFTConfig
from gift.config import MEMORY_MODES
from gift.testing import assert_model_agrees, model_exact_and_baseline, outputs_and_grads, twin_models
from tests.helpers import ToyViT


def train_steps(model, compiled, steps: int) -> list[int]:
    """``steps`` AdamW steps of ``compiled`` (the compiled ``model``); the frames dynamo compiled after each."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    x, y = torch.randn(2, 5, 12), torch.tensor([0, 2])
    frames = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return frames


@pytest.mark.parametrize("memory", MEMORY_MODES)
def test_compiles_fullgraph_in_training_without_recompiling(memory):
    torch.manual_seed(0)
    model = FastGIFT(ToyViT(), GIFTConfig(rank=8, num_clusters=5), memory=memory)
    before = [p.detach().clone() for p in model.gift_parameters()]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    frames = train_steps(model, torch.compile(model, fullgraph=True), steps=3)
    assert frames[0] >= 1 and frames == [frames[0]] * 3, f"graphs compiled after each step: {frames}"
    assert any(not torch.equal(a, p) for a, p in zip(before, model.gift_parameters())), "no generator weight moved"


def test_recompile_count_sees_a_recompile():
    """The gate above on a known-bad case: a model whose forward reads a Python number that changes every step."""
    torch.manual_seed(0)
    model = FastGIFT(ToyViT(), GIFTConfig(rank=8, num_clusters=5))
    model.scale = 1.0
    inner = model.forward

    def forward(x):
        model.scale += 1.0
        return inner(x) * model.scale

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    frames = train_steps(model, torch.compile(forward), steps=3)
    assert frames[-1] > frames[0], f"graphs compiled after each step: {frames}"


def test_compiled_matches_eager():
    """Seeded (unseeded, the draw depended on the tests run before). The slack is the worst fp32 error of eager runs
    that sum in different orders (tokens permuted: ToyViT is invariant to it): on cancelling gradients (the PaCa
    query bias) one eager run's error varies tenfold with the order, and the compiled graph sums in its own."""
    torch.manual_seed(0)
    _, fast = twin_models(ToyViT(), GIFTConfig(rank=8, num_clusters=5))
    x = torch.randn(2, 5, 12)
    exact, eager = model_exact_and_baseline(fast, x)
    orders = ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3], [1, 3, 0, 4, 2])
    runs = [eager] + [outputs_and_grads(fast, x[:, perm]) for perm in orders]
    worst = {k: max(runs, key=lambda r: (r[k].double() - exact[k]).abs().max())[k] for k in exact}
    torch._dynamo.reset()
    got = outputs_and_grads(torch.compile(fast, fullgraph=True), x)
    got = {k.replace("_orig_mod.", ""): v for k, v in got.items()}
    assert_model_agrees(got, exact, worst, fast)


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_compiled_fullgraph_evaluates_like_eager(grad_mode):
    """Evaluation through the fullgraph-compiled model, in eval and in train mode (ToyViT has no dropout): the
    output agrees with the float64 answer as eager's does."""
    torch.manual_seed(0)
    _, fast = twin_models(ToyViT(), GIFTConfig(rank=8, num_clusters=5))
    exact_model = copy.deepcopy(fast).to(torch.float64)
    x = torch.randn(2, 5, 12)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True)
    for training in (False, True):
        fast.train(training)
        exact_model.train(training)
        with grad_mode():
            got, eager, exact = compiled(x), fast(x), exact_model(x.double())
        assert_model_agrees({"output": got}, {"output": exact}, {"output": eager}, fast)


@pytest.mark.parametrize("flag", ["--compile", "--torchcompile"])
def test_finetune_compile_flag_is_read(flag):
    from gift.app.cli import build_parser
    from gift.app.options import from_namespace
    from gift.app.run_config import FinetuneConfig

    argv = ["finetune", flag]
    assert from_namespace(FinetuneConfig, build_parser(argv).parse_args(argv)).compile is True
    argv = ["finetune"]
    assert from_namespace(FinetuneConfig, build_parser(argv).parse_args(argv)).compile is False


def test_finetune_with_compile_trains_through_the_compiled_module(tmp_path, monkeypatch):
    """The flag reaches the training loop: the module it trains through is torch.compile's (compiling itself is
    the tests above; here torch.compile records what it was given, so that the run stays cheap)."""
    from gift import FastGIFT
    from tests.helpers import finetune_run

    compiled, calls = [], []

    def record(module, **kwargs):
        compiled.append(module)

        def forward(*args, **kw):
            calls.append(1)
            return module(*args, **kw)
        return forward

    monkeypatch.setattr(torch, "compile", record)
    finetune_run(tmp_path, "run", "--compile", "--epochs", "1")
    assert len(compiled) == 1 and isinstance(compiled[0], FastGIFT)
    assert len(calls) == 3  # the 3 training steps of 96 images at batch 32 (evaluation runs the model itself)
    finetune_run(tmp_path, "plain", "--epochs", "1")
    assert len(compiled) == 1
