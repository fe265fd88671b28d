"""The bench's instruments: saved-for-backward bytes, interleaved timing and paired ratios with their
spread, GPU peak per step, agreement, and the providers (each one way to fine-tune the same timm model;
bench/README.md defines each in one line). Baselines come from packages: `gift.GIFTReference`,
`gift.FastGIFT`, `peft` LoRA; the model-level test helpers from `gift.testing`."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import gift
from gift.dtypes import autocast_for
from gift.lora import lora_model
from gift.memory import SavedTensorCounter  # noqa: F401  (the bench's saved-bytes instrument; re-exported)
from gift.targets import find_targets, freeze_all_but_classifier
from gift.testing import model_disagreements, outputs_and_grads, randomize_gift_, zero_gradient_names
from gift_kernels.testing import relative_errors

COMPILED = "+compile"  # a provider's name with this suffix: the same provider, its model under torch.compile
PROVIDERS = ("floor", "lora", "reference", "naive_merged", "fast_torch", "fast_torch+mlp", "fast_torch+block",
             "fast_triton", "floor+compile", "lora+compile", "reference+compile", "fast_torch+compile")
# every provider's time is divided by each
RATIO_BASELINES = ("floor", "lora", "naive_merged", "reference", "lora+compile")
ACCUMULATION_PROVIDERS = ("floor", "lora", "fast_torch", "fast_triton")  # one optimizer step of micro-batches
EVAL_PROVIDERS = ("merged", "lora", "fast_torch", "fast_triton")  # one inference forward


def interleaved_times(runs: dict[str, Callable[..., object]], rounds: int, warmup: int = 1,
                      sync: Callable[[], None] = lambda: None,
                      prepare: dict[str, Callable[[], tuple]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin (one call of each per round, the order
    reversed every other round) so that drifts of a noisy machine hit every provider alike.

    ``prepare[name]()``, when given, builds the arguments of ``runs[name]`` for each call; it runs (and the
    device is synchronised) before the clock starts, so only ``runs[name](*args)`` is timed.
    """
    prepare = prepare or {}

    def call(name: str, timed: list[float] | None) -> None:
        args = prepare[name]() if name in prepare else ()
        sync()
        start = time.perf_counter()
        runs[name](*args)
        sync()
        if timed is not None:
            timed.append(time.perf_counter() - start)

    for _ in range(warmup):
        for name in runs:
            call(name, None)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            call(name, times[name])
    return times


class RatioStats(NamedTuple):
    """Median and quartiles over rounds of the per-round ratio ``time(provider) / time(baseline)``."""

    median: float
    q1: float
    q3: float

    @property
    def half_iqr(self) -> float:
        return (self.q3 - self.q1) / 2


def quartiles(values: list[float]) -> RatioStats:
    """Median, first and third quartile (inclusive method: the sample's own min..max range)."""
    if len(values) == 1:
        return RatioStats(values[0], values[0], values[0])
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return RatioStats(q2, q1, q3)


def paired_ratios(times: dict[str, list[float]], baseline: str) -> dict[str, RatioStats]:
    """Each provider's time over the baseline's within each round (the two calls ran next to each other, so
    slow drifts of the machine cancel): median and interquartile range over rounds. Empty without ``baseline``."""
    if baseline not in times:
        return {}
    base = times[baseline]
    return {name: quartiles([a / b for a, b in zip(t, base)]) for name, t in times.items()}


def format_ratio(median: float | None, q1: float | None = None, q3: float | None = None) -> str:
    """``1.04 ±0.01``: the median to the digit of the half-IQR's first significant digit (3 decimals at most
    when the spread is 0 or unknown), the half-IQR to that digit."""
    if median is None:
        return ""
    if q1 is None or q3 is None or q3 <= q1:
        return f"{median:.3f}"
    half = (q3 - q1) / 2
    digits = min(max(0, -math.floor(math.log10(half))), 4)
    return f"{median:.{digits}f} ±{half:.{digits}f}" if round(half, digits) > 0 else f"{median:.{digits}f} ±{half:.1g}"


def bench_rounds(default: int) -> int:
    """Timing rounds: the ``GIFT_BENCH_ROUNDS`` environment variable when set, else ``default``."""
    value = os.environ.get("GIFT_BENCH_ROUNDS")
    if value is None or value == "":
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"GIFT_BENCH_ROUNDS={value!r} is not a positive integer; set e.g. GIFT_BENCH_ROUNDS=2.")
    return int(value)


