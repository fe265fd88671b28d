"""`FastGIFT`: the drop-in for `GIFTReference` with the same parameters, checkpoints and numbers.

Where the reference runs the generator once per layer and multiplies by a dense d_out x d_in
residual, FastGIFT
  * runs each generator once per forward for all L layers of its target key (layers are the
    batch dimension of the hyper-Transformer), reading the frozen weights in place;
  * applies each layer's residual in low-rank form, ``y = x W^T + b + (x psi) T_l^T``, through
    one autograd Function with a hand-written backward (``gift_kernels.lowrank_residual_linear``).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from gift_kernels import PacaParams, l2_mlp_residual, lowrank_residual_linear, paca_attention

from .config import MEMORY_MODES, GIFTConfig
from .generator import Hypernet, PaCa
from .memory import module_tensors, storage_bytes
from .predict import choose_memory_mode, plan_model
from .recompute import apply_memory_mode, check_memory_mode, refuse_reentrant_checkpointing, undo_memory_mode
from .targets import TargetGroup, replace_module
from .wrapper import GIFTModelBase


class StepResiduals:
    """This step's generator output, by target key: ``{key: (psi (d_in, r'), T (L, d_out, r'))}``.

    `FastGIFT.forward` fills it for the duration of one forward (``in_forward``); its `GIFTLinear`
    layers read their ``T[layer]`` from it (they hold a reference to this object, never the tensors).
    After a forward with grad enabled it keeps graph-free views of the same storage (``detach()``),
    read only while autograd runs a backward (a checkpointed region recomputed there); anywhere else
    (``model.backbone(x)`` outside the model's forward) `get` returns None. The next forward replaces
    them; `FastGIFT.merge` clears them. A deepcopy or an unpickled copy starts empty, so copies of the
    model carry no step's tensors.
    """

    def __init__(self) -> None:
        self.by_key: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.in_forward = False

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.in_forward or (self.by_key and torch._C._current_graph_task_id() != -1):
            return self.by_key.get(key)
        return None

    def keep_graph_free(self) -> None:
        """Drop the autograd graph, keep the values (same storage) for recomputation in backward."""
        self.by_key = {k: tuple(t.detach().requires_grad_(t.requires_grad) for t in v) for k, v in self.by_key.items()}

    def clear(self) -> None:
        self.by_key = {}

    def __deepcopy__(self, memo) -> "StepResiduals":
        return StepResiduals()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class GIFTLinear(nn.Linear):
    """A target ``nn.Linear`` that adds GIFT's low-rank residual. It holds the *same* weight and bias
    Parameters as the layer it replaces, so parameter names and storage are unchanged.

    It reads this step's psi (d_in x r') and ``T[layer]`` (d_out x r') from ``residuals`` (shared with
    its `FastGIFT`) under ``key``; with none there (outside a forward of the model and its backward's
    recomputation, or merged) it is the plain linear layer.
    """

    def __init__(self, linear: nn.Linear, residuals: StepResiduals, key: str, layer: int, backend: str | None = None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a new weight; this layer takes linear's
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.residuals, self.key, self.layer, self.backend = residuals, key, layer, backend

    def unwrap(self) -> nn.Linear:
        """The plain ``nn.Linear`` holding the same weight and bias Parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.residuals.get(self.key)
        if residual is None:
            return F.linear(x, self.weight, self.bias)
        psi, tokens = residual
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = self.weight.dtype
        weight, bias = self.weight.to(dtype), (None if self.bias is None else self.bias.to(dtype))
        with torch.autocast(device_type=x.device.type, enabled=False):
            return lowrank_residual_linear(x.to(dtype), weight, bias, psi, tokens[self.layer], backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gift={self.key}[{self.layer}]"


def paca_params(attn: PaCa) -> PacaParams:
    """The parameters of a `PaCa` module in the order the fused op takes them."""
    return PacaParams(attn.cluster.cluster.weight, attn.cluster.cluster.bias, attn.q.weight, attn.q.bias,
                      attn.k.weight, attn.k.bias, attn.v.weight, attn.v.bias, attn.proj.weight, attn.proj.bias)


def run_hypernet(hypernet: Hypernet, tokens: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """`Hypernet.forward` for tokens ``(L, N, r)``, each half of each block as one op with a
    hand-written backward (few saved tensors)."""
    for block in hypernet.blocks:
        attn = block.attn
        tokens = paca_attention(tokens, paca_params(attn), attn.num_heads, attn.cluster_activation, backend=backend)
        if block.mlp is not None:
            mlp = block.mlp
            tokens = l2_mlp_residual(tokens, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    return tokens


class FastGIFT(GIFTModelBase):
    """GIFT on a frozen ``backbone``: same constructor, attributes and checkpoints as `GIFTReference`.

    Args:
        backbone: a timm ViT (or any ``nn.Module`` with the targets).
        config: the ``GIFTConfig``.
        memory: ``"none"``; ``"mlp"`` recomputes each block's MLP (and its pre-norm) in backward;
            ``"block"`` recomputes whole blocks (timm's ``set_grad_checkpointing()`` where the backbone
            has it, else a `Recomputed` wrapper around each of ``backbone.blocks``); ``"auto"``: at the
            first training forward, the fastest of those whose predicted peak (`gift.predict`, for that
            input shape and AdamW) fits `gift.predict.FIT_FRACTION` of ``memory_budget`` (see `choose_memory`).
        memory_budget: bytes (or ``"24GiB"``) for ``memory="auto"``; default: on CUDA the device's free
            memory plus what this model already holds there, on CPU no limit.
        backbone_dtype: store the frozen backbone weights in this dtype (e.g. ``torch.bfloat16``);
            forward then runs the backbone under autocast in that dtype. The head and the generator
            keep their own dtypes.
        backend: ``"auto" | "torch" | "triton"`` for the fused ops (default: the ``GIFT_BACKEND``
            environment variable, else auto: Triton on CUDA); see `gift_kernels.dispatch`.

    Per-step state lives in ``step_residuals`` (`StepResiduals`) only; merge state in
    ``merged_tokens`` only (None when not merged).
    """

    def __init__(self, backbone: nn.Module, config: GIFTConfig | None = None, memory: str = "none",
                 backbone_dtype: torch.dtype | None = None, backend: str | None = None,
                 memory_budget: int | str | None = None):
        super().__init__(backbone, config)
        self.backend = backend
        if memory not in MEMORY_MODES + ("auto",):
            raise ValueError(f"memory={memory!r} is unknown; choose one of {MEMORY_MODES + ('auto',)}.")
        self.step_residuals = StepResiduals()
        groups = []
        for group in self.target_groups:
            wrapped = tuple(GIFTLinear(m, self.step_residuals, group.key, layer, backend)
                            for layer, m in enumerate(group.modules))
            for name, module in zip(group.names, wrapped):
                replace_module(self.backbone, name, module)
            groups.append(TargetGroup(group.key, group.names, wrapped))
        self.target_groups = groups
        self.backbone_dtype = backbone_dtype
        if backbone_dtype is not None:
            head = set(map(id, self.head_parameters()))
            for p in self.backbone.parameters():
                if id(p) not in head and p.is_floating_point():
                    p.data = p.data.to(backbone_dtype)
        self.memory = "none"
        self._key_hook_handles: list = []
        self.set_memory("none" if memory == "auto" else memory)
        self.memory_budget = memory_budget
        self.memory_reason: str | None = None
        self.memory_pending = memory == "auto"
        self.merged_tokens: dict[str, torch.Tensor] | None = None

    @property
    def merged(self) -> bool:
        return self.merged_tokens is not None

    # ------------------------------------------------------------------ memory modes
    def set_memory(self, memory: str) -> None:
        """Switch between ``"none"``, ``"mlp"`` and ``"block"`` recomputation (reversible; ends a pending "auto")."""
        check_memory_mode(self.backbone, memory)
        self.memory_pending = False
        undo_memory_mode(self.backbone, self.memory, self._key_hook_handles)
        self.memory, self._key_hook_handles = "none", []
        self._key_hook_handles = apply_memory_mode(self.backbone, memory)
        self.memory = memory

    def _default_memory_budget(self) -> int | None:
        device = self._backbone_device()
        if device.type != "cuda":
            return None
        return torch.cuda.mem_get_info(device)[0] + storage_bytes(t for t in module_tensors(self) if t.device == device)

    def choose_memory(self, input_shape: tuple[int, ...], budget: int | str | None = None,
                      amp: torch.dtype | None = None) -> str:
        """Switch to the fastest memory mode whose predicted training-step peak fits ``budget`` (default:
        ``memory_budget``, else see the class doc) for inputs of ``input_shape`` (B, C, H, W) under
        autocast ``amp``; ``memory_reason`` says why in one line. Raises `gift.predict.DoesNotFit` (naming
        the batch size that would fit) when no mode does."""
        budget = budget if budget is not None else self.memory_budget
        budget = budget if budget is not None else self._default_memory_budget()
        mode, reason = choose_memory_mode(plan_model(self, tuple(input_shape), budget, amp))
        self.set_memory(mode)
        self.memory_reason = reason
        logging.getLogger("gift").info(reason)
        return mode

    # ------------------------------------------------------------------ the generator
    def generator_tokens(self, key: str) -> torch.Tensor:
        """T = Hypernet(W phi^T) for all L layers of ``key`` at once: ``(L, d_out, r)``, generator dtype."""
        device_type = self.in_projections[key].weight.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return run_hypernet(self.hypernets[key], self.input_tokens(key), self.backend)

    def _out_projection(self, key: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """psi (d_in x r') and tokens (..., d_out, r') such that dW = tokens psi^T (bias folded in)."""
        out = self.out_projections[key]
        if out.bias is None:
            return out.weight, tokens
        ones = tokens.new_ones(*tokens.shape[:-1], 1)
        return torch.cat([out.weight, out.bias[:, None]], dim=1), torch.cat([tokens, ones], dim=-1)

    def generator_residuals(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One step's ``{key: (psi (d_in, r'), T (L, d_out, r'))}``: each generator run once for its L layers."""
        return {g.key: self._out_projection(g.key, self.generator_tokens(g.key)) for g in self.target_groups}

    def delta_weight(self, key: str, layer: int) -> torch.Tensor:
        """dW_l = T_l psi^T: ``(d_out, d_in)`` in the target weight's dtype (for inspection and merge)."""
        psi, tokens = self._out_projection(key, self.generator_tokens(key)[layer])
        group = self.target_group(key)
        return (tokens @ psi.t()).to(group.modules[layer].weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's output with every target adapted. With grad enabled, the residuals stay (graph-free)
        in ``step_residuals`` for recomputation in this step's backward; a no-grad forward in between
        (an evaluation) leaves them as they were."""
        if self.memory_pending and torch.is_grad_enabled():
            amp = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
            self.choose_memory(x.shape, amp=amp)
        if (
            self.merged_tokens is not None
            and torch.is_grad_enabled()
            and any(p.requires_grad for p in self.gift_parameters())
        ):
            raise RuntimeError("FastGIFT is merged; call unmerge() before training (or run under torch.no_grad()).")
        if torch.is_grad_enabled() and getattr(self.backbone, "grad_checkpointing", False) is True:
            refuse_reentrant_checkpointing()
        kept = self.step_residuals.by_key
        self.step_residuals.by_key = {} if self.merged_tokens is not None else self.generator_residuals()
        self.step_residuals.in_forward = True
        try:
            if self.backbone_dtype is not None:
                with torch.autocast(device_type=x.device.type, dtype=self.backbone_dtype):
                    return self.backbone(x)
            return self.backbone(x)
        finally:
            self.step_residuals.in_forward = False
            if torch.is_grad_enabled():
                self.step_residuals.keep_graph_free()
            else:
                self.step_residuals.by_key = kept

    # ------------------------------------------------------------------ deployment
    @torch.no_grad()
    def merge(self) -> None:
        """Fold every dW_l into W_l: afterwards the backbone runs with no GIFT overhead.

        Refuses (and changes nothing) when a merged weight would not be finite, like PEFT's safe_merge.
        """
        if self.merged_tokens is not None:
            raise RuntimeError("FastGIFT is already merged; call unmerge() first.")
        self.step_residuals.clear()  # the merged weights carry them; kept ones would be applied twice
        merged_weights, tokens_by_key = [], {}
        for group in self.target_groups:
            tokens_by_key[group.key] = tokens = self.generator_tokens(group.key)
            psi, folded = self._out_projection(group.key, tokens)
            for layer, module in enumerate(group.modules):
                merged = module.weight + (folded[layer] @ psi.t()).to(module.weight.dtype)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"Merging GIFT into {group.names[layer]!r} gives non-finite weights; not merged.")
                merged_weights.append((module, merged))
        for module, merged in merged_weights:
            module.weight.copy_(merged)
        self.merged_tokens = tokens_by_key

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the residuals folded in by `merge()` (the same dW, from the tokens kept at merge)."""
        if self.merged_tokens is None:
            raise RuntimeError("FastGIFT is not merged.")
        for group in self.target_groups:
            psi, folded = self._out_projection(group.key, self.merged_tokens[group.key])
            for layer, module in enumerate(group.modules):
                module.weight.sub_((folded[layer] @ psi.t()).to(module.weight.dtype))
        self.merged_tokens = None

    def merge_and_unload(self) -> nn.Module:
        """Merge, then return the plain backbone (targets back to ``nn.Linear``) for deployment."""
        self.merge()
        self.set_memory("none")
        for group in self.target_groups:
            for name, module in zip(group.names, group.modules):
                replace_module(self.backbone, name, module.unwrap())
        return self.backbone
