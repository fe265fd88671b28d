"""What training and evaluation share: the process group (torchrun), autocast, batches, accuracy."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..dtypes import autocast_for


@dataclass
class Dist:
    """This process's place under ``torchrun`` (``process_rank`` 0 of ``world_size`` 1 without it) and its device."""

    process_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.process_rank == 0

    def all_reduce(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_name: str | None) -> Dist:
    """Join the process group when ``WORLD_SIZE`` > 1 (gloo on CPU, NCCL on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    process_rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() if device_name is None else device_name.startswith("cuda")
    if cuda:
        index = (
            int(device_name.split(":")[1])
            if device_name and ":" in device_name
            else int(os.environ.get("LOCAL_RANK", "0"))
        )
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(process_rank, world_size, device)


def batch_of(dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (B, 3, H, W), labels (B,))`` of the samples at ``indices``."""
    items = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def accuracy(model, dataset, batch_size: int, d: Dist, amp: str | None) -> dict[str, float]:
    """Top-1 and top-5 (top-C with fewer than 5 classes) of ``model`` on ``dataset``, in eval mode under
    autocast in ``amp`` (a dtype name; None: none), the samples split over the processes; the model is put
    back in training mode."""
    model.eval()
    top1 = top5 = total = 0
    indices = torch.arange(len(dataset))[d.process_rank::d.world_size]
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            x, y = batch_of(dataset, indices[start:start + batch_size])
            with autocast_for(d.device, amp):
                logits = model(x.to(d.device)).float().cpu()
            best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            top1 += (best[:, 0] == y).sum().item()
            top5 += (best == y[:, None]).any(-1).sum().item()
            total += len(y)
    top1, top5, total = d.all_reduce([top1, top5, total])
    model.train()
    return {"top1": top1 / max(total, 1), "top5": top5 / max(total, 1), "num_images": int(total)}
