"""Memory accounting of one training step, on real tensors or on fake ones (``FakeTensorMode``: shapes,
no storage, no compute). `gift plan`, ``FastGIFT(memory="auto")`` and the bench count with these.

* `SavedTensorCounter`: bytes autograd saves for backward inside a ``with`` block.
* `LiveBytes`: bytes of the storages that ops create, alive at each moment, and their peak.
* `measure_training_step`: both, for one forward, backward and AdamW step of a model.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .dtypes import autocast_for


def storages(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """The storages holding ``t``'s data: its own, or for a wrapper subclass (e.g. torchao's NF4Tensor) those
    of its inner tensors. A storage's ``_cdata`` identifies it (views share it) for real, meta and fake tensors."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:
            yield from storages(getattr(t, name))
    else:
        yield t.untyped_storage()


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage shared by views counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        for storage in storages(t):
            seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """A module's parameters and buffers (the tensors that are not activations)."""
    return list(module.parameters()) + list(module.buffers())


def _excluded_ids(exclude: nn.Module | Iterable[torch.Tensor] | None) -> set[int]:
    if isinstance(exclude, nn.Module):
        exclude = module_tensors(exclude)
    return {storage._cdata for t in exclude or [] for storage in storages(t)}


class SavedTensorCounter:
    """Counts the bytes of tensors autograd saves for backward inside the ``with`` block, once per
    unique storage, leaving out the storages of ``exclude``: a module's parameters and buffers, or tensors.

    ``bytes`` is what a step holds between forward and backward for the graph (activations, and
    copies made in forward such as autocast's casts of frozen weights)."""

    def __init__(self, exclude: nn.Module | Iterable[torch.Tensor] | None = None):
        self._excluded = _excluded_ids(exclude)
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """Count ``t`` (the pack hook; also called for tensors saved under other hooks: `gift.residuals.generate`)."""
        for storage in storages(t):
            key = storage._cdata
            if key not in self._excluded:
                self._seen[key] = max(self._seen.get(key, 0), storage.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks.__enter__()
        _active_counters.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active_counters.remove(self)
        self._hooks.__exit__(*exc)


_active_counters: list[SavedTensorCounter] = []  # the `SavedTensorCounter` blocks now open, innermost last


def innermost_saved_tensor_counter() -> SavedTensorCounter | None:
    """The innermost open `SavedTensorCounter`, or None."""
    return _active_counters[-1] if _active_counters else None


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by ops inside the ``with`` block that are still alive (``current``),
    and the most there were at once (``peak``, reset by `reset_peak`). Storages of ``exclude`` and
    storages that existed before are not counted (in-place updates of parameters are free)."""

    def __init__(self, exclude: nn.Module | Iterable[torch.Tensor] | None = None):
        super().__init__()
        self._excluded = _excluded_ids(exclude)
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            for storage in storages(t):
                key = storage._cdata
                if key in self._live or key in self._excluded:
                    continue
                self._live[key] = storage.nbytes()
                self.current += self._live[key]
                weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


@dataclass(frozen=True)
class StepBytes:
    """What one training step (forward, backward, AdamW step) of a model holds, in bytes.

    frozen: parameters without gradient and buffers; trainable: parameters with gradient;
    gradient: their ``.grad``; optimizer: AdamW's state; saved_activation: saved for backward by the
    forward (parameters and buffers excluded); generator_saved: the part of it that GIFT's generator
    saves; backward_transient: what the backward holds at its peak beyond what the forward left
    alive (activation gradients, recomputed activations, parameter gradients); peak: the most alive
    at once (the forward's own transients too), parameters, optimizer state and the input batch included;
    ema: a model-EMA copy of every parameter and buffer (timm's ``ModelEmaV3``), 0 when there is none
    (`measure_training_step` keeps none; `gift.predict` adds it to ``peak`` for ``--model-ema``);
    generator_kept: with gradient accumulation, what stays alive from one micro-batch to the next besides
    the parameters' gradients (GIFT's generator output, its graph's saved tensors unless the generator is
    recomputed, the bank of its gradients); 0 for one micro-batch per step.

    With several micro-batches, ``saved_activation`` is the first micro-batch's (the generator's saves
    included), ``backward_transient`` the largest of any micro-batch's backward.
    """

    frozen: int
    trainable: int
    gradient: int
    optimizer: int
    saved_activation: int
    generator_saved: int
    backward_transient: int
    peak: int
    ema: int = 0
    generator_kept: int = 0

    @property
    def parameter(self) -> int:
        return self.frozen + self.trainable


def logits_of(output) -> torch.Tensor:
    """The logits of a model's output (a tensor, or an object with ``.logits`` as Hugging Face returns)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def measure_training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None = None,
                          generator_forward: Callable[[], object] | None = None,
                          optimizer: torch.optim.Optimizer | None = None, micro_batches: int = 1) -> StepBytes:
    """Run one training step of ``model`` (cross-entropy on ``(x, y)``, backward, AdamW step) and count it.

    ``x``: (B, C, H, W), ``y``: (B,) class indices. ``generator_forward``: a function that runs only the
    part of the forward whose saved bytes are reported as ``generator_saved`` (GIFT's generator).
    ``micro_batches``: the step accumulates that many forwards and backwards of ``(x, y)`` before its AdamW
    step, inside ``model.accumulate(micro_batches)`` when the model has it (`gift.fast.FastGIFT`).
    Works the same on fake tensors. The model's gradients are left set; the optimizer has stepped once.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_ids = {id(p) for p in trainable}
    frozen = [p for p in model.parameters() if id(p) not in trainable_ids] + list(model.buffers())
    optimizer = optimizer or torch.optim.AdamW(trainable, lr=1e-4)
    model.zero_grad(set_to_none=True)
    generator_saved = 0
    if generator_forward is not None:
        with SavedTensorCounter(exclude=model) as counter, autocast_for(x.device, amp):
            generator_forward()
        generator_saved = counter.bytes
    accumulate = getattr(model, "accumulate", None) if micro_batches > 1 else None
    forward_backward_peak = backward_transient = generator_kept = 0
    saved_activation = None
    with LiveBytes(exclude=model) as live:
        with accumulate(micro_batches) if accumulate is not None else contextlib.nullcontext():
            for micro_batch in range(micro_batches):
                with SavedTensorCounter(exclude=model) as saved, autocast_for(x.device, amp):
                    loss = F.cross_entropy(logits_of(model(x)).float(), y)
                saved_activation = saved.bytes if saved_activation is None else saved_activation
                forward_left, forward_peak = live.current, live.peak
                live.reset_peak()
                loss.backward()
                del loss
                forward_backward_peak = max(forward_backward_peak, forward_peak, live.peak)
                backward_transient = max(backward_transient, live.peak - forward_left)
                if micro_batch == 0 and micro_batches > 1:
                    generator_kept = live.current - storage_bytes(p.grad for p in trainable if p.grad is not None)
                live.reset_peak()
        optimizer.step()
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        optimizer_bytes = storage_bytes(state)
        step_peak = live.peak - optimizer_bytes
        gradient = storage_bytes(p.grad for p in trainable if p.grad is not None)
    batch = storage_bytes([x, y])
    peak = storage_bytes(frozen + trainable) + optimizer_bytes + batch + max(forward_backward_peak, step_peak)
    return StepBytes(frozen=storage_bytes(frozen), trainable=storage_bytes(trainable), gradient=gradient,
                     optimizer=optimizer_bytes, saved_activation=saved_activation, generator_saved=generator_saved,
                     backward_transient=backward_transient, peak=peak, generator_kept=generator_kept)
