"""The training loop of `gift finetune` (and of `gift sweep` and the demo, which call `finetune`): one
job from a `FinetuneConfig`, checked before it trains, checkpointed every epoch (atomically), resumed
to the same result bit for bit (also after Ctrl-C mid-step), and run on several processes under
``torchrun`` (DDP: gloo on CPU, NCCL on CUDA). `finetune` = `start_run`, then per epoch
`train_one_epoch`, `evaluate` and `end_epoch` (`train`). One run owns its folder at a time (a lock), a
non-finite step stops it before anything non-finite is written (`gift.app.divergence`), SIGTERM is
Ctrl-C, and a full disk is one line.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch.utils.data import Dataset
from tqdm import tqdm

from ..backbones import backbone_identity, create_backbone
from ..dtypes import autocast_for, dtype_name
from ..fast import FastGIFT
from ..files import atomic_write, atomic_write_json, atomic_write_text, content_sha256
from ..lora import save_lora_adapter
from ..plan import wrap_for_training
from .data import absolute_data_spec, data_content_fingerprint, data_fingerprint, open_train_val
from .divergence import Diverged, non_finite_tensors, step_is_finite
from .errors import UsageError, check_output_folder, library_errors
from .interrupts import Terminated, interrupts_held, sigterm_as_interrupt
from .render import curves_unavailable, write_curves
from .run_config import FinetuneConfig, choose_finetune_memory, probe_data_config, training_setup
from .run_folder import (
    CHECKPOINT,
    check_free_space,
    describe_owner,
    disk_full_as_usage_error,
    drop_replaced,
    epoch_write_bytes,
    folder_lock,
    held_run_files,
    remove_orphans,
    restore_replaced,
    set_aside_run,
    settle_replaced,
)
from .runtime import Dist, accuracy, batch_of, init_distributed

RESUME_HINT = "continue with --resume"


# ---------------------------------------------------------------------------------------- model
def build_model(cfg: FinetuneConfig, backbone, memory: str | None = None):
    """Wrap ``backbone`` for ``cfg.method`` (GIFT in memory mode ``memory``, default ``cfg.memory``);
    returns (model, GIFT model or None)."""
    model = wrap_for_training(training_setup(cfg), backbone, memory or cfg.memory)
    return model, (model if isinstance(model, FastGIFT) else None)


def trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


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


def run_identity(cfg: FinetuneConfig, num_classes: int, backbone: dict, train_data: str | None = None,
                 train_content: str | None = None) -> dict:
    """What a checkpoint must agree on to be resumed: every setting that changes the trained weights (the
    number of epochs may grow). ``train_data``: `gift.app.data.data_fingerprint` of the training split;
    ``train_content``: its `gift.app.data.data_content_fingerprint`."""
    frozen = {k: v for k, v in backbone.items() if k != "pretrained_path"}
    return {
        "model": cfg.model,
        "method": cfg.method,
        "num_classes": num_classes,
        "rank": cfg.method_rank,
        "block": cfg.block,
        "num_clusters": cfg.num_clusters,
        "cluster_activation": cfg.cluster_activation,
        "train_split": cfg.train_split,
        "batch_size": cfg.batch_size,
        "grad_accum_steps": cfg.grad_accum_steps,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "seed": cfg.seed,
        "backbone": frozen,
        "train_data": train_data,
        "train_content": train_content,
        "warmup": cfg.warmup,
        "amp": cfg.amp,
        "backbone_dtype": cfg.backbone_dtype,
        "model_ema_decay": cfg.model_ema_decay if cfg.model_ema else None,
    }


#: identity fields whose values are dtype names (compared as `gift.dtypes.dtype_name` spells them, so a
#: run recorded as ``bf16`` matches ``bfloat16``)
DTYPE_FIELDS = ("amp", "backbone_dtype")


def normal_setting(key: str, value):
    """A recorded setting as it compares: dtype names (`DTYPE_FIELDS`) in torch's spelling, others as they are."""
    return dtype_name(value) if key in DTYPE_FIELDS and isinstance(value, str) else value


# fields added to the identity for a setting that older gifts did not have: their runs had this value
VALUE_BEFORE_RECORDED = {"grad_accum_steps": None}