def device_slug(device: torch.device) -> str:
    """A folder name for the machine: the GPU's name on CUDA, the CPU model elsewhere."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = "cpu " + line.split(":", 1)[1]
                        break
        except OSError:
            pass
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


# ---------------------------------------------------------------------------------------- providers
@dataclass
class Provider:
    """One way to fine-tune the model: ``step`` is one training step (forward, backward, AdamW step)."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    gift_model: gift.GIFTReference | gift.FastGIFT | None = None
    compile_s: float | None = None  # a compiled provider: seconds of its first step (`compile_first_step`)

    @property
    def compiled(self) -> bool:
        return self.name.endswith(COMPILED)

    def compile_first_step(self, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = None,
                           sync: Callable[[], None] = lambda: None) -> float:
        """Run a compiled provider's first step (where torch.compile compiles), before any timed one; its
        seconds are kept in ``compile_s``, a column of their own, never in a step's time. The trained weights and the
        optimizer are put back as they were, so that the provider still holds the weights the others hold."""
        restore = self.snapshot()
        start = time.perf_counter()
        self.step(x, y, dtype)
        sync()
        self.compile_s = time.perf_counter() - start
        restore()
        return self.compile_s

    def snapshot(self) -> Callable[[], None]:
        """A function that puts the trained weights back as they are now and empties the optimizer's state."""
        trained = [p for p in self.model.parameters() if p.requires_grad]
        kept = [p.detach().clone() for p in trained]

        def restore() -> None:
            with torch.no_grad():
                for p, k in zip(trained, kept):
                    p.copy_(k)
            self.optimizer.state.clear()

        return restore

    def step(self, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = None,
             micro_batches: int = 1) -> torch.Tensor:
        """One optimizer step on ``(x, y)``, as ``micro_batches`` accumulated micro-batches (each loss divided by
        their count; a `gift.FastGIFT` inside its ``accumulate``, the others as they are: the reference runs
        its generator for every micro-batch)."""
        accumulate = (self.gift_model.accumulate(micro_batches)
                      if micro_batches > 1 and isinstance(self.gift_model, gift.FastGIFT) else contextlib.nullcontext())
        with accumulate:
            for xb, yb in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
                with autocast_for(x.device, dtype):
                    loss = F.cross_entropy(self.model(xb).float(), yb) / micro_batches
                loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def eval_forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One inference forward (``torch.inference_mode``; the model in eval mode)."""
        with torch.inference_mode(), autocast_for(x.device, dtype):
            return self.model(x)


class GeneratorRuns:
    """Counts the generator runs of a provider's `gift.FastGIFT` (``runs``; none for other providers): wraps its
    ``generator_tokens``, which every residual pair goes through."""

    def __init__(self, provider: Provider):
        self.runs = 0
        model = provider.gift_model
        if isinstance(model, gift.FastGIFT):
            original = model.generator_tokens

            def counted(key: str) -> torch.Tensor:
                self.runs += 1
                return original(key)

            model.generator_tokens = counted

    def take(self) -> int:
        """The runs since the last call."""
        runs, self.runs = self.runs, 0
        return runs


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def gift_config(rank: int, num_clusters: int = 64) -> gift.GIFTConfig:
    return gift.GIFTConfig(rank=rank, block="paca", num_clusters=num_clusters, num_heads=1)


def first_target_module(backbone: nn.Module, target_modules: tuple[str, ...]) -> nn.Linear:
    """The adapted layer that runs first: the earliest of all targets in ``backbone.named_modules()`` order."""
    targets = {id(m) for group in find_targets(backbone, target_modules) for m in group.modules}
    return next(m for _, m in backbone.named_modules() if id(m) in targets)


def _restart_backward_here(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the floor: the layer's input plus a zero scalar that needs a gradient (and that no
    optimizer steps), so backward runs down to this input and nothing below it, as for an adapter at this layer.
    (Not a fresh leaf of the input: ``requires_grad_`` on an intermediate breaks a ``torch.compile`` graph.)"""
    return (args[0] + module.floor_gate.to(args[0].dtype), *args[1:])


class _MergedLinearForward:
    """``forward`` of one target layer of `naive_merged`: ``F.linear(x, W + dW, b)`` with ``dW`` from the
    reference's generator for that layer (one generator pass per layer per forward)."""

    def __init__(self, model: gift.GIFTReference, key: str, layer: int, module: nn.Linear):
        self.model, self.key, self.layer, self.module = model, key, layer, module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.module.weight + self.model.delta_weight(self.key, self.layer), self.module.bias)


def naive_merged(backbone: nn.Module, config: gift.GIFTConfig) -> gift.GIFTReference:
    """GIFT as a careful user would write it without this library: `gift.GIFTReference`'s parameters and
    generator, its residual hooks removed, and each target layer computing ``F.linear(x, W + dW, b)``."""
    model = gift.GIFTReference(backbone, config)
    model.remove_hooks()
    for group in model.target_groups:
        for layer, module in enumerate(group.modules):
            module.forward = _MergedLinearForward(model, group.key, layer, module)
    return model


