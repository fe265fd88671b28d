"""The bench's instruments: saved-for-backward bytes, interleaved timing and ratios, agreement,
and the providers (each one way to fine-tune the same timm model). Baselines come from packages:
`gift.GIFTReference`, `gift.FastGIFT`, `peft` LoRA; nothing is re-typed here."""
from __future__ import annotations

import copy
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import gift
from gift_kernels.testing import relative_errors

PROVIDERS = ("no_adapter", "reference", "fast_torch", "fast_torch+mlp", "fast_torch+block", "fast_triton", "lora")


class SavedTensorCounter:
    """Counts the bytes of tensors autograd saves for backward inside the ``with`` block, once per
    unique storage, leaving out the storages of ``exclude``: a module's parameters and buffers, or tensors."""

    def __init__(self, exclude: nn.Module | list[torch.Tensor] | None = None):
        self._excluded = set()
        if isinstance(exclude, nn.Module):
            exclude = list(exclude.parameters()) + list(exclude.buffers())
        for t in exclude or []:
            self._excluded.add(t.untyped_storage().data_ptr())
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._excluded and ptr != 0:
            self._seen[ptr] = max(self._seen.get(ptr, 0), storage.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                      sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin (one call of each per round) so that
    drifts of a noisy machine hit every provider alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))  # alternate order: no provider always first
        for name in order:
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratios(times: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Each provider's time over the baseline's, as the median over rounds of the ratio within a round
    (the two calls of a pair ran next to each other, so slow drifts of the machine cancel)."""
    if baseline not in times:
        return {}
    base = times[baseline]
    return {name: statistics.median(a / b for a, b in zip(t, base)) for name, t in times.items()}


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
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    input_requires_grad: bool = False
    gift_model: gift.GIFTReference | gift.FastGIFT | None = None
    extra: dict = field(default_factory=dict)

    def step(self, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One training step: forward, backward, AdamW step."""
        if self.input_requires_grad:
            x = x.detach().requires_grad_(True)
        with _autocast(x, dtype):
            loss = F.cross_entropy(self.model(x).float(), y)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def gift_config(rank: int, num_clusters: int = 64) -> gift.GIFTConfig:
    return gift.GIFTConfig(rank=rank, block="paca", num_clusters=num_clusters, num_heads=1)


def build_provider(name: str, backbone: nn.Module, rank: int, gift_state: dict | None = None) -> Provider:
    """One provider around a private copy of ``backbone``. ``gift_state`` loads the same GIFT weights
    into every GIFT provider so their outputs and gradients can be compared."""
    backbone = copy.deepcopy(backbone)
    if name == "no_adapter":
        backbone.requires_grad_(False)
        backbone.get_classifier().requires_grad_(True)
        return Provider(name, backbone, torch.optim.AdamW(_trainable(backbone), lr=1e-4), input_requires_grad=True)
    if name == "lora":
        from gift.train import lora_model

        model = lora_model(backbone, rank)
        return Provider(name, model, torch.optim.AdamW(_trainable(model), lr=1e-4))
    if name == "reference":
        model = gift.GIFTReference(backbone, gift_config(rank))
    elif name.startswith(("fast_torch", "fast_triton")):
        memory = name.split("+")[1] if "+" in name else "none"
        backend = "triton" if name.startswith("fast_triton") else "torch"
        model = gift.FastGIFT(backbone, gift_config(rank), memory=memory, kernels=backend)
    else:
        raise ValueError(f"unknown provider {name!r}; known: {PROVIDERS}")
    if gift_state is not None:
        model.load_gift_state_dict(gift_state)
    return Provider(name, model, torch.optim.AdamW(_trainable(model), lr=1e-4), gift_model=model)


def randomize_gift_state(backbone: nn.Module, rank: int, seed: int = 0, scale: float = 0.02) -> dict:
    """GIFT weights (and head) with every tensor random, psi included, so that all gradients are non-zero."""
    model = gift.GIFTReference(copy.deepcopy(backbone), gift_config(rank))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.gift_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_((torch.randn(p.shape, generator=g) * (scale if p is model.out_projections["attn:proj"].weight
                                                            else fan_in ** -0.5)).to(p))
    return model.gift_state_dict()


def _autocast(x: torch.Tensor, dtype: torch.dtype | None):
    return torch.autocast(x.device.type, dtype=dtype, enabled=dtype not in (None, torch.float32, torch.float64))


def saved_bytes_of_step(provider: Provider, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Bytes saved for backward by one forward (activations; parameters and buffers not counted)."""
    if provider.input_requires_grad:
        x = x.detach().requires_grad_(True)
    with SavedTensorCounter(exclude=provider.model) as counter, _autocast(x, dtype):
        loss = F.cross_entropy(provider.model(x).float(), y)
    loss.backward()
    provider.model.zero_grad(set_to_none=True)
    return counter.bytes


def outputs_and_gift_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Logits and the gradient of every trainable parameter (GIFT and head) for one cross-entropy loss."""
    model.zero_grad(set_to_none=True)
    with _autocast(x, dtype):
        out = model(x)
    F.cross_entropy(out.to(torch.promote_types(out.dtype, torch.float32)), y).backward()
    result = {"output": out.detach()}
    result.update({k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return result


def agreement(provider: Provider, exact: dict, reference: dict, x: torch.Tensor, y: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> dict:
    """Max abs and max relative error of the provider's outputs and GIFT gradients vs the float64
    reference, beside the reference's own in the same dtype; ``ok`` applies
    `gift_kernels.testing.assert_agree` with the reference as baseline."""
    from gift_kernels.testing import assert_agree

    got = outputs_and_gift_grads(provider.model, x, y, dtype)
    errs = relative_errors(got, exact)
    ref_errs = relative_errors(reference, exact)
    try:
        assert_agree(got, exact, dtype, baseline=reference)
        ok, why = True, ""
    except AssertionError as e:
        ok, why = False, str(e)
    grads = [k for k in errs if k != "output"]
    return {
        "out_abs": errs["output"][0], "out_rel": errs["output"][1],
        "grad_abs": max(errs[k][0] for k in grads), "grad_rel": max(errs[k][1] for k in grads),
        "ref_grad_rel": max(ref_errs[k][1] for k in grads), "ok": ok, "why": why,
    }
