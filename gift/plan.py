"""What `gift finetune` trains, built for a `TrainingSetup`, and its memory plan: the timm model with
random weights (`random_backbone`), made trainable as the method says (`wrap_for_training`: FastGIFT,
NF4, PEFT LoRA, a linear probe or everything), and one training step of it predicted per memory mode
on fake tensors (`plan_training`, with `gift.predict`), or measured on a real CPU step beside the
prediction (`compare_with_real_step`).

Library code: bad input raises `PlanError` (a ``ValueError``); nothing is printed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .backbones import check_model_name, data_config
from .dtypes import backbone_cast_dtype
from .fast import FastGIFT
from .lora import lora_model
from .memory import StepBytes
from .nf4 import quantize_frozen_linears
from .predict import (
    FIT_FRACTION,
    DoesNotFit,
    FakeTrainingModel,
    Plan,
    PlanError,
    TrainingSetup,
    choose_memory_mode,
    default_memory_budget,
    fit_accumulation,
    format_bytes,
    parse_bytes,
    plan_model,
    recommend,
    step_bytes,
)
from .targets import freeze_all_but_classifier

__all__ = [
    "FIT_FRACTION",
    "DoesNotFit",
    "FakeTrainingModel",
    "Plan",
    "PlanError",
    "TrainingSetup",
    "build_training_model",
    "choose_memory_mode",
    "compare_with_real_step",
    "default_memory_budget",
    "fake_training_model",
    "fit_accumulation",
    "format_bytes",
    "image_shape",
    "parse_bytes",
    "plan_model",
    "plan_fitting",
    "plan_training",
    "random_backbone",
    "step_bytes",
    "wrap_for_training",
]


def random_backbone(setup: TrainingSetup) -> nn.Module:
    """The timm model of ``setup`` with random weights (on the current default device)."""
    import timm

    try:
        check_model_name(setup.model)
    except ValueError as e:
        raise PlanError(str(e)) from None
    kwargs = {"drop_path_rate": setup.drop_path}
    if setup.num_classes is not None:
        kwargs["num_classes"] = setup.num_classes
    if setup.img_size is not None:
        kwargs["img_size"] = setup.img_size
    try:
        return timm.create_model(setup.model, pretrained=False, **kwargs)
    except TypeError as e:
        raise PlanError(f"timm cannot build {setup.model!r} with {kwargs}: {e}") from None


def wrap_for_training(
    setup: TrainingSetup, backbone: nn.Module, memory: str = "none", quantize: bool = True
) -> nn.Module:
    """``backbone`` made trainable as ``setup.method`` says (what `gift finetune` trains). With
    ``backbone_dtype="nf4"`` the frozen weights are bf16, then (``quantize``) the frozen linear
    layers but GIFT's targets NF4 (`gift.nf4.quantize_frozen_linears`)."""
    if setup.method == "gift":
        model = FastGIFT(backbone, setup.gift, memory=memory, backbone_dtype=backbone_cast_dtype(setup.backbone_dtype))
        if quantize and setup.backbone_dtype == "nf4":
            quantize_frozen_linears(model)
        return model
    if setup.backbone_dtype != "float32":
        raise PlanError(
            f"backbone dtype {setup.backbone_dtype!r} is for --method gift; use float32 with {setup.method}"
        )
    if setup.method == "lora":
        return lora_model(backbone, setup.lora_rank, setup.gift.target_modules)
    if setup.method == "linear":
        return freeze_all_but_classifier(backbone)
    return backbone.requires_grad_(True)


def build_training_model(setup: TrainingSetup, memory: str = "none") -> nn.Module:
    """The model `gift finetune` would train for ``setup`` (real tensors, random weights)."""
    return wrap_for_training(setup, random_backbone(setup), memory)


def image_shape(setup: TrainingSetup, backbone: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the model's input: ``setup.img_size`` or the model's default input size."""
    c, h, w = data_config(backbone).input_size
    return (c, setup.img_size, setup.img_size) if setup.img_size else (c, h, w)


def fake_training_model(setup: TrainingSetup) -> FakeTrainingModel:
    """The model `gift finetune` would train for ``setup``, on fake CPU tensors (built on the meta device)."""
    with torch.device("meta"):
        backbone = random_backbone(setup)
        model = wrap_for_training(setup, backbone, quantize=False)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        model.to_empty(device="cpu")
        if setup.backbone_dtype == "nf4":  # quantized on fake tensors: to_nf4 reads values
            quantize_frozen_linears(model)
    return FakeTrainingModel(model, fake_mode, image_shape(setup, backbone), setup.amp_dtype, model_ema=setup.model_ema)


def plan_training(setup: TrainingSetup, device_memory: int | str | None = None,
                  modes: tuple[str, ...] | None = None) -> Plan:
    """Predict one training step of ``setup`` in each memory mode (default: all the method offers)."""
    budget = None if device_memory is None else parse_bytes(device_memory)
    modes = modes or setup.memory_modes
    unknown = [m for m in modes if m not in setup.memory_modes]
    if unknown:
        raise PlanError(f"memory mode(s) {unknown} are not available with method {setup.method!r}; "
                        f"choose from {setup.memory_modes}")
    fake = fake_training_model(setup)
    steps = {m: fake.predict(setup.batch_size, m, setup.grad_accum_steps) for m in modes}
    return recommend(Plan(setup, budget, steps, fake=fake))


def plan_fitting(setup: TrainingSetup, device_memory: int | str, accumulations: tuple[int, ...] | None = None) -> Plan:
    """The plan of ``setup`` at the fewest accumulation steps (of ``accumulations``, default every divisor of
    the batch) at which a memory mode fits ``device_memory``, the fastest such mode recommended
    (`gift.predict.fit_accumulation`: what ``--memory auto`` runs)."""
    return fit_accumulation(fake_training_model(setup), setup, device_memory, accumulations)


def compare_with_real_step(setup: TrainingSetup, seed: int = 0) -> list[tuple[str, StepBytes, StepBytes]]:
    """For each memory mode of ``setup``: (mode, predicted on fake tensors, measured on a real CPU step
    with the same counters). Costs one real training step per mode."""
    fake = fake_training_model(setup)
    torch.manual_seed(seed)
    model = build_training_model(setup)
    rows = []
    for mode in setup.memory_modes:
        predicted = fake.predict(setup.batch_size, mode, setup.grad_accum_steps)
        measured = step_bytes(model, setup.batch_size, fake.shape, setup.amp_dtype, mode,
                              accumulation=setup.grad_accum_steps)
        rows.append((mode, predicted, measured))
    return rows
