"""`gift finetune`: fine-tune a timm ViT with GIFT (or a baseline) on an ImageFolder tree or the
embedded dataset. `FinetuneConfig` holds every setting with its default and range (argparse, the
demo and the sweep fill it); `finetune(cfg)` runs one job: it checks everything before training,
checkpoints every epoch (atomically), resumes to the same result bit for bit (also after Ctrl-C
mid-step), and runs on several processes under ``torchrun`` (DDP: gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import backbone_identity, create_backbone, save_lora_adapter
from ..base import atomic_write
from ..config import BLOCK_TYPES, CLUSTER_ACTIVATIONS, GIFTConfig
from .data import TASKS, EmbeddedSpec, open_train_val
from .datasets import EVAL_SPLITS, TRAIN_SPLITS, absolute_data_spec
from .errors import UsageError, check_output_folder, library_errors, missing_extra
from .options import add_arguments as add_options, check_ranges, from_namespace, option
from .render import curves_unavailable, write_curves
from .runtime import Dist, accuracy, autocast, batch_of, init_distributed

METHODS = ("gift", "linear", "lora", "full")
CHECKPOINT = "checkpoint.pt"
RUN_FILES = (CHECKPOINT, "metrics.csv", "metrics.json", "curves.png", "adapter", "eval.json")
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def check_extras(options) -> None:
    """`UsageError` naming the extra to install when ``options.method`` / ``options.backbone_dtype`` (of a
    `FinetuneConfig` or `gift plan`'s options) need a package that is not installed."""
    for needed, module, extra, feature in ((options.method == "lora", "peft", "lora", "--method lora"),
                                           (options.backbone_dtype == "nf4", "torchao", "nf4", "--backbone-dtype nf4")):
        problem = missing_extra(module, extra, feature) if needed else None
        if problem:
            raise UsageError(problem)


@dataclass
class FinetuneConfig:
    """Every setting of one fine-tuning run: default, help text and allowed range, in one place.
    GIFT's own settings default to `GIFTConfig`'s."""

    model: str = option("gift_vit_micro_patch4_32", "any timm model name")
    pretrained: bool = option(False, "ask timm for the model's pretrained weights the usual way (its hub "
                                     "cache; needs the network the first time)")
    pretrained_file: str | None = option(None, "local weights (.safetensors or torch) for the model", type=str)
    data: str = option("default", "fgvc-json:DIR, vtab1k:DIR/TASK, imagefolder:DIR (or DIR: train/ and val/), "
                                  "or 'default' (the embedded dataset)")
    train_split: str = option("train", "split trained on (vtab1k: train = train800, trainval = train800val200)",
                              choices=TRAIN_SPLITS)
    eval_split: str = option("val", "split scored after every epoch (vtab1k: val = val200)", choices=EVAL_SPLITS)
    eval_every: int = option(1, "score --eval-split every N epochs and after the last (others record nan)", min=1)
    task: str = option("pattern", "labels of the embedded dataset", choices=sorted(TASKS))
    train_size: int = option(2000, "embedded dataset: training images", min=1)
    val_size: int = option(1000, "embedded dataset: validation images", min=1)
    data_seed: int = option(0, "embedded dataset: seed of the images", min=0)
    method: str = option("gift", "what is trained: GIFT, a linear probe, PEFT LoRA or everything", choices=METHODS)
    rank: int = option(GIFTConfig.rank, "GIFT rank r (LoRA rank for --method lora)", min=1)
    block: str = option(GIFTConfig.block, "GIFT generator block", choices=BLOCK_TYPES)
    num_clusters: int = option(GIFTConfig.num_clusters, "GIFT clusters M of PaCa", min=1)
    cluster_activation: str = option(GIFTConfig.cluster_activation, "GIFT cluster assignment of PaCa",
                                     choices=CLUSTER_ACTIVATIONS)
    amp: str | None = option(None, "autocast dtype (fp16 needs CUDA)", choices=("bf16", "fp16"), type=str)
    memory: str = option("none", "recompute in backward to save activation memory; auto: the fastest mode whose "
                                 "predicted peak fits 0.9 x --max-memory (see gift plan)", choices=("none", "mlp", "block", "auto"))
    model_ema: bool = option(False, "keep timm's ModelEmaV3 of the trained weights and evaluate it alongside "
                                    "(val_top1_ema; its adapter in OUTPUT/adapter_ema)")
    model_ema_decay: float = option(0.9998, "decay of --model-ema per step", min=0, max=1, max_open=True)
    max_memory: str | None = option(None, "memory budget of --memory auto, e.g. 24GiB (default: the GPU's free "
                                          "memory; on CPU no limit)", type=str)
    backbone_dtype: str | None = option(None, "storage of the frozen backbone weights (GIFT; nf4: 4-bit linear "
                                              "weights, pip install 'gift[nf4]')",
                                        choices=("float32", "bfloat16", "float16", "nf4"), type=str)
    seed: int = option(0, "seed of the initialisation, the order of the samples and drop-path", min=0)
    epochs: int = option(10, "epochs (with --resume: a larger number extends a finished run)", min=1)
    batch_size: int = option(64, "the global batch (split over torchrun processes)", min=1)
    lr: float = option(1e-3, "peak learning rate of AdamW", min=0, min_open=True)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0)
    warmup: float = option(0.1, "linear warm-up as a fraction of all steps, then cosine (paper: 10 of 100 epochs)",
                           min=0, max=1, max_open=True)
    drop_path: float = option(0.1, "stochastic depth rate of the backbone", min=0, max=1, max_open=True)
    output: str = option("runs/finetune", "run folder: checkpoint, adapter, metrics, curves")
    resume: bool = option(False, "continue the run in --output from its checkpoint.pt")
    overwrite: bool = option(False, "replace a run already in --output")
    stop_after: int = option(0, "stop (with a checkpoint) after this many epochs; 0: never", min=0)
    skip_bad_images: bool = option(False, "skip unreadable images instead of stopping")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda when available)", type=str)
    quiet: bool = option(False, "no progress bars or per-epoch lines")

    def validate(self) -> None:
        """Every flag in its range and the flags consistent with each other and with this machine;
        raises `UsageError` naming the flag. Nothing is built or read."""
        check_ranges(self)
        if self.pretrained and self.pretrained_file:
            raise UsageError("give either --pretrained (timm's hub) or --pretrained-file (local), not both")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the run in --output and --overwrite replaces it: give one")
        if self.device is not None and not DEVICE_PATTERN.fullmatch(self.device):
            raise UsageError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.device_type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {self.device}: torch sees no CUDA GPU here; use --device cpu")
        if self.amp == "fp16" and self.device_type != "cuda":
            raise UsageError("--amp fp16 needs a CUDA device (gradient scaling); on CPU use --amp bf16 or no --amp")
        check_extras(self)
        if self.backbone_dtype == "nf4":
            if self.model_ema:
                raise UsageError("--model-ema averages every weight (timm's ModelEmaV3), which NF4 weights do not "
                                 "support: drop --model-ema or use --backbone-dtype bfloat16")

    @property
    def device_type(self) -> str:
        if self.device is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device.split(":")[0]

    @property
    def embedded(self) -> EmbeddedSpec:
        return EmbeddedSpec(self.task, self.train_size, self.val_size, self.data_seed)


