"""The run configuration that `gift finetune`, `gift sweep`, `gift plan` and the demo share:
`FinetuneConfig` (every setting of one run, with its flag, default, help and range), the extras a
run needs, what it trains in the library's terms (`training_setup`), and its ``--memory auto``
policy (`choose_finetune_memory`)."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import torch

from ..backbones import create_backbone, data_config
from ..config import BLOCK_TYPES, CLUSTER_ACTIVATIONS, MEMORY_MODES, METHODS, GIFTConfig
from ..dtypes import AUTOCAST_DTYPES, BACKBONE_DTYPES, dtype_name, expand_alias
from ..plan import DoesNotFit, TrainingSetup, choose_memory_mode, default_memory_budget, parse_bytes, plan_fitting
from .data import EVAL_SPLITS, TASKS, TRAIN_SPLITS, EmbeddedSpec
from .errors import UsageError, missing_extra
from .options import check_ranges, option

DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def check_extras(options) -> None:
    """`UsageError` naming the extra to install when ``options.method`` / ``options.backbone_dtype`` (of a
    `FinetuneConfig` or `gift plan`'s options) need a package that is not installed."""
    for needed, module, extra, feature in ((options.method == "lora", "peft", "lora", "--method lora"),
                                           (options.backbone_dtype == "nf4", "torchao", "nf4", "--backbone-dtype nf4")):
        problem = missing_extra(module, extra, feature) if needed else None
        if problem:
            raise UsageError(problem)


#: the largest --batch-size: torch counts elements in 64 bits, so a batch of activations must fit
LARGEST_BATCH = 2 ** 31 - 1
#: the largest --lr (times --weight-decay when above 1): AdamW scales float32 weights by it, up to 3.4e38
LARGEST_LR_STEP = 1e30


@dataclass
class FinetuneConfig:
    """Every setting of one fine-tuning run: default, help text and allowed range, in one place.
    GIFT's own settings default to `GIFTConfig`'s. ``--rank`` (the old flag) sets ``gift_rank`` and
    ``lora_rank``; ``--amp`` and timm's ``--amp-dtype`` are one flag."""

    SHARED_FLAGS = {"rank": ("gift_rank", "lora_rank")}

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
    method: str = option("gift", "what is trained: GIFT, PEFT LoRA, a linear probe or everything", choices=METHODS)
    gift_rank: int = option(GIFTConfig.rank, "GIFT's rank r (--method gift)", min=1)
    lora_rank: int = option(GIFTConfig.rank, "LoRA's rank (--method lora)", min=1)
    block: str = option(GIFTConfig.block, "GIFT generator block", choices=BLOCK_TYPES)
    num_clusters: int = option(GIFTConfig.num_clusters, "GIFT clusters M of PaCa", min=1)
    cluster_activation: str = option(GIFTConfig.cluster_activation, "GIFT cluster assignment of PaCa",
                                     choices=CLUSTER_ACTIVATIONS)
    amp: str | None = option(None, "autocast dtype, timm's flag (float16 needs CUDA; bf16 and fp16 are read as "
                                   "bfloat16 and float16)", choices=AUTOCAST_DTYPES, type=dtype_name,
                             also_flags=("--amp-dtype",))
    memory: str = option(
        "none",
        "recompute in backward to save activation memory; auto: the fastest mode whose "
        "predicted peak fits 0.9 x --max-memory (see gift plan), with the fewest --grad-accum-steps that fit "
        "when not given",
        choices=MEMORY_MODES + ("auto",),
    )
    grad_accum_steps: int | None = option(None, "micro-batches per optimizer step (gradient accumulation): each "
                                                "process runs K of --batch-size / (K x processes) images; default 1, "
                                                "or with --memory auto the fewest that fit", min=1, type=int)
    model_ema: bool = option(False, "keep timm's ModelEmaV3 of the trained weights and evaluate it alongside "
                                    "(val_top1_ema; its adapter in OUTPUT/adapter_ema)")
    model_ema_decay: float = option(0.9998, "decay of --model-ema per step", min=0, max=1, max_open=True)
    max_memory: str | None = option(None, "memory budget of --memory auto, e.g. 24GiB (default: the GPU's free "
                                          "memory, as gift plan's; on CPU no limit)", type=str)
    backbone_dtype: str | None = option(None, "storage of the frozen backbone weights (GIFT; nf4: 4-bit linear "
                                              "weights, pip install 'gift[nf4]')",
                                        choices=BACKBONE_DTYPES, type=expand_alias)
    compile: bool = option(False, "torch.compile the training forward (timm's --torchcompile); the first step "
                                  "compiles", also_flags=("--torchcompile",))
    seed: int = option(0, "seed of the initialisation, the order of the samples and drop-path", min=0)
    epochs: int = option(10, "epochs (with --resume: a larger number extends a finished run)", min=1)
    batch_size: int = option(64, "the global batch of an optimizer step (split over torchrun processes and "
                                 "--grad-accum-steps micro-batches)", min=1, max=LARGEST_BATCH)
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

    def __post_init__(self) -> None:
        # the short dtype names (bf16, fp16) read as torch's, however the config was made; others are validate's
        self.amp = expand_alias(self.amp) if isinstance(self.amp, str) else self.amp
        self.backbone_dtype = expand_alias(self.backbone_dtype) if isinstance(self.backbone_dtype, str) \
            else self.backbone_dtype

    def validate(self) -> None:
        """Every flag in its range and the flags consistent with each other and with this machine;
        raises `UsageError` naming the flag. Nothing is built or read."""
        check_ranges(self)
        if self.pretrained and self.pretrained_file:
            raise UsageError("give either --pretrained (timm's hub) or --pretrained-file (local), not both")
        if self.pretrained_file and not os.path.isfile(self.pretrained_file):
            raise UsageError(f"--pretrained-file {self.pretrained_file!r} does not exist (or is not a file)")
        if self.lr * max(1.0, self.weight_decay) > LARGEST_LR_STEP:
            raise UsageError(f"--lr {self.lr:g}" + (f" x --weight-decay {self.weight_decay:g}" if self.weight_decay > 1
                                                     else "") + f" is beyond {LARGEST_LR_STEP:g}, where AdamW's "
                             f"float32 update overflows; learning rates of fine-tuning are about 1e-5..1e-2")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the run in --output and --overwrite replaces it: give one")
        if self.device is not None and not DEVICE_PATTERN.fullmatch(self.device):
            raise UsageError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.device_type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {self.device}: torch sees no CUDA GPU here; use --device cpu")
        if self.amp == "float16" and self.device_type != "cuda":
            raise UsageError("--amp fp16 needs a CUDA device (so does --amp float16: gradient scaling); on CPU use "
                             "--amp bfloat16 or no --amp")
        check_extras(self)
        if self.grad_accum_steps is not None and self.batch_size % self.grad_accum_steps:
            raise UsageError(f"--batch-size {self.batch_size} (the global batch of a step) does not split into "
                             f"--grad-accum-steps {self.grad_accum_steps} equal micro-batches")
        if self.backbone_dtype == "nf4":
            if self.model_ema:
                raise UsageError("--model-ema averages every weight (timm's ModelEmaV3), which NF4 weights do not "
                                 "support: drop --model-ema or use --backbone-dtype bfloat16")

    @property
    def method_rank(self) -> int:
        """The rank of the method trained: ``lora_rank`` for LoRA, else ``gift_rank`` (what ``--rank`` meant;
        run and sweep identities keep it under their old key ``"rank"``)."""
        return self.lora_rank if self.method == "lora" else self.gift_rank

    @property
    def device_type(self) -> str:
        if self.device is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device.split(":")[0]

    @property
    def embedded(self) -> EmbeddedSpec:
        return EmbeddedSpec(self.task, self.train_size, self.val_size, self.data_seed)


def training_setup(options, img_size: int | None = None, num_classes: int | None = None):
    """The `gift.plan.TrainingSetup` of a `FinetuneConfig` (or `gift plan`'s options): what finetune would train."""
    gift = GIFTConfig(rank=options.gift_rank, block=options.block, num_clusters=options.num_clusters,
                      cluster_activation=options.cluster_activation)
    return TrainingSetup(model=options.model, batch_size=options.batch_size, img_size=img_size,
                         num_classes=num_classes, method=options.method,
                         backbone_dtype=options.backbone_dtype or "float32", amp=options.amp, gift=gift,
                         lora_rank=options.lora_rank, drop_path=options.drop_path, model_ema=options.model_ema,
                         grad_accum_steps=options.grad_accum_steps or 1)


def choose_finetune_memory(
    cfg: FinetuneConfig, num_classes: int, local_batch_size: int, device
) -> tuple[str, int, str | None]:
    """The memory mode and the micro-batches per optimizer step `gift finetune` trains with and, for
    ``--memory auto``, the one line saying why: the fastest mode whose predicted peak fits `gift.plan.FIT_FRACTION`
    of ``--max-memory`` (default `gift.plan.default_memory_budget`), at ``--grad-accum-steps`` when given, else at
    the fewest accumulation steps at which one fits (`gift.plan.plan_fitting`). Raises `UsageError` naming the
    batch size that would fit when nothing does."""
    accumulation = cfg.grad_accum_steps or 1
    if cfg.memory != "auto":
        return cfg.memory, accumulation, None
    if cfg.method != "gift":
        return (
            "none", accumulation,
            f"--memory auto: --method {cfg.method} has one memory mode (recomputation is GIFT's): memory=none",
        )
    budget = memory_size(cfg.max_memory, "--max-memory") if cfg.max_memory is not None \
        else default_memory_budget(device)
    setup = dataclasses.replace(training_setup(cfg, num_classes=num_classes), batch_size=local_batch_size,
                                grad_accum_steps=1)
    if budget is None:
        return "none", accumulation, "--memory auto: memory=none: no memory budget (no --max-memory, not on CUDA), " \
                                     "so the fastest mode"
    try:
        plan = plan_fitting(setup, budget, (cfg.grad_accum_steps,) if cfg.grad_accum_steps else None)
        mode, reason = choose_memory_mode(plan)
    except DoesNotFit as e:
        raise UsageError(f"--memory auto: {e}") from None
    return mode, plan.accumulation, f"--memory auto: {reason}"


#: the smallest memory size `memory_size` takes: less is a unit left out ("24" for 24GiB), not a device
MIN_DEVICE_MEMORY = 1 << 20


def memory_size(text: str, flag: str) -> int:
    """``text`` (``24GiB``, ``80GB``, bytes) as bytes; `UsageError` naming ``flag`` for text that does not
    parse or a size under 1 MiB."""
    try:
        size = parse_bytes(text)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None
    if size < MIN_DEVICE_MEMORY:
        raise UsageError(f"{flag} {text!r} is {size} bytes, too little for a device: give the size with its unit, "
                         f"e.g. 24GiB or 80GB")
    return size


def probe_data_config(name: str) -> tuple[int, tuple, tuple]:
    """(image size, mean, std) the model expects (timm's data config of a parameter-free, meta device instance)."""
    with torch.device("meta"):
        config = data_config(create_backbone(name, 1))
    return config.input_size[-1], config.mean, config.std
