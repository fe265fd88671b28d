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
from .memory import StepBytes, measure_training_step

MAX_BATCH_SIZE = 1 << 16
#: A predicted peak must fit this fraction of the memory budget: the rest is kept for what the model's tensors do
#: not show (the CUDA caching allocator's rounding and fragmentation, cuBLAS/cuDNN workspaces).
FIT_FRACTION = 0.9


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
    as ``gift finetune --model-ema`` does.
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

    @property
    def memory_modes(self) -> tuple[str, ...]:
        """The modes this method offers, fastest first (recomputation is FastGIFT's)."""
        return MEMORY_MODES if self.method == "gift" else ("none",)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch_dtype(self.amp) if self.amp else None


def step_bytes(model: nn.Module, batch_size: int, shape: tuple[int, ...], amp: torch.dtype | None,
               memory: str | None = None, device: torch.device | str = "cpu") -> StepBytes:
    """`measure_training_step` of ``model`` on a batch of ``batch_size`` inputs of ``shape`` (random images,
    class 0); ``memory`` switches a `FastGIFT`'s mode first. Under a ``FakeTensorMode`` nothing is computed."""
    if memory is not None and callable(getattr(model, "set_memory", None)):
        model.set_memory(memory)
    x = torch.randn(batch_size, *shape, device=device)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    return measure_training_step(model, x, y, amp, generator_forward=getattr(model, "generator_residuals", None))


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

    def predict(self, batch_size: int, memory: str | None = None) -> StepBytes:
        """One step's bytes; with ``model_ema`` the EMA copy (every parameter and buffer again) is in the peak."""
        with self.fake_mode:
            step = step_bytes(self.model, batch_size, self.shape, self.amp, memory, self.device)
        if not self.model_ema:
            return step
        return dataclasses.replace(step, ema=step.parameter, peak=step.peak + step.parameter)

    def largest_batch_size(self, budget: int, memory: str | None = None, at: StepBytes | None = None,
                           at_batch: int | None = None) -> int:
        """The largest batch whose predicted peak fits ``budget`` (0 if one image does not): a line through
        the peaks at batch 1 and ``at_batch`` (activations grow linearly), checked by a prediction there."""
        one = self.predict(1, memory)
        if one.peak > budget:
            return 0
        if at is None or at_batch is None or at_batch < 2:
            at_batch = 8
            at = self.predict(at_batch, memory)
        slope = max((at.peak - one.peak) / (at_batch - 1), 1.0)
        guess = min(MAX_BATCH_SIZE, 1 + int((budget - one.peak) // slope))
        while guess > 1 and self.predict(guess, memory).peak > budget:
            guess = max(1, int(guess * 0.97))
        return guess


@dataclass
class Plan:
    """Per memory mode, the bytes of one training step of ``setup``; which modes fit ``device_memory``
    (their peak within `FIT_FRACTION` of it, ``usable_memory``);
    the fastest that fits (``recommended``) and the largest batch size for it (for the most frugal
    mode when none fits)."""

    setup: TrainingSetup
    device_memory: int | None
    modes: dict[str, StepBytes]
    recommended: str | None = None
    largest_batch_size: int | None = None
    largest_batch_mode: str | None = None
    fake: FakeTrainingModel | None = field(default=None, repr=False, compare=False)

    def with_device_memory(self, device_memory: int | str) -> "Plan":
        """The same predictions against another budget (no step is predicted again but for the largest batch)."""
        return recommend(Plan(self.setup, parse_bytes(device_memory), self.modes, fake=self.fake))

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
                           "ema_bytes": b.ema}
        s = self.setup
        return {
            "model": s.model,
            "batch_size": s.batch_size,
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
                ("  of which the generator", lambda b: b.generator_saved),
                ("backward transient", lambda b: b.backward_transient)]
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
        if self.recommended is not None:
            return (
                f"recommended: memory={self.recommended} (the fastest mode that fits {self.budget_text} "
                f"at batch {s.batch_size}{margin}); largest batch size that fits with it: {self.largest_batch_size}"
            )
        if self.largest_batch_size:
            return (f"nothing fits {self.budget_text} at batch {s.batch_size}{margin}; batch size "
                    f"{self.largest_batch_size} fits with memory={self.largest_batch_mode}")
        return f"nothing fits {self.budget_text}{margin}, not even batch 1 with memory={self.largest_batch_mode}"


def recommend(plan: Plan) -> Plan:
    """``plan`` with ``recommended`` (the fastest mode that fits), ``largest_batch_size`` and
    ``largest_batch_mode`` filled in from its predictions (nothing without ``device_memory``)."""
    if plan.device_memory is None:
        return plan
    fitting = [m for m in plan.modes if plan.fits(m)]
    plan.recommended = fitting[0] if fitting else None
    mode = plan.recommended or min(plan.modes, key=lambda m: plan.modes[m].peak)
    plan.largest_batch_mode = mode
    plan.largest_batch_size = plan.fake.largest_batch_size(
        plan.usable_memory, mode, plan.modes[mode], plan.setup.batch_size
    )
    return plan


def choose_memory_mode(plan: Plan) -> tuple[str, str]:
    """The fastest mode of ``plan`` that fits its device memory, and one line saying why.

    Raises `DoesNotFit` naming the batch size that would fit when no mode fits."""
    if plan.device_memory is None:
        fastest = next(iter(plan.modes))
        return fastest, f"memory={fastest}: no memory budget given, so the fastest mode"
    if plan.recommended is None:
        raise DoesNotFit(
            f"batch size {plan.setup.batch_size} does not fit {plan.budget_text} in any "
            f"memory mode (smallest predicted peak: {format_bytes(plan.modes[plan.largest_batch_mode].peak)} "
            f"with memory={plan.largest_batch_mode}); "
            + (
                f"batch size {plan.largest_batch_size} would fit with memory={plan.largest_batch_mode}"
                if plan.largest_batch_size
                else "not even batch size 1 fits: use a smaller model or --backbone-dtype bfloat16/nf4"
            ),
            plan.largest_batch_size or 0,
            plan.largest_batch_mode,
        )
    mode = plan.recommended
    faster = [m for m in plan.modes if m != mode and list(plan.modes).index(m) < list(plan.modes).index(mode)]
    why = (f" ({', '.join(f'memory={m} needs {format_bytes(plan.modes[m].peak)}' for m in faster)})" if faster else "")
    return mode, (
        f"memory={mode}: predicted peak {format_bytes(plan.modes[mode].peak)} within {plan.budget_text} "
        f"({1 - FIT_FRACTION:.0%} kept for the CUDA allocator and workspaces), the fastest mode that fits{why}"
    )


def plan_model(model: nn.Module, input_shape: tuple[int, ...], budget: int | str | None,
               amp: torch.dtype | None = None) -> Plan:
    """`gift.plan.plan_training` for an existing `FastGIFT` (a fake copy; its weights are not copied) and
    inputs of ``input_shape`` = (B, C, H, W): every memory mode, switched with its ``set_memory``."""
    fake = FakeTrainingModel.copy_of(model, tuple(input_shape[1:]), amp)
    setup = TrainingSetup(model=type(model.backbone).__name__, batch_size=int(input_shape[0]), gift=model.config)
    steps = {m: fake.predict(setup.batch_size, m) for m in MEMORY_MODES}
    return recommend(Plan(setup, None if budget is None else parse_bytes(budget), steps, fake=fake))
