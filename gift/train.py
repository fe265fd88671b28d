"""`gift finetune`: fine-tune a timm ViT with GIFT (or a baseline) on an ImageFolder tree or the
embedded dataset, offline. Checkpoints every epoch (atomically), resumes to the same result,
saves on Ctrl-C, and runs on several processes under ``torchrun`` (DDP: gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .base import atomic_write, classifier_name
from .config import GIFTConfig
from .data import DataError, ImageFolderDataset, SyntheticShapes, scan_image_folder

METHODS = ("gift", "linear", "lora", "full")
CHECKPOINT = "checkpoint.pt"


class UsageError(Exception):
    """Bad input to the command line: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def init_distributed(device_name: str | None) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() if device_name is None else device_name.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, device)


# ---------------------------------------------------------------------------------------- model
def create_backbone(name: str, num_classes: int, drop_path: float, pretrained_file: str | None) -> nn.Module:
    import timm

    from . import models  # noqa: F401  (registers the gift_* models with timm)

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise UsageError(f"unknown model {name!r}{hint} (any timm model name works, e.g. vit_small_patch16_224)")
    backbone = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path)
    if pretrained_file:
        load_pretrained(backbone, pretrained_file)
    return backbone


def _read_weights(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"pretrained file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read pretrained file {path!r}: {type(e).__name__}: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_pretrained(backbone: nn.Module, path: str) -> None:
    """Load a local timm state dict into ``backbone``; a classifier of another size is left as initialised."""
    state = _read_weights(path)
    own = backbone.state_dict()
    head = classifier_name(backbone)
    head_keys = {k for k in own if head is not None and k.startswith(head + ".")}
    misshapen = [k for k in state if k in own and state[k].shape != own[k].shape and k not in head_keys]
    missing = [k for k in own if k not in state and k not in head_keys]
    if misshapen or missing:
        details = "; ".join([f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in misshapen[:5]]
                            + ([f"missing {missing[:5]}"] if missing else []))
        raise UsageError(f"pretrained file {path!r} does not fit {type(backbone).__name__} ({details}); "
                         f"is it for another model or size?")
    state = {k: v for k, v in state.items() if k in own and not (k in head_keys and v.shape != own[k].shape)}
    backbone.load_state_dict(state, strict=False)


def lora_model(backbone: nn.Module, rank: int, target_modules=("attn.proj",)) -> nn.Module:
    """PEFT LoRA on the same layers GIFT adapts (alpha = rank, no dropout), the classifier head trained."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(target_modules),
                     modules_to_save=[classifier_name(backbone)])
    return get_peft_model(backbone, cfg)


def build_model(args, backbone: nn.Module):
    """Wrap ``backbone`` for ``args.method``; returns (model, gift model or None)."""
    if args.method == "gift":
        from .fast import FastGIFT

        cfg = GIFTConfig(rank=args.rank, block=args.block, num_clusters=args.num_clusters)
        dtype = getattr(torch, args.backbone_dtype) if args.backbone_dtype else None
        model = FastGIFT(backbone, cfg, memory=args.memory, backbone_dtype=dtype)
        return model, model
    if args.method == "lora":
        return lora_model(backbone, args.rank), None
    backbone.requires_grad_(args.method == "full")
    backbone.get_classifier().requires_grad_(True)
    return backbone, None


def trainable_state(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------- data
def make_datasets(args, backbone: nn.Module):
    cfg = backbone.pretrained_cfg
    size = cfg.get("input_size", (3, 224, 224))[-1]
    mean, std = cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5))
    if args.data in (None, "default", "embedded"):
        train = SyntheticShapes(args.train_size, size, seed=args.data_seed, task=args.task, mean=mean, std=std)
        val = SyntheticShapes(args.val_size, size, seed=args.data_seed + 1, task=args.task, mean=mean, std=std)
        return train, val, train.classes, 0
    if not os.path.isdir(args.data):
        raise UsageError(f"data folder {args.data!r} does not exist (or pass --data default for the embedded dataset)")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(args.data, split)):
            raise UsageError(f"data folder {args.data!r} has no {split}/ folder (expected {args.data}/train/<class>/... "
                             f"and {args.data}/val/<class>/...)")
    try:
        scans = [scan_image_folder(os.path.join(args.data, s), args.skip_bad_images) for s in ("train", "val")]
    except DataError as e:
        raise UsageError(str(e)) from None
    if scans[0].classes != scans[1].classes:
        raise UsageError(f"train/ and val/ of {args.data!r} have different class folders: "
                         f"{scans[0].classes} vs {scans[1].classes}")
    skipped = len(scans[0].skipped) + len(scans[1].skipped)
    return (ImageFolderDataset(scans[0], size, mean, std), ImageFolderDataset(scans[1], size, mean, std),
            scans[0].classes, skipped)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of one epoch: a function of (seed, epoch) only, so resume repeats it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_of(dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


# ---------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _run_identity(args, num_classes: int) -> dict:
    return {"model": args.model, "method": args.method, "num_classes": num_classes, "rank": args.rank,
            "block": args.block, "num_clusters": args.num_clusters, "batch_size": args.batch_size,
            "epochs": args.epochs, "seed": args.seed}


def save_checkpoint(path: str, model, optimizer, scheduler, identity, epoch, step_in_epoch, history, partial) -> None:
    state = {"format": "gift-finetune-v1", "identity": identity, "epoch": epoch, "step_in_epoch": step_in_epoch,
             "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": _rng_state(), "history": history, "partial": partial}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str, identity: dict) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UsageError(f"--resume: cannot read {path!r}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != "gift-finetune-v1":
        raise UsageError(f"--resume: {path!r} is not a gift finetune checkpoint")
    saved = state["identity"]
    diff = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
    if diff:
        text = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise UsageError(f"--resume: checkpoint {path!r} is from another model or config ({text})")
    return state


# ---------------------------------------------------------------------------------------- training
def _autocast(device: torch.device, amp: str | None):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def evaluate(model, dataset, batch_size: int, d: Dist, amp) -> float:
    model.eval()
    correct = total = 0
    indices = torch.arange(len(dataset))[d.rank::d.world]
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            x, y = batch_of(dataset, indices[start:start + batch_size])
            with _autocast(d.device, amp):
                logits = model(x.to(d.device))
            correct += (logits.argmax(-1).cpu() == y).sum().item()
            total += len(y)
    correct, total = d.all_reduce([correct, total])
    model.train()
    return correct / max(total, 1)


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def write_metrics(output: str, history: list[dict]) -> None:
    import csv

    keys = list(history[0])

    def write_csv(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(history)

    atomic_write(os.path.join(output, "metrics.csv"), write_csv)

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(history, f, indent=2)

    atomic_write(os.path.join(output, "metrics.json"), write_json)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [h["epoch"] for h in history]
    ax[0].plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax[0].set_title("train loss")
    ax[1].plot(epochs, [h["val_top1"] for h in history], marker="o", color="tab:green")
    ax[1].set_title("val top-1")
    for a in ax:
        a.set_xlabel("epoch")
    fig.tight_layout()
    atomic_write(os.path.join(output, "curves.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def finetune(args, keep_model: bool = False) -> dict:
    """Run one fine-tuning job; returns the summary (method, trainable parameters, top-1, step time;
    the trained ``model`` too with ``keep_model``)."""
    from tqdm import tqdm

    if args.batch_size is not None and args.batch_size <= 0:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.epochs <= 0:
        raise UsageError(f"--epochs must be a positive integer, got {args.epochs}")
    d = init_distributed(args.device)
    if args.batch_size % d.world:
        raise UsageError(f"--batch-size {args.batch_size} (the global batch) is not divisible by {d.world} processes")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    probe = create_backbone(args.model, 1, 0.0, None)
    train_set, val_set, classes, skipped = make_datasets(args, probe)
    if skipped and d.main:
        print(f"skipped {skipped} unreadable image(s) (--skip-bad-images)")
    torch.manual_seed(args.seed)
    backbone = create_backbone(args.model, len(classes), args.drop_path, args.pretrained_file)
    model, gift_model = build_model(args, backbone)
    model.to(d.device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    train_module = model
    if d.world > 1:
        train_module = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images")
    total = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, max(1, round(total * args.warmup))))
    scaler = torch.amp.GradScaler(d.device.type, enabled=args.amp == "fp16")
    os.makedirs(args.output, exist_ok=True)
    ckpt_path = os.path.join(args.output, CHECKPOINT)
    identity = _run_identity(args, len(classes))
    history, start_epoch, start_step, partial = [], 0, 0, {"loss_sum": 0.0, "count": 0, "step_time": 0.0}
    if args.resume:
        state = load_checkpoint(ckpt_path, identity)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(state["trainable"][n])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        history, start_epoch, start_step, partial = state["history"], state["epoch"], state["step_in_epoch"], state["partial"]
        if d.main:
            print(f"resumed from {ckpt_path} at epoch {start_epoch + 1}, step {start_step}")
    local = args.batch_size // d.world
    epoch, step = start_epoch, start_step
    run_info = {"model": args.model, "num_classes": len(classes), "classes": list(classes),
                "pretrained_file": os.path.abspath(args.pretrained_file) if args.pretrained_file else None}

    def checkpoint(epoch_, step_, partial_):
        if d.main:
            save_checkpoint(ckpt_path, model, optimizer, scheduler, identity, epoch_, step_, history, partial_)
            if gift_model is not None:
                gift_model.save_adapter(os.path.join(args.output, "adapter"), run=run_info)

    try:
        for epoch in range(start_epoch, args.epochs):
            order = epoch_order(len(train_set), args.seed, epoch)
            model.train()
            bar = tqdm(range(step if epoch == start_epoch else 0, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=not d.main or args.quiet, leave=False)
            for step in bar:
                batch = order[step * args.batch_size:(step + 1) * args.batch_size][d.rank * local:(d.rank + 1) * local]
                x, y = batch_of(train_set, batch)
                start = time.perf_counter()
                with _autocast(d.device, args.amp):
                    loss = F.cross_entropy(train_module(x.to(d.device)).float(), y.to(d.device))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                partial["step_time"] += time.perf_counter() - start
                partial["loss_sum"] += loss.item() * len(y)
                partial["count"] += len(y)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            step = steps_per_epoch
            loss_sum, count = d.all_reduce([partial["loss_sum"], partial["count"]])
            top1 = evaluate(model, val_set, max(local, 64), d, args.amp)
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1), "val_top1": top1,
                            "lr": scheduler.get_last_lr()[0], "step_time_s": partial["step_time"] / steps_per_epoch})
            if d.main and not args.quiet:
                print(f"epoch {epoch + 1}/{args.epochs}: train loss {history[-1]['train_loss']:.4f}, val top-1 {top1:.4f}")
            partial = {"loss_sum": 0.0, "count": 0, "step_time": 0.0}
            checkpoint(epoch + 1, 0, partial)
            if d.main:
                write_metrics(args.output, history)
            step = 0
            if args.stop_after and epoch + 1 - start_epoch >= args.stop_after and epoch + 1 < args.epochs:
                if d.main:
                    print(f"stopped after {args.stop_after} epoch(s) as asked; continue with --resume")
                break
    except KeyboardInterrupt:
        checkpoint(epoch, step, partial)
        if d.main:
            print(f"\ninterrupted: saved {ckpt_path} (epoch {epoch + 1}, step {step}); continue with --resume")
        raise
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    summary = {"model": model} if keep_model else {}
    return {**summary, "method": args.method, "trainable_parameters": n_trainable,
            "top1": history[-1]["val_top1"] if history else float("nan"),
            "step_time_s": float(np.mean([h["step_time_s"] for h in history])) if history else float("nan"),
            "history": history, "output": args.output}


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gift_vit_micro_patch4_32", help="any timm model name")
    p.add_argument("--pretrained-file", default=None, help="local weights (.safetensors or torch); nothing is downloaded")
    p.add_argument("--data", default="default", help="ImageFolder root with train/ and val/, or 'default' (embedded)")
    p.add_argument("--task", default="pattern", choices=["shape", "pattern"], help="labels of the embedded dataset")
    p.add_argument("--train-size", type=int, default=2000, help="embedded dataset: training images")
    p.add_argument("--val-size", type=int, default=1000, help="embedded dataset: validation images")
    p.add_argument("--data-seed", type=int, default=0, help="embedded dataset: seed of the images")
    p.add_argument("--method", default="gift", choices=METHODS)
    p.add_argument("--rank", type=int, default=16, help="GIFT rank r (LoRA rank for --method lora)")
    p.add_argument("--block", default="paca", choices=["paca", "paca_attn", "identity"])
    p.add_argument("--num-clusters", type=int, default=16)
    p.add_argument("--amp", default=None, choices=["bf16", "fp16"])
    p.add_argument("--memory", default="none", choices=["none", "mlp", "block"])
    p.add_argument("--backbone-dtype", default=None, choices=["bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="the global batch (split over torchrun processes)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up as a fraction of all steps (paper: 10 of 100 epochs)")
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--output", default="runs/finetune")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    p.add_argument("--stop-after", type=int, default=0, help="stop (with a checkpoint) after this many epochs")
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true")