def identity_differences(saved: dict, now: dict) -> tuple[dict, list[str]]:
    """``({field: (saved value, value now)}, fields the saved identity does not record)``: what differs
    between a checkpoint's identity and this run's (`normal_setting`); a checkpoint of an older gift lacks
    the fields added since (those of `VALUE_BEFORE_RECORDED` are compared with the value they had then)."""
    saved = {**{k: v for k, v in VALUE_BEFORE_RECORDED.items() if k in now}, **saved}
    diff = {k: (saved[k], v) for k, v in now.items()
            if k in saved and normal_setting(k, saved[k]) != normal_setting(k, v)}
    return diff, [k for k in now if k not in saved]


def save_checkpoint(path: str, model, optimizer, scheduler, identity, epochs, epoch, step_in_epoch, history,
                    partial, rng, ema=None, scaler: torch.amp.GradScaler | None = None) -> None:
    """Everything `resume` needs; ``rng`` is the RNG state to continue from (that before the next step);
    ``ema``: the `--model-ema` model (its trained weights are kept); ``scaler``: float16's loss scaler (its
    scale and growth counter; None when disabled)."""
    state = {"format": "gift-finetune-v2", "identity": identity, "epochs": epochs, "epoch": epoch,
             "step_in_epoch": step_in_epoch, "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": rng, "history": history, "partial": partial,
             "ema": None if ema is None else trainable_state(ema),
             "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    state["sha256"] = content_sha256(state)  # of everything else: a flipped bit is found on resume

    def write(tmp):
        with open(tmp, "wb") as f:  # through Python's file: a full disk is an OSError, not torch's stream error
            torch.save(state, f)

    atomic_write(path, write)


def load_checkpoint(path: str, identity: dict) -> dict:
    """The checkpoint at ``path`` if it is whole (its checksum), of this run (``identity``) and finite;
    `UsageError` naming what is wrong otherwise."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UsageError(f"--resume: cannot read {path!r}: {type(e).__name__}: {e}; it is damaged or partial: "
                         f"restore it from a copy, or start again with --overwrite") from None
    if not isinstance(state, dict) or state.get("format") != "gift-finetune-v2":
        raise UsageError(f"--resume: {path!r} is not a checkpoint of this gift version's finetune")
    recorded = state.pop("sha256", None)  # checkpoints of gifts before the checksum have none
    if recorded is not None and content_sha256(state) != recorded:
        raise UsageError(f"--resume: {path!r} is damaged: its content does not match the checksum it was saved "
                         f"with (a flipped bit or a partial copy); restore it from a copy, or start again with "
                         f"--overwrite")
    diff, state["unrecorded"] = identity_differences(state["identity"], identity)
    if diff:
        text = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise UsageError(f"--resume: checkpoint {path!r} is from another model or config ({text})")
    bad = [n for n, t in {**state["trainable"], **(state.get("ema") or {})}.items() if not torch.isfinite(t).all()]
    if bad:
        raise UsageError(f"--resume: {path!r} holds non-finite weights ({len(bad)} tensor(s), e.g. {bad[0]}): "
                         f"it is damaged or from a run that diverged; start again with --overwrite")
    return state


# ---------------------------------------------------------------------------------------- training
def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def write_metrics(output: str, history: list[dict], curves: bool) -> None:
    csv_text = io.StringIO(newline="")
    w = csv.DictWriter(csv_text, fieldnames=list(history[0]))
    w.writeheader()
    w.writerows(history)
    atomic_write_text(os.path.join(output, "metrics.csv"), csv_text.getvalue())
    atomic_write_json(os.path.join(output, "metrics.json"), history)
    if curves:
        write_curves(os.path.join(output, "curves.png"), history)


def check_run_folder(cfg: FinetuneConfig) -> None:
    """An earlier run in the folder is kept unless --resume or --overwrite (called with the folder locked)."""
    held = held_run_files(cfg.output)
    if held and not (cfg.resume or cfg.overwrite):
        raise UsageError(f"--output {cfg.output!r} already holds a run ({', '.join(held)}); "
                         f"pass --resume to continue it or --overwrite to replace it")


def take_run_folder(cfg: FinetuneConfig, d: Dist, held: contextlib.ExitStack) -> None:
    """Lock the run folder for this run (main process; released when ``held`` closes), then refuse one
    that holds a run unless --resume or --overwrite."""
    lock = held.enter_context(folder_lock(cfg.output, d.main))
    if lock is not None and lock.recovered:
        say(d, f"note: took over the lock of {cfg.output} from a run that ended without releasing it "
               f"({describe_owner(lock.recovered)})")
    if d.main and settle_replaced(cfg.output):
        say(d, f"note: put back the run in {cfg.output} that an interrupted --overwrite run had set aside")
    check_run_folder(cfg)


def prepare_output(cfg: FinetuneConfig, d: Dist, trainable_bytes: int) -> None:
    """Once every other check has passed (main process, folder locked): room for an epoch's files, then
    the old run set aside with --overwrite (removed once this run saves a checkpoint, put back if it fails
    before: `gift.app.run_folder.set_aside_run`), else what a killed write left behind removed."""
    if not d.main:
        return
    check_free_space(cfg.output, epoch_write_bytes(trainable_bytes, cfg.model_ema))
    if cfg.overwrite:
        set_aside_run(cfg.output)
    else:
        remove_orphans(cfg.output)


def say(d, text: str, err: bool = False) -> None:
    """One line from the main process only."""
    if d.main:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def finetune(cfg: FinetuneConfig, keep_model: bool = False, resume_hint: str = RESUME_HINT) -> dict:
    """Run one fine-tuning job. Returns the summary: ``method``, ``trainable_parameters``, ``top1`` and
    ``top5`` (validation, last epoch), ``step_time_s``, ``history``, ``output`` (the run folder), ``main``
    (this is the process that reports), and the trained ``model`` with ``keep_model``. ``resume_hint``:
    how to continue, in the line a Ctrl-C prints (`gift sweep` continues by re-running itself).

    Raises `UsageError` / `DataError` for bad input, before any training step (and before --overwrite
    sets the old run aside); `gift.app.run_folder.FolderInUse` while another run owns the folder;
    `gift.app.divergence.Diverged` at a non-finite step; `gift.app.run_folder.DiskFull`."""
    cfg.validate()
    with library_errors():
        image_size, mean, std = probe_data_config(cfg.model)
    check_output_folder(cfg.output)
    d = init_distributed(cfg.device)
    with contextlib.ExitStack() as held:
        held.callback(d.close)
        take_run_folder(cfg, d, held)
        if cfg.batch_size % ((cfg.grad_accum_steps or 1) * d.world_size):
            raise UsageError(
                f"--batch-size {cfg.batch_size} (the global batch) is not divisible by "
                + (f"--grad-accum-steps {cfg.grad_accum_steps} x " if cfg.grad_accum_steps else "")
                + f"{d.world_size} processes"
            )
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
            memory, accumulation, reason = choose_finetune_memory(cfg, len(classes), cfg.batch_size // d.world_size,
                                                                  d.device)
            if reason:
                say(d, reason)
            model, gift_model = build_model(cfg, backbone, memory)
        run = None
        try:
            prepare_output(cfg, d, sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad))
            run = start_run(cfg, d, model, gift_model, identity, train_set, val_set, classes, steps_per_epoch)
            run.grad_accum_steps = accumulation
            return train(run, keep_model, resume_hint)
        except BaseException:
            if d.main and (run is None or run.saved_at is None):
                restore_replaced(cfg.output)  # --overwrite: the old run back, as this one saved nothing
            raise


@dataclass
class Run:
    """One fine-tuning run between its steps: the model and what trains it, where it is (``history``,
    this epoch's ``partial`` sums), where a checkpoint taken now continues from (``resume_at``
    (epoch, step) with the RNG state ``resume_rng``) and where the one on disk does (``saved_at``)."""

    cfg: FinetuneConfig
    d: Dist
    model: nn.Module
    gift_model: FastGIFT | None
    train_module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: nn.Module | None
    identity: dict
    run_info: dict
    train_set: Dataset
    val_set: Dataset
    steps_per_epoch: int
    trainable_parameters: int
    curves_missing: str | None
    history: list[dict] = field(default_factory=list)
    partial: dict = field(default_factory=lambda: {"loss_sum": 0.0, "count": 0, "step_time": 0.0})
    start: tuple[int, int] = (0, 0)
    resume_at: tuple[int, int] = (0, 0)
    resume_rng: dict | None = None
    grad_accum_steps: int = 1  # micro-batches of each optimizer step, per process
    saved_at: tuple[int, int] | None = None
    resume_hint: str = RESUME_HINT

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.cfg.output, CHECKPOINT)

    @property
    def trained_parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def local_batch_size(self) -> int:
        return self.cfg.batch_size // self.d.world_size


def start_run(cfg: FinetuneConfig, d: Dist, model, gift_model, backbone_id: dict, train_set, val_set, classes,
              steps_per_epoch: int) -> Run:
    """The `Run` of ``model`` before its first step: on its device (DDP over the processes), AdamW, the
    warm-up-then-cosine schedule, the gradient scaler (float16), the EMA copy (``--model-ema``); the module trained
    through is compiled with ``--compile``."""
    curves_missing = curves_unavailable()
    model.to(d.device)
    params = [p for p in model.parameters() if p.requires_grad]
    train_module = model
    if d.world_size > 1:
        train_module = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None
        )
    if cfg.compile:
        train_module = torch.compile(train_module)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, max(1, round(total * cfg.warmup))))
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.amp == "float16")
    train_data, train_content = data_fingerprint(train_set), data_content_fingerprint(train_set)
    run_info = {"model": cfg.model, "method": cfg.method, "num_classes": len(classes), "classes": list(classes),
                "trainable_parameters": sum(p.numel() for p in params),
                "backbone": backbone_id, "amp": cfg.amp,
                "data": {"data": absolute_data_spec(cfg.data), "train_split": cfg.train_split,
                         "eval_split": cfg.eval_split, "train_data": train_data, **asdict(cfg.embedded)}}
    return Run(cfg, d, model, gift_model, train_module, optimizer, scheduler, scaler, ema,
               run_identity(cfg, len(classes), backbone_id, train_data, train_content), run_info, train_set, val_set,
               steps_per_epoch, run_info["trainable_parameters"], curves_missing)


def resume(run: Run) -> bool:
    """Load the run's checkpoint into it (trainable weights, EMA, optimizer, schedule, loss scale, RNG) and rewrite
    the adapter(s) and metrics from it (a run killed between its checkpoint and those files, or whose
    adapter was lost, is whole again); True when the run had already done all its epochs. Raises
    `UsageError` for a checkpoint of another run, a damaged one or one with non-finite weights."""
    cfg, d = run.cfg, run.d
    state = load_checkpoint(run.checkpoint_path, run.identity)
    unrecorded = state["unrecorded"]
    if unrecorded:
        say(d, f"note: {run.checkpoint_path} was written by an older gift that did not record "
               f"{', '.join(unrecorded)}; those are not checked: resume with the settings the run began with")
    run.history, run.partial = state["history"], state["partial"]
    start_epoch, start_step = run.start = run.saved_at = state["epoch"], state["step_in_epoch"]
    if start_epoch > cfg.epochs or (start_epoch == cfg.epochs and start_step):
        raise UsageError(f"--epochs {cfg.epochs} is fewer than the {start_epoch} epoch(s) the run in "
                         f"{cfg.output!r} has done; pass --epochs {state['epochs']} or more")
    with torch.no_grad():
        for n, p in run.model.named_parameters():
            if p.requires_grad:
                p.copy_(state["trainable"][n])
        if run.ema is not None:
            if state.get("ema") is None:
                raise UsageError(f"--resume --model-ema: the run in {cfg.output!r} was trained without --model-ema")
            for n, p in run.ema.module.named_parameters():
                if n in state["ema"]:
                    p.copy_(state["ema"][n])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    restore_scaler(run.scaler, state)
    set_rng_state(state["rng"])
    with disk_full_as_usage_error(f"the adapter and metrics in {cfg.output}", "its checkpoint is intact: free some "
                                  "space, then run the same command again"):
        save_adapters(run)
        if d.main and run.history:
            write_metrics(cfg.output, run.history, curves=not run.curves_missing)
    if start_epoch == cfg.epochs:
        say(d, f"the run in {cfg.output} is already finished ({cfg.epochs} epochs); "
               f"pass --epochs N > {cfg.epochs} to extend it")
        return True
    if cfg.epochs != state["epochs"]:
        change = "extending" if cfg.epochs > state["epochs"] else "shortening"
        say(d, f"{change} the run from {state['epochs']} to {cfg.epochs} epochs: the learning-rate schedule "
               f"now spans {cfg.epochs} epochs")
    say(d, f"resumed from {run.checkpoint_path} at epoch {start_epoch + 1}, step {start_step}")
    return False


def restore_scaler(scaler: torch.amp.GradScaler, state: dict) -> None:
    """Float16's loss scale and growth counter as the checkpoint ``state`` saved them (a checkpoint of a
    gift before they were saved has none: the scaler starts afresh, as it did then)."""
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def save_run(run: Run, epoch: int, step: int, partial: dict, rng: dict) -> None:
    """The checkpoint (to continue at ``epoch``, ``step`` with RNG state ``rng``) and the adapters, from
    the main process."""
    cfg = run.cfg
    if not run.d.main:
        return
    save_checkpoint(run.checkpoint_path, run.model, run.optimizer, run.scheduler, run.identity, cfg.epochs, epoch,
                    step, run.history, partial, rng, None if run.ema is None else run.ema.module, run.scaler)
    run.saved_at = (epoch, step)
    drop_replaced(cfg.output)  # --overwrite: this run's checkpoint now replaces the old run
    save_adapters(run)


def save_adapters(run: Run) -> None:
    """The adapter (and with --model-ema the EMA's) of the run's weights now, from the main process."""
    cfg = run.cfg
    if not run.d.main:
        return
    if run.gift_model is not None:
        run.gift_model.save_adapter(os.path.join(cfg.output, "adapter"), run=run.run_info)
        if run.ema is not None:
            run.ema.module.save_adapter(os.path.join(cfg.output, "adapter_ema"), run=run.run_info)
    elif cfg.method == "lora":
        save_lora_adapter(run.model, os.path.join(cfg.output, "adapter"), run.run_info)


def train_one_epoch(run: Run, epoch: int, first_step: int = 0) -> None:
    """Steps ``first_step``.. of ``epoch``: each update, its step count and the RNG state a checkpoint
    continues from are one unit that Ctrl-C does not split (`interrupts_held`)."""
    cfg, d, local = run.cfg, run.d, run.local_batch_size
    order = epoch_order(len(run.train_set), cfg.seed, epoch)
    run.model.train()
    bar = tqdm(range(first_step, run.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not d.main or cfg.quiet, leave=False)
    for step in bar:
        batch = order[step * cfg.batch_size : (step + 1) * cfg.batch_size][
            d.process_rank * local : (d.process_rank + 1) * local
        ]
        x, y = batch_of(run.train_set, batch)
        start = time.perf_counter()
        run.optimizer.zero_grad(set_to_none=True)  # no gradients alive in forward, as `gift plan` counts
        loss_sum = accumulate_gradients(run, x.to(d.device), y.to(d.device))
        finite = step_is_finite(torch.tensor(loss_sum), run.trained_parameters, run.scaler,
                                f"epoch {epoch + 1}, step {step + 1}")
        with interrupts_held():  # the update, the step count and the RNG to resume from: all or nothing
            run.scaler.step(run.optimizer)  # float16's scaler skips a step whose gradients are not finite
            run.scaler.update()
            run.scheduler.step()
            if run.ema is not None:
                run.ema.update(run.model)
            run.partial["step_time"] += time.perf_counter() - start
            if finite:
                run.partial["loss_sum"] += loss_sum
                run.partial["count"] += len(y)
            run.resume_at, run.resume_rng = (epoch, step + 1), rng_state()
        bar.set_postfix(loss=f"{loss_sum / len(y):.3f}")


def data_parallel_of(module: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The `DistributedDataParallel` that ``module`` is, or that ``torch.compile`` wrapped into ``module``; else None
    (its ``no_sync()`` is what skips the gradient all-reduce of a micro-batch)."""
    module = getattr(module, "_orig_mod", module)
    return module if isinstance(module, nn.parallel.DistributedDataParallel) else None


def accumulate_gradients(run: Run, x: torch.Tensor, y: torch.Tensor) -> float:
    """Forward and backward of one optimizer step's batch ``(x (B, 3, H, W), y (B,))`` of this process, as
    ``run.grad_accum_steps`` micro-batches (GIFT: inside `FastGIFT.accumulate`, one generator pass for all;
    DDP: ``no_sync()`` but for the last). Each micro-batch's loss is its summed per-sample loss over the B
    samples of the step, so any split gives the gradient of the step's mean loss (DDP averages the processes).
    Returns the step's summed per-sample loss."""
    k = run.grad_accum_steps
    accumulating = run.gift_model.accumulate(k) if run.gift_model is not None and k > 1 else contextlib.nullcontext()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    ddp = data_parallel_of(run.train_module)
    with accumulating:
        for i, (xb, yb) in enumerate(zip(x.tensor_split(k), y.tensor_split(k))):
            with ddp.no_sync() if ddp is not None and i < k - 1 else contextlib.nullcontext():
                with autocast_for(run.d.device, run.cfg.amp):
                    losses = F.cross_entropy(run.train_module(xb).float(), yb, reduction="none")
                loss = losses.sum() / len(y)
                run.scaler.scale(loss).backward()
            total += losses.detach().sum()
    return total.item()


def evaluate(run: Run, epoch: int) -> tuple[dict, dict] | None:
    """Top-1 / top-5 on the eval split after ``epoch`` (and of the EMA model, ``{}`` without one), or None
    in an epoch that ``--eval-every`` skips."""
    cfg, d = run.cfg, run.d
    if not ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
        return None
    batch_size = max(run.local_batch_size, 64)
    scores = accuracy(run.model, run.val_set, batch_size, d, cfg.amp)
    ema_scores = {} if run.ema is None else accuracy(run.ema.module, run.val_set, batch_size, d, cfg.amp)
    return scores, ema_scores


def non_finite_weights(run: Run) -> list[str]:
    """The trained tensors of the run's model (and EMA model) that hold a NaN or an infinity."""
    return non_finite_tensors(run.model) + ([] if run.ema is None else non_finite_tensors(run.ema.module))


def end_epoch(run: Run, epoch: int, evaluated: tuple[dict, dict] | None) -> None:
    """The epoch's line of the history, then the checkpoint and the metrics files: all or nothing."""
    cfg, d = run.cfg, run.d
    loss_sum, count = d.all_reduce([run.partial["loss_sum"], run.partial["count"]])
    nan = {"top1": float("nan"), "top5": float("nan")}
    scores, ema_scores = evaluated if evaluated is not None else (nan, {} if run.ema is None else nan)
    bad = non_finite_weights(run)
    if bad:
        raise Diverged(f"training diverged in epoch {epoch + 1}: {len(bad)} trained tensor(s) are not finite "
                       f"(e.g. {bad[0]})")
    with interrupts_held(), disk_full_as_usage_error(f"epoch {epoch + 1}'s files in {cfg.output}",
                                                     "the files written before are intact: free some space, then "
                                                     f"{run.resume_hint}"):
        run.history.append({"epoch": epoch + 1, "train_loss": loss_sum / count if count else float("nan"),
                            "val_top1": scores["top1"],
                            "val_top5": scores["top5"], "lr": run.scheduler.get_last_lr()[0],
                            "step_time_s": run.partial["step_time"] / run.steps_per_epoch,
                            **{f"val_{k}_ema": ema_scores[k] for k in ("top1", "top5") if k in ema_scores}})
        run.partial = {"loss_sum": 0.0, "count": 0, "step_time": 0.0}
        run.resume_at, run.resume_rng = (epoch + 1, 0), rng_state()
        save_run(run, *run.resume_at, run.partial, run.resume_rng)
        if d.main:
            write_metrics(cfg.output, run.history, curves=not run.curves_missing)


def summary(run: Run, keep_model: bool) -> dict:
    """What `finetune` returns (see there)."""
    history = run.history
    kept = {"model": run.model} if keep_model else {}
    last = history[-1] if history else {}
    return {**kept, "method": run.cfg.method, "trainable_parameters": run.trainable_parameters,
            "top1": last.get("val_top1", float("nan")), "top5": last.get("val_top5", float("nan")),
            "step_time_s": float(np.mean([h["step_time_s"] for h in history])) if history else float("nan"),
            "history": history, "output": run.cfg.output, "main": run.d.main}


def train(run: Run, keep_model: bool = False, resume_hint: str = RESUME_HINT) -> dict:
    """The epochs of ``run`` (from its checkpoint with ``--resume``), each `train_one_epoch`, `evaluate` and
    `end_epoch`; Ctrl-C (or SIGTERM) saves a checkpoint that continues from the last whole step, and says
    ``resume_hint``; a non-finite step stops the run (`Diverged`) with nothing saved. Returns `summary`."""
    with sigterm_as_interrupt():
        return _train(run, keep_model, resume_hint)


def _train(run: Run, keep_model: bool, resume_hint: str) -> dict:
    cfg, d = run.cfg, run.d
    run.resume_hint = resume_hint
    if cfg.resume and resume(run):
        return summary(run, keep_model)
    if run.curves_missing:
        say(d, f"note: {run.curves_missing}")
    if run.identity["backbone"]["pretrained"] == "random":
        say(d, f"warning: {cfg.model} starts from a random initialisation (seed {cfg.seed}; no --pretrained or "
               f"--pretrained-file): fine for tests, not for real fine-tuning", err=True)
    start_epoch, start_step = run.start
    run.resume_at, run.resume_rng = run.start, rng_state()  # where a Ctrl-C checkpoint continues from
    try:
        for epoch in range(start_epoch, cfg.epochs):
            train_one_epoch(run, epoch, start_step if epoch == start_epoch else 0)
            evaluated = evaluate(run, epoch)
            end_epoch(run, epoch, evaluated)
            if not cfg.quiet:
                say(d, f"epoch {epoch + 1}/{cfg.epochs}: train loss {run.history[-1]['train_loss']:.4f}"
                       + (f", {cfg.eval_split} top-1 {evaluated[0]['top1']:.4f}" if evaluated is not None else ""))
            if cfg.stop_after and epoch + 1 - start_epoch >= cfg.stop_after and epoch + 1 < cfg.epochs:
                say(d, f"stopped after {cfg.stop_after} epoch(s) as asked; {resume_hint}")
                break
    except Diverged as e:
        raise diverged_stop(run, f"{e}: stopped before saving it", short=str(e)) from None
    except KeyboardInterrupt as interrupt:
        bad = non_finite_weights(run)
        if bad:  # the last step made a weight non-finite: saving it would replace the last good checkpoint
            raise diverged_stop(run, f"interrupted after training diverged: {len(bad)} trained tensor(s) are not "
                                     f"finite (e.g. {bad[0]}); not saved") from None
        try:
            with interrupts_held(), disk_full_as_usage_error(f"the interrupted run's checkpoint in {cfg.output}",
                                                             "the checkpoint before it is intact"):
                save_run(run, *run.resume_at, run.partial, run.resume_rng)
        except KeyboardInterrupt:
            pass  # another Ctrl-C while saving: the save finished all the same
        word = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
        say(d, f"\n{word}: saved {run.checkpoint_path} (epoch {run.resume_at[0] + 1}, step {run.resume_at[1]}); "
               f"{resume_hint}")
        raise
    return summary(run, keep_model)


def diverged_stop(run: Run, what: str, short: str | None = None) -> Diverged:
    """The `Diverged` that stops ``run``: ``what`` happened, what its folder keeps (`kept_state`; with
    --overwrite and nothing saved, the old run is put back first) and what to do; ``short``: `Diverged.short`."""
    cfg = run.cfg
    restored = run.d.main and run.saved_at is None and restore_replaced(cfg.output)
    if run.saved_at is None:
        todo = f"lower --lr (now {cfg.lr:g}) and run again" + (" with --overwrite" if restored else "")
    else:  # the learning rate is part of the run: the kept checkpoint cannot continue with another
        todo = (f"lower --lr (now {cfg.lr:g}) and start again in another --output (--overwrite would replace the "
                f"kept checkpoint)")
    return Diverged(f"{what}; {kept_state(run, restored)}; {todo}", short=short or what)


def kept_state(run: Run, restored: bool = False) -> str:
    """What the run folder holds of ``run`` (its last checkpoint, `Run.saved_at`), in words; ``restored``:
    the run that --overwrite was replacing is back."""
    if run.saved_at is None:
        back = f"; the run it was to replace is back in {run.cfg.output}" if restored else ""
        return f"nothing of this run was saved in {run.cfg.output} (no epoch had finished){back}"
    epoch, step = run.saved_at
    where = f"after epoch {epoch}" if step == 0 else f"epoch {epoch + 1}, step {step}"
    return f"{run.cfg.output} keeps the last good checkpoint and adapter ({where})"