def build_provider(name: str, backbone: nn.Module, rank: int, gift_state: dict | None = None) -> Provider:
    """One provider around a private copy of ``backbone``. ``gift_state`` loads the same GIFT weights
    into every GIFT provider so their outputs and gradients can be compared."""
    if name.endswith(COMPILED):  # the eager provider, its model compiled (graph breaks allowed, as users run it)
        eager = build_provider(name[:-len(COMPILED)], backbone, rank, gift_state)
        return Provider(name, torch.compile(eager.model), eager.optimizer, gift_model=eager.gift_model)
    backbone = copy.deepcopy(backbone)
    config = gift_config(rank)
    if name == "floor":
        freeze_all_but_classifier(backbone)
        optimizer = torch.optim.AdamW(_trainable(backbone), lr=1e-4)
        first = first_target_module(backbone, config.target_modules)
        first.floor_gate = nn.Parameter(torch.zeros((), device=first.weight.device))
        first.register_forward_pre_hook(_restart_backward_here)
        return Provider(name, backbone, optimizer)
    if name == "lora":
        model = lora_model(backbone, rank, config.target_modules)
        return Provider(name, model, torch.optim.AdamW(_trainable(model), lr=1e-4))
    if name == "merged":  # the plain backbone holding W + dW (`merge_and_unload()` of a FastGIFT on the private copy)
        model = gift.FastGIFT(backbone, config)
        if gift_state is not None:
            model.load_gift_state_dict(gift_state)
        plain = model.merge_and_unload()
        return Provider(name, plain, torch.optim.AdamW(_trainable(plain), lr=1e-4))
    if name == "reference":
        model = gift.GIFTReference(backbone, config)
    elif name == "naive_merged":
        model = naive_merged(backbone, config)
    elif name.startswith(("fast_torch", "fast_triton")):
        memory = name.split("+")[1] if "+" in name else "none"
        backend = "triton" if name.startswith("fast_triton") else "torch"
        model = gift.FastGIFT(backbone, config, memory=memory, backend=backend)
    else:
        raise ValueError(f"unknown provider {name!r}; known: {PROVIDERS}")
    if gift_state is not None:
        model.load_gift_state_dict(gift_state)
    return Provider(name, model, torch.optim.AdamW(_trainable(model), lr=1e-4), gift_model=model)


def random_gift_state(backbone: nn.Module, rank: int, seed: int = 0) -> dict:
    """GIFT weights with every tensor random (psi included, small), so that all gradients are non-zero."""
    model = gift.GIFTReference(copy.deepcopy(backbone), gift_config(rank))
    return randomize_gift_(model, seed=seed, scale=0.1, psi_scale=0.02).gift_state_dict()


def saved_bytes_of_step(provider: Provider, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Bytes saved for backward by one forward (activations; parameters and buffers not counted)."""
    with SavedTensorCounter(exclude=provider.model) as counter, autocast_for(x.device, dtype):
        loss = F.cross_entropy(provider.model(x).float(), y)
    loss.backward()
    provider.model.zero_grad(set_to_none=True)
    return counter.bytes


def cuda_step_peak_bytes(provider: Provider, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """GPU memory one training step of ``provider`` adds at its peak: ``max_memory_allocated`` after
    ``reset_peak_memory_stats``, minus what was allocated before the step (every provider's model and
    optimiser state, the inputs). One unmeasured step first, so the optimiser state already exists. CUDA only."""
    device = x.device
    provider.step(x, y, dtype)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    provider.step(x, y, dtype)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def agreement(provider: Provider, exact: dict, baseline: dict, x: torch.Tensor, y: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> dict:
    """Max relative error (each tensor at its own scale) of the provider's logits and of its GIFT and head
    gradients against the float64 reference; ``ok``: no `gift.testing.model_disagreements` with the
    reference in ``dtype`` as baseline."""
    got = {k.replace("_orig_mod.", ""): v for k, v in outputs_and_grads(provider.model, x, y, dtype).items()}
    zero = [n for n in zero_gradient_names(provider.gift_model) if n in exact]
    errs = relative_errors(got, exact, zero)
    bad = model_disagreements(got, exact, baseline, provider.gift_model, dtype)
    return {"out_rel": errs["output"][1], "grad_rel": max(rel for k, (_, rel) in errs.items() if k != "output"),
            "ok": not bad, "why": "\n".join(bad)}


def reference_own_error(exact: dict, baseline: dict, model: nn.Module) -> dict:
    """The reference's own error: its result in the bench dtype against its float64 copy."""
    errs = relative_errors(baseline, exact, [n for n in zero_gradient_names(model) if n in exact])
    return {"out_rel": errs["output"][1], "grad_rel": max(rel for k, (_, rel) in errs.items() if k != "output")}
