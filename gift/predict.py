"""Will one training step fit in the device's memory, and in which memory mode? Predictions on fake tensors.

The numbers come from the model itself, never from formulas: the model is turned into fake CPU tensors
(``FakeTensorMode``: shapes and dtypes, no storage, no compute), and one training step (forward,
backward, AdamW step) runs on it under the counters of `gift.memory`, the same ones that measure real
steps. This module predicts for a given model (duck-typed: a model with ``set_memory`` is switched
between memory modes); `gift.plan` builds the model of a `TrainingSetup` for it.

Library code: bad input raises `PlanError` (a ``ValueError``); nothing is printed.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .config import MEMORY_MODES, METHODS, GIFTConfig
from .dtypes import ALIASES, AUTOCAST_DTYPES, BACKBONE_DTYPES, dtype_name, torch_dtype
from .memory import StepBytes, measure_training_step, module_tensors, storage_bytes

MAX_BATCH_SIZE = 1 << 16
#: A predicted peak must fit this fraction of the memory budget: the rest is kept for what the model's tensors do
#: not show (the CUDA caching allocator's rounding and fragmentation, cuBLAS/cuDNN workspaces).
FIT_FRACTION = 0.9
#: Micro-batches a prediction of an accumulated step runs: the first (the generator's forward, no gradients yet)
#: and the last (the gradients and the bank of micro-batches 1..k-1 alive, then the generator's backward). Any
#: micro-batch in between starts from the same tensors as the last and does a part of what the last does (the
#: same forward and backward, no generator backward), so a step of k > 2 micro-batches has the peak of these
#: two (tests/model/test_plan.py compares with a real step of all k).
SIMULATED_MICRO_BATCHES = 2


def default_memory_budget(device: torch.device | str, model: nn.Module | None = None) -> int | None:
    """The memory budget of every plan that is given none (`gift plan`, ``gift finetune --memory auto``,
    ``FastGIFT(memory="auto")``): on a CUDA device, what a training step could have there now: the driver's
    free memory, what torch's caching allocator holds unused, and the tensors of ``model`` already on the
    device (a plan counts them itself). On any other device: None (no limit)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    held = 0 if model is None else storage_bytes(t for t in module_tensors(model) if t.device == device)
    return free + cached + held


class PlanError(ValueError):
    """Bad input to the planner (unknown model, method, size): one line naming the fix."""


class DoesNotFit(PlanError):
    """No memory mode fits the budget. ``largest_batch_size``: the largest batch that fits in the most
    frugal mode (0 when even one image does not), ``mode``: that mode."""

    def __init__(self, message: str, largest_batch_size: int, mode: str):
        super().__init__(message)
        self.largest_batch_size, self.mode = largest_batch_size, mode


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"24GiB"``, ``"80GB"``, ``"512MiB"`` or a plain number of bytes, as an int."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise PlanError(f"cannot read the memory size {text!r}; write e.g. 24GiB, 80GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class TrainingSetup:
    """One fine-tuning job as `gift finetune` would run it (the fields of its command line that shape memory).

    ``backbone_dtype``: how the frozen backbone is stored (`gift.dtypes.BACKBONE_DTYPES`: a dtype, or "nf4"
    for 4-bit NF4 linear weights); ``amp``: the autocast dtype ("bfloat16"/"float16"; "bf16"/"fp16" are
    read as those) or None; ``lora_rank``: LoRA's rank for ``method="lora"`` (GIFT's is ``gift.rank``);
    ``model_ema``: a ``ModelEmaV3`` copy of the whole model (frozen backbone included) is kept alongside,
    as ``gift finetune --model-ema`` does; ``grad_accum_steps``: each optimizer step accumulates that many
    micro-batches of ``batch_size / grad_accum_steps`` (``batch_size`` is the batch of one optimizer step).
    """

    model: str
    batch_size: int
    img_size: int | None = None
    num_classes: int | None = None
    method: str = "gift"
    backbone_dtype: str = "float32"
    amp: str | None = None
    gift: GIFTConfig = field(default_factory=GIFTConfig)
    lora_rank: int = 16
    drop_path: float = 0.1
    model_ema: bool = False
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PlanError(f"method {self.method!r} is unknown; choose one of {METHODS}")
        self.backbone_dtype = ALIASES.get(self.backbone_dtype, self.backbone_dtype)  # "bf16" read as "bfloat16"
        if self.backbone_dtype not in BACKBONE_DTYPES:
            raise PlanError(f"backbone dtype {self.backbone_dtype!r} is unknown; choose one of {BACKBONE_DTYPES}")
        if self.amp is not None:
            if ALIASES.get(self.amp, self.amp) not in AUTOCAST_DTYPES:
                raise PlanError(f"amp {self.amp!r} is unknown; choose one of {AUTOCAST_DTYPES}")
            self.amp = dtype_name(self.amp)
        if self.batch_size <= 0:
            raise PlanError(f"batch size must be a positive integer, got {self.batch_size}")
        if self.img_size is not None and self.img_size <= 0:
            raise PlanError(f"image size must be a positive integer, got {self.img_size}")
        if self.grad_accum_steps <= 0 or self.batch_size % self.grad_accum_steps:
            raise PlanError(f"batch size {self.batch_size} does not split into {self.grad_accum_steps} equal "
                            f"micro-batches; give a number of accumulation steps that divides it")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps

    def batch_text(self, prefix: str = "batch size") -> str:
        """``batch size 64`` or ``batch size 64 as 16 micro-batches of 4`` (``prefix`` first)."""
        if self.grad_accum_steps == 1:
            return f"{prefix} {self.batch_size}"
        return f"{prefix} {self.batch_size} as {self.grad_accum_steps} micro-batches of {self.micro_batch_size}"

    @property
    def memory_modes(self) -> tuple[str, ...]:
        """The modes this method offers, fastest first (recomputation is FastGIFT's)."""
        return MEMORY_MODES if self.method == "gift" else ("none",)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch_dtype(self.amp) if self.amp else None