# ---------------------------------------------------------------------------------------- model
def build_model(cfg: FinetuneConfig, backbone, memory: str | None = None):
    """Wrap ``backbone`` for ``cfg.method`` (GIFT in memory mode ``memory``, default ``cfg.memory``);
    returns (model, GIFT model or None)."""
    from ..fast import FastGIFT
    from ..plan import wrap_for_training
    from .plan import training_setup

    model = wrap_for_training(training_setup(cfg), backbone, memory or cfg.memory)
    return model, (model if isinstance(model, FastGIFT) else None)


def trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def probe_data_config(name: str) -> tuple[int, tuple, tuple]:
    """(image size, mean, std) the model expects, from a parameter-free (meta device) instance."""
    with torch.device("meta"):
        cfg = create_backbone(name, 1).pretrained_cfg
    return cfg.get("input_size", (3, 224, 224))[-1], cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3)


def epoch_order(n: int, seed: int, epoch: int):
    """The shuffled sample order of one epoch: a function of (seed, epoch) only, so resume repeats it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


# ---------------------------------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_identity(cfg: FinetuneConfig, num_classes: int, backbone: dict) -> dict:
    """What a checkpoint must agree on to be resumed (the number of epochs may grow)."""
    frozen = {k: v for k, v in backbone.items() if k != "pretrained_path"}
    return {"model": cfg.model, "method": cfg.method, "num_classes": num_classes, "rank": cfg.rank,
            "block": cfg.block, "num_clusters": cfg.num_clusters, "cluster_activation": cfg.cluster_activation,
            "train_split": cfg.train_split, "batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
            "seed": cfg.seed, "backbone": frozen}


def save_checkpoint(path: str, model, optimizer, scheduler, identity, epochs, epoch, step_in_epoch, history,
                    partial, rng, ema=None) -> None:
    """Everything `resume` needs; ``rng`` is the RNG state to continue from (that before the next step);
    ``ema``: the `--model-ema` model (its trained weights are kept)."""
    state = {"format": "gift-finetune-v2", "identity": identity, "epochs": epochs, "epoch": epoch,
             "step_in_epoch": step_in_epoch, "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": rng, "history": history, "partial": partial,
             "ema": None if ema is None else trainable_state(ema)}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str, identity: dict) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UsageError(f"--resume: cannot read {path!r}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != "gift-finetune-v2":
        raise UsageError(f"--resume: {path!r} is not a checkpoint of this gift version's finetune")
    saved = state["identity"]
    diff = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
    if diff:
        text = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise UsageError(f"--resume: checkpoint {path!r} is from another model or config ({text})")
    return state


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C (SIGINT) inside the block is held until the block ends, so its work is all or nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------- training
def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def write_metrics(output: str, history: list[dict], curves: bool) -> None:
    import csv

    def write_csv(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(history, f, indent=2)

    atomic_write(os.path.join(output, "metrics.csv"), write_csv)
    atomic_write(os.path.join(output, "metrics.json"), write_json)
    if curves:
        write_curves(os.path.join(output, "curves.png"), history)


def prepare_output(cfg: FinetuneConfig) -> None:
    """The run folder exists and is writable; an earlier run in it is kept unless --resume or --overwrite."""
    check_output_folder(cfg.output)
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.output, f))]
    if held and not (cfg.resume or cfg.overwrite):
        raise UsageError(f"--output {cfg.output!r} already holds a run ({', '.join(held)}); "
                         f"pass --resume to continue it or --overwrite to replace it")
    if cfg.overwrite:  # every torchrun process may get here: whoever comes second finds nothing left
        for f in held:
            path = os.path.join(cfg.output, f)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


def say(d, text: str, err: bool = False) -> None:
    """One line from the main process only."""
    if d.main:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def finetune(cfg: FinetuneConfig, keep_model: bool = False) -> dict:
    """Run one fine-tuning job. Returns the summary: ``method``, ``trainable_parameters``, ``top1`` and
    ``top5`` (validation, last epoch), ``step_time_s``, ``history``, ``output`` (the run folder), ``main``
    (this is the process that reports), and the trained ``model`` with ``keep_model``.

    Raises `UsageError` / `DataError` for bad input, before any training step."""
    cfg.validate()
    with library_errors():
        image_size, mean, std = probe_data_config(cfg.model)
    prepare_output(cfg)
    d = init_distributed(cfg.device)
    try:
        if cfg.batch_size % d.world:
            raise UsageError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by {d.world} processes")
        train_set, val_set, classes, skipped = open_train_val(cfg.data, image_size, mean, std, cfg.embedded,
                                                              cfg.skip_bad_images, cfg.train_split, cfg.eval_split)
        steps_per_epoch = len(train_set) // cfg.batch_size
        if steps_per_epoch == 0:
            raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images")
        if skipped:
            say(d, f"skipped {skipped} unreadable image(s) (--skip-bad-images)")
        for split_set in (train_set, val_set):  # local benchmark copies say what they read, and from where
            if hasattr(split_set, "describe") and not cfg.quiet:
                say(d, split_set.describe())
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        with library_errors():
            identity = backbone_identity(cfg.model, len(classes), cfg.drop_path, cfg.seed, cfg.pretrained_file,
                                         cfg.pretrained)
            backbone = create_backbone(cfg.model, len(classes), cfg.drop_path, cfg.pretrained_file, cfg.pretrained)
        with library_errors(f"--method {cfg.method} on {cfg.model}"):
            from .plan import choose_finetune_memory

            memory, reason = choose_finetune_memory(cfg, len(classes), cfg.batch_size // d.world, d.device)
            if reason:
                say(d, reason)
            model, gift_model = build_model(cfg, backbone, memory)
        return _train(cfg, d, model, gift_model, identity, train_set, val_set, classes, steps_per_epoch, keep_model)
    finally:
        d.close()


def _train(cfg: FinetuneConfig, d: Dist, model, gift_model, backbone_id: dict, train_set, val_set, classes,
           steps_per_epoch: int, keep_model: bool) -> dict:
    from tqdm import tqdm

    no_curves = curves_unavailable()
    model.to(d.device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    train_module = model
    if d.world > 1:
        train_module = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.model_ema_decay)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, max(1, round(total * cfg.warmup))))
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.amp == "fp16")
    ckpt_path = os.path.join(cfg.output, CHECKPOINT)
    identity = run_identity(cfg, len(classes), backbone_id)
    history, start_epoch, start_step = [], 0, 0
    partial = {"loss_sum": 0.0, "count": 0, "step_time": 0.0}
    run_info = {"model": cfg.model, "method": cfg.method, "num_classes": len(classes), "classes": list(classes),
                "trainable_parameters": n_trainable,
                "backbone": backbone_id, "amp": cfg.amp,
                "data": {"data": absolute_data_spec(cfg.data), "train_split": cfg.train_split,
                         "eval_split": cfg.eval_split, **asdict(cfg.embedded)}}

    def summary() -> dict:
        kept = {"model": model} if keep_model else {}
        last = history[-1] if history else {}
        return {**kept, "method": cfg.method, "trainable_parameters": n_trainable,
                "top1": last.get("val_top1", float("nan")), "top5": last.get("val_top5", float("nan")),
                "step_time_s": float(np.mean([h["step_time_s"] for h in history])) if history else float("nan"),
                "history": history, "output": cfg.output, "main": d.main}

    if cfg.resume:
        state = load_checkpoint(ckpt_path, identity)
        history, start_epoch, start_step, partial = state["history"], state["epoch"], state["step_in_epoch"], state["partial"]
        if start_epoch > cfg.epochs or (start_epoch == cfg.epochs and start_step):
            raise UsageError(f"--epochs {cfg.epochs} is fewer than the {start_epoch} epoch(s) the run in "
                             f"{cfg.output!r} has done; pass --epochs {state['epochs']} or more")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(state["trainable"][n])
            if ema is not None:
                if state.get("ema") is None:
                    raise UsageError(f"--resume --model-ema: the run in {cfg.output!r} was trained without --model-ema")
                for n, p in ema.module.named_parameters():
                    if n in state["ema"]:
                        p.copy_(state["ema"][n])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if start_epoch == cfg.epochs:
            say(d, f"the run in {cfg.output} is already finished ({cfg.epochs} epochs); "
                   f"pass --epochs N > {cfg.epochs} to extend it")
            return summary()
        if cfg.epochs != state["epochs"]:
            say(d, f"extending the run from {state['epochs']} to {cfg.epochs} epochs: the learning-rate schedule "
                   f"now spans {cfg.epochs} epochs")
        say(d, f"resumed from {ckpt_path} at epoch {start_epoch + 1}, step {start_step}")
    if no_curves:
        say(d, f"note: {no_curves}")
    if backbone_id["pretrained"] == "random":
        say(d, f"warning: {cfg.model} starts from a random initialisation (seed {cfg.seed}; no --pretrained or "
               f"--pretrained-file): fine for tests, not for real fine-tuning", err=True)
    local = cfg.batch_size // d.world
    resume_at, resume_rng = (start_epoch, start_step), rng_state()  # where a Ctrl-C checkpoint continues from

    def checkpoint(epoch_, step_, partial_, rng):
        if d.main:
            save_checkpoint(ckpt_path, model, optimizer, scheduler, identity, cfg.epochs, epoch_, step_, history,
                            partial_, rng, None if ema is None else ema.module)
            if gift_model is not None:
                gift_model.save_adapter(os.path.join(cfg.output, "adapter"), run=run_info)
                if ema is not None:
                    ema.module.save_adapter(os.path.join(cfg.output, "adapter_ema"), run=run_info)
            elif cfg.method == "lora":
                save_lora_adapter(model, os.path.join(cfg.output, "adapter"), run_info)

    try:
        for epoch in range(start_epoch, cfg.epochs):
            order = epoch_order(len(train_set), cfg.seed, epoch)
            model.train()
            first = start_step if epoch == start_epoch else 0
            bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not d.main or cfg.quiet, leave=False)
            for step in bar:
                batch = order[step * cfg.batch_size:(step + 1) * cfg.batch_size][d.rank * local:(d.rank + 1) * local]
                x, y = batch_of(train_set, batch)
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)  # no gradients alive in forward, as `gift plan` counts
                with autocast(d.device, cfg.amp):
                    loss = F.cross_entropy(train_module(x.to(d.device)).float(), y.to(d.device))
                scaler.scale(loss).backward()
                with interrupts_held():  # the update, the step count and the RNG to resume from: all or nothing
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    if ema is not None:
                        ema.update(model)
                    partial["step_time"] += time.perf_counter() - start
                    partial["loss_sum"] += loss.item() * len(y)
                    partial["count"] += len(y)
                    resume_at, resume_rng = (epoch, step + 1), rng_state()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            loss_sum, count = d.all_reduce([partial["loss_sum"], partial["count"]])
            scored = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
            nan = {"top1": float("nan"), "top5": float("nan")}
            scores = accuracy(model, val_set, max(local, 64), d, cfg.amp) if scored else nan
            ema_scores = {} if ema is None else accuracy(ema.module, val_set, max(local, 64), d, cfg.amp) if scored else nan
            with interrupts_held():
                history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1), "val_top1": scores["top1"],
                                "val_top5": scores["top5"], "lr": scheduler.get_last_lr()[0],
                                "step_time_s": partial["step_time"] / steps_per_epoch,
                                **{f"val_{k}_ema": ema_scores[k] for k in ("top1", "top5") if k in ema_scores}})
                partial = {"loss_sum": 0.0, "count": 0, "step_time": 0.0}
                resume_at, resume_rng = (epoch + 1, 0), rng_state()
                checkpoint(*resume_at, partial, resume_rng)
                if d.main:
                    write_metrics(cfg.output, history, curves=not no_curves)
            if not cfg.quiet:
                say(d, f"epoch {epoch + 1}/{cfg.epochs}: train loss {history[-1]['train_loss']:.4f}"
                       + (f", {cfg.eval_split} top-1 {scores['top1']:.4f}" if scored else ""))
            if cfg.stop_after and epoch + 1 - start_epoch >= cfg.stop_after and epoch + 1 < cfg.epochs:
                say(d, f"stopped after {cfg.stop_after} epoch(s) as asked; continue with --resume")
                break
    except KeyboardInterrupt:
        checkpoint(*resume_at, partial, resume_rng)
        say(d, f"\ninterrupted: saved {ckpt_path} (epoch {resume_at[0] + 1}, step {resume_at[1]}); continue with --resume")
        raise
    return summary()



# ---------------------------------------------------------------------------------------- command
def add_arguments(p: argparse.ArgumentParser) -> None:
    from .recipes import add_recipe_argument

    add_recipe_argument(p)
    add_options(p, FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    summary = finetune(from_namespace(FinetuneConfig, args))
    if summary["main"]:
        print(f"done: {summary['method']}, {summary['trainable_parameters']:,} trainable parameters, "
              f"{args.eval_split} top-1 {summary['top1']:.4f}; outputs in {summary['output']}")
    return 0