def step_bytes(model: nn.Module, batch_size: int, shape: tuple[int, ...], amp: torch.dtype | None,
               memory: str | None = None, device: torch.device | str = "cpu", accumulation: int = 1) -> StepBytes:
    """`measure_training_step` of ``model`` on a batch of ``batch_size`` inputs of ``shape`` (random images,
    class 0), as ``accumulation`` micro-batches of ``batch_size / accumulation`` (at most
    `SIMULATED_MICRO_BATCHES` of them run, which have the peak of all); ``memory`` switches a
    `FastGIFT`'s mode first. Under a ``FakeTensorMode`` nothing is computed."""
    if memory is not None and callable(getattr(model, "set_memory", None)):
        model.set_memory(memory)
    if batch_size % accumulation:
        raise PlanError(f"batch size {batch_size} does not split into {accumulation} equal micro-batches")
    micro = batch_size // accumulation
    x = torch.randn(micro, *shape, device=device)
    y = torch.zeros(micro, dtype=torch.long, device=device)
    return measure_training_step(model, x, y, amp, generator_forward=getattr(model, "generator_residuals", None),
                                 micro_batches=min(accumulation, SIMULATED_MICRO_BATCHES))


class FakeTrainingModel:
    """A training model on fake tensors (the model of a setup, `gift.plan.fake_training_model`, or a copy
    of an existing model, `copy_of`), with the ``FakeTensorMode`` it lives in: `predict` runs steps on
    it without memory or compute."""

    def __init__(self, model: nn.Module, fake_mode: FakeTensorMode, shape: tuple[int, ...], amp: torch.dtype | None,
                 device: torch.device | str = "cpu", model_ema: bool = False):
        self.model, self.fake_mode, self.shape, self.amp, self.device = model, fake_mode, shape, amp, device
        self.model_ema = model_ema

    @classmethod
    def copy_of(cls, model: nn.Module, shape: tuple[int, ...], amp: torch.dtype | None) -> "FakeTrainingModel":
        """A fake copy of a real model on its device (its weights are never copied)."""
        device = next(model.parameters()).device
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        with fake_mode:
            replica = copy.deepcopy(model)
        return cls(replica, fake_mode, shape, amp, device)

    def predict(self, batch_size: int, memory: str | None = None, accumulation: int = 1) -> StepBytes:
        """One optimizer step's bytes (of ``accumulation`` micro-batches of ``batch_size / accumulation``); with
        ``model_ema`` the EMA copy (every parameter and buffer again) is in the peak."""
        with self.fake_mode:
            step = step_bytes(self.model, batch_size, self.shape, self.amp, memory, self.device, accumulation)
        if not self.model_ema:
            return step
        return dataclasses.replace(step, ema=step.parameter, peak=step.peak + step.parameter)

    def largest_batch_size(self, budget: int, memory: str | None = None, at: StepBytes | None = None,
                           at_batch: int | None = None, accumulation: int = 1) -> int:
        """The largest batch (``accumulation`` micro-batches of a size that fits) whose predicted peak fits
        ``budget`` (0 if micro-batches of one image do not): a line through the peaks at micro-batches of 1 and
        of ``at_batch / accumulation`` (activations grow linearly), checked by a prediction there."""
        k = accumulation
        one = self.predict(k, memory, k)
        if one.peak > budget:
            return 0
        if at is None or at_batch is None or at_batch < 2 * k:
            at_batch = 8 * k
            at = self.predict(at_batch, memory, k)
        slope = max((at.peak - one.peak) / (at_batch // k - 1), 1.0)
        guess = min(MAX_BATCH_SIZE // k, 1 + int((budget - one.peak) // slope))
        while guess > 1 and self.predict(guess * k, memory, k).peak > budget:
            guess = max(1, int(guess * 0.97))
        return guess * k


@dataclass
class Plan:
    """Per memory mode, the bytes of one training step of ``setup`` (at its ``grad_accum_steps``); which modes
    fit ``device_memory`` (their peak within `FIT_FRACTION` of it, ``usable_memory``); the fastest that fits
    (``recommended``) and the largest batch size for it (for the most frugal mode when none fits). ``fewer``:
    for a plan whose accumulation was chosen (`fit_accumulation`), (the next fewer accumulation steps tried,
    the predicted peak there, its mode), else None. ``faster_mode_later``: for such a plan whose recommended mode
    recomputes, (the fewest more accumulation steps at which the fastest mode fits, its predicted peak, that mode),
    else None: the rule prefers fewer micro-batches, and no prediction says which of the two steps is faster."""

    setup: TrainingSetup
    device_memory: int | None
    modes: dict[str, StepBytes]
    recommended: str | None = None
    largest_batch_size: int | None = None
    largest_batch_mode: str | None = None
    fake: FakeTrainingModel | None = field(default=None, repr=False, compare=False)
    fewer: tuple[int, int, str] | None = None
    faster_mode_later: tuple[int, int, str] | None = None

    def with_device_memory(self, device_memory: int | str) -> "Plan":
        """The same predictions against another budget (no step is predicted again but for the largest batch)."""
        return recommend(Plan(self.setup, parse_bytes(device_memory), self.modes, fake=self.fake))

    @property
    def accumulation(self) -> int:
        return self.setup.grad_accum_steps

    @property
    def usable_memory(self) -> int | None:
        """What a predicted peak may use: `FIT_FRACTION` of ``device_memory``."""
        return None if self.device_memory is None else int(self.device_memory * FIT_FRACTION)

    @property
    def budget_text(self) -> str:
        """The budget in words, with the margin: "90% of 24.00 GiB"."""
        return f"{FIT_FRACTION:.0%} of {format_bytes(self.device_memory)}"

    def fits(self, mode: str) -> bool | None:
        return None if self.device_memory is None else self.modes[mode].peak <= self.usable_memory

    def to_json(self) -> dict:
        """One object for scripts; bytes as integers."""
        modes = {}
        for name, b in self.modes.items():
            modes[name] = {"saved_activation_bytes": b.saved_activation, "parameter_bytes": b.parameter,
                           "optimizer_bytes": b.optimizer, "peak_bytes": b.peak, "fits": self.fits(name),
                           "frozen_bytes": b.frozen, "trainable_bytes": b.trainable, "gradient_bytes": b.gradient,
                           "generator_saved_bytes": b.generator_saved, "backward_transient_bytes": b.backward_transient,
                           "generator_kept_bytes": b.generator_kept, "ema_bytes": b.ema}
        s = self.setup
        return {
            "model": s.model,
            "batch_size": s.batch_size,
            "grad_accum_steps": s.grad_accum_steps,
            "micro_batch_size": s.micro_batch_size,
            "img_size": s.img_size,
            "method": s.method,
            "backbone_dtype": s.backbone_dtype,
            "amp": s.amp,
            "model_ema": s.model_ema,
            "device_memory": self.device_memory,
            "usable_memory": self.usable_memory,
            "modes": modes,
            "recommended": self.recommended,
            "largest_batch_size": self.largest_batch_size,
            "largest_batch_mode": self.largest_batch_mode,
        }

    def table(self) -> str:
        """The plan as a text table (GiB), one column per memory mode."""
        rows = [("frozen weights", lambda b: b.frozen), ("trainable parameters", lambda b: b.trainable),
                ("their gradients", lambda b: b.gradient), ("AdamW state", lambda b: b.optimizer),
                ("saved for backward", lambda b: b.saved_activation),
                ("  of which the generator", lambda b: b.generator_saved)]
        rows += [("generator kept meanwhile", lambda b: b.generator_kept)] if self.accumulation > 1 else []
        rows += [("backward transient", lambda b: b.backward_transient)]
        rows += [("model EMA copy", lambda b: b.ema)] if self.setup.model_ema else []
        rows += [("predicted peak", lambda b: b.peak)]
        names = list(self.modes)

        def gib(n: int) -> str:
            return f"{n / 2**30:.3f}"

        lines = [f"{'GiB':<26}" + "".join(f"{'memory=' + n:>14}" for n in names)]
        lines += [f"{label:<26}" + "".join(f"{gib(get(self.modes[n])):>14}" for n in names) for label, get in rows]
        if self.device_memory is not None:
            lines.append(f"{'fits ' + self.budget_text:<26}"
                         + "".join(f"{('yes' if self.fits(n) else 'no'):>14}" for n in names))
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: what to switch on."""
        s = self.setup
        if self.device_memory is None:
            return "no device memory given (--device-memory): nothing to compare the peaks with"
        margin = f"; {1 - FIT_FRACTION:.0%} is kept for the CUDA allocator and workspaces"
        largest = (f"largest batch size that fits with it: {self.largest_batch_size}"
                   + (f" ({self.accumulation} micro-batches of {self.largest_batch_size // self.accumulation})"
                      if self.accumulation > 1 and self.largest_batch_size else ""))
        if self.recommended is not None:
            return (f"recommended: memory={self.recommended} (the fastest mode that fits {self.budget_text} at "
                    f"{s.batch_text('batch')}{margin}); {largest}")
        if self.largest_batch_size:
            return (f"nothing fits {self.budget_text} at {s.batch_text('batch')}{margin}; batch size "
                    f"{self.largest_batch_size} fits with memory={self.largest_batch_mode}")
        one = "batch 1" if self.accumulation == 1 else "micro-batches of 1"
        return f"nothing fits {self.budget_text}{margin}, not even {one} with memory={self.largest_batch_mode}"


def recommend(plan: Plan, largest: bool = True) -> Plan:
    """``plan`` with ``recommended`` (the fastest mode that fits), ``largest_batch_size`` (unless not ``largest``)
    and ``largest_batch_mode`` filled in from its predictions (nothing without ``device_memory``)."""
    if plan.device_memory is None:
        return plan
    fitting = [m for m in plan.modes if plan.fits(m)]
    plan.recommended = fitting[0] if fitting else None
    mode = plan.recommended or min(plan.modes, key=lambda m: plan.modes[m].peak)
    plan.largest_batch_mode = mode
    if largest:
        plan.largest_batch_size = plan.fake.largest_batch_size(
            plan.usable_memory, mode, plan.modes[mode], plan.setup.batch_size, plan.accumulation
        )
    return plan


def _accumulation_text(setup: TrainingSetup) -> str:
    k = setup.grad_accum_steps
    return "" if k == 1 else f" with {k} micro-batches of {setup.micro_batch_size} (--grad-accum-steps {k})"


def choose_memory_mode(plan: Plan) -> tuple[str, str]:
    """The fastest mode of ``plan`` that fits its device memory, and one line saying why (with the plan's
    accumulation steps when there are several).

    Raises `DoesNotFit` naming the batch size that would fit when no mode fits."""
    if plan.device_memory is None:
        fastest = next(iter(plan.modes))
        return fastest, f"memory={fastest}{_accumulation_text(plan.setup)}: no memory budget given, so the fastest mode"
    if plan.recommended is None:
        raise DoesNotFit(
            f"{plan.setup.batch_text()} does not fit {plan.budget_text} in any "
            f"memory mode (smallest predicted peak: {format_bytes(plan.modes[plan.largest_batch_mode].peak)} "
            f"with memory={plan.largest_batch_mode}); "
            + (
                f"batch size {plan.largest_batch_size} would fit with memory={plan.largest_batch_mode}"
                if plan.largest_batch_size
                else f"not even {'batch size 1' if plan.accumulation == 1 else 'micro-batches of 1'} fits: use a "
                "smaller model or --backbone-dtype bfloat16/nf4"
            ),
            plan.largest_batch_size or 0,
            plan.largest_batch_mode,
        )
    mode = plan.recommended
    faster = [m for m in plan.modes if m != mode and list(plan.modes).index(m) < list(plan.modes).index(mode)]
    why = [f"memory={m} needs {format_bytes(plan.modes[m].peak)}" for m in faster]
    if plan.fewer is not None:
        k, peak, frugal = plan.fewer
        why.append(f"{k} micro-batch{'es' if k > 1 else ''} per step need{'s' if k == 1 else ''} "
                   f"{format_bytes(peak)} with memory={frugal}")
    later = ""
    if plan.faster_mode_later is not None:
        k, peak, fastest = plan.faster_mode_later
        later = (f"; memory={fastest} fits with {k} micro-batches (predicted peak {format_bytes(peak)}), and may be "
                 f"faster: the rule takes the fewest micro-batches first, it predicts no time")
    return mode, (
        f"memory={mode}{_accumulation_text(plan.setup)}: predicted peak {format_bytes(plan.modes[mode].peak)} "
        f"within {plan.budget_text} ({1 - FIT_FRACTION:.0%} kept for the CUDA allocator and workspaces), the fastest "
        f"mode that fits{' at the fewest micro-batches that do' if plan.fewer is not None else ''}"
        + (f" ({', '.join(why)})" if why else "") + later
    )


def fit_accumulation(fake: FakeTrainingModel, setup: TrainingSetup, device_memory: int | str,
                     accumulations: tuple[int, ...] | None = None) -> Plan:
    """The plan of ``setup`` at the fewest accumulation steps at which a memory mode fits ``device_memory``
    (its peak within `FIT_FRACTION`), every mode predicted there and the fastest that fits recommended; when
    the batch fits in one micro-batch that is `recommend` on the plain plan. Candidates: ``accumulations``
    (default: every divisor of ``setup.batch_size``), those that divide it, fewest first.

    The most frugal mode decides the accumulation, by bisection over the candidates: its peak falls as the
    micro-batches shrink (fewer activations), so the first candidate where it fits is the fewest. The order is a
    rule, not a cost model: fewer steps first, then at that number of steps the modes fastest first, as in
    `recommend` (``none`` recomputes nothing, ``mlp`` each MLP, ``block`` every block and the generator). The plan
    predicts bytes, not time, so it cannot tell whether recomputing at fewer micro-batches beats less recomputation
    at more (their fixed per-micro-batch cost); when the recommended mode recomputes, ``faster_mode_later`` names the
    fewest steps at which the fastest mode fits, for the one line to say. Raises `DoesNotFit` when not even the
    largest candidate fits."""
    budget = parse_bytes(device_memory)
    usable = int(budget * FIT_FRACTION)
    candidates = sorted(k for k in set(accumulations or range(1, setup.batch_size + 1)) if setup.batch_size % k == 0)
    if not candidates:
        raise PlanError(f"none of the accumulation steps {accumulations} divides batch size {setup.batch_size}")
    modes, frugal = setup.memory_modes, setup.memory_modes[-1]
    predicted: dict[tuple[int, str], StepBytes] = {}

    def predict(k: int, mode: str) -> StepBytes:
        if (k, mode) not in predicted:
            predicted[k, mode] = fake.predict(setup.batch_size, mode, k)
        return predicted[k, mode]

    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if predict(candidates[mid], frugal).peak <= usable else (mid + 1, hi)
    k = candidates[lo]
    if predict(k, frugal).peak > usable:
        plan = Plan(dataclasses.replace(setup, grad_accum_steps=k), budget, {frugal: predict(k, frugal)}, fake=fake)
        choose_memory_mode(recommend(plan))  # raises DoesNotFit, naming what would fit
    steps = {m: predict(k, m) for m in modes}
    fewer = None
    if lo > 0:
        previous = candidates[lo - 1]
        fewer = (previous, predict(previous, frugal).peak, frugal)
    plan = recommend(Plan(dataclasses.replace(setup, grad_accum_steps=k), budget, steps, fake=fake, fewer=fewer),
                     largest=False)
    fastest, later = modes[0], candidates[lo + 1:]
    if plan.recommended != fastest and later and predict(later[-1], fastest).peak <= usable:
        lo, hi = 0, len(later) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if predict(later[mid], fastest).peak <= usable else (mid + 1, hi)
        plan.faster_mode_later = (later[lo], predict(later[lo], fastest).peak, fastest)
    return plan


def plan_model(model: nn.Module, input_shape: tuple[int, ...], budget: int | str | None,
               amp: torch.dtype | None = None, accumulation: int = 1) -> Plan:
    """`gift.plan.plan_training` for an existing `FastGIFT` (a fake copy; its weights are not copied) and
    inputs of ``input_shape`` = (B, C, H, W) per micro-batch, ``accumulation`` micro-batches per step: every
    memory mode its backbone can take (its ``supported_memory_modes``), switched with its ``set_memory``."""
    fake = FakeTrainingModel.copy_of(model, tuple(input_shape[1:]), amp)
    setup = TrainingSetup(model=type(model.backbone).__name__, batch_size=int(input_shape[0]) * accumulation,
                          gift=model.config, grad_accum_steps=accumulation)
    steps = {m: fake.predict(setup.batch_size, m, accumulation) for m in model.supported_memory_modes}
    return recommend(Plan(setup, None if budget is None else parse_bytes(budget), steps, fake=fake))
