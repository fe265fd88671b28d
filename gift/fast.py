"""`FastGIFT`: the drop-in for `GIFTReference` with the same parameters, checkpoints and numbers.

Where the reference runs the generator once per layer and multiplies by a dense d_out x d_in
residual, FastGIFT
  * runs each generator once for all L layers of its target key (layers are the batch dimension of the
    hyper-Transformer), reading the frozen weights in place, and only when the residuals are not already
    there: they depend on the weights only, so one owner (`gift.residuals.GeneratedResiduals`) keeps them
    while the weights stand, for every entry point and thread, and across the micro-batches of a step;
  * applies each layer's residual in low-rank form, ``y = x W^T + b + (x psi) T_l^T``, through
    one autograd Function with a hand-written backward (``gift_kernels.lowrank_residual_linear``).
"""
from __future__ import annotations

import contextlib
import inspect
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gift_kernels import (
    PacaParams,
    l2_mlp_residual,
    l2_mlp_residual_reference,
    lowrank_residual_linear,
    lowrank_residual_linear_reference,
    paca_attention,
    paca_attention_reference,
    triton_available,
)

from .config import MEMORY_MODES, GIFTConfig
from .generator import Hypernet, PaCa
from .predict import choose_memory_mode, default_memory_budget, plan_model
from .recompute import (
    apply_memory_mode,
    check_memory_mode,
    refuse_hf_reentrant_without_input_grads,
    refuse_reentrant_checkpointing,
    supported_memory_modes,
    undo_memory_mode,
)
from .residuals import GeneratedResiduals, in_functorch_transform
from .targets import TargetGroup, replace_module
from .wrapper import GIFTModelBase


class GIFTLinear(nn.Linear):
    """A target ``nn.Linear`` that adds GIFT's low-rank residual. It holds the *same* weight and bias
    Parameters as the layer it replaces, so parameter names and storage are unchanged.

    At every call it asks ``residuals`` (its model's `gift.residuals.GeneratedResiduals`) for psi (d_in x r')
    and the tokens of its key, and applies ``T[layer]`` (d_out x r'); with none (merged, or inside
    ``disable_adapter()``) it is the plain linear layer.
    """

    gift_adapted = True  # what `GIFTModelBase` looks for to refuse wrapping an adapted backbone again

    def __init__(self, linear: nn.Linear, residuals: GeneratedResiduals, key: str, layer: int,
                 backend: str | None = None):
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
        traced = self.residuals.traced if torch.compiler.is_compiling() else None
        if traced is not None:  # a compiled wrapper's forward made the pairs in its graph
            residual = traced.get(self.key)
        else:
            residual = self.residuals.lookup(self.key, self.layer)
        if residual is None:
            return F.linear(x, self.weight, self.bias)
        psi, tokens = residual
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = self.weight.dtype
        weight, bias = self.weight.to(dtype), (None if self.bias is None else self.bias.to(dtype))
        with torch.autocast(device_type=x.device.type, enabled=False):
            if in_functorch_transform():
                return lowrank_residual_linear_reference(x.to(dtype), weight, bias, psi.to(dtype),
                                                         tokens[self.layer].to(dtype))
            return lowrank_residual_linear(x.to(dtype), weight, bias, psi, tokens[self.layer], backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gift={self.key}[{self.layer}]"


def weight_tokens(phi_weight: torch.Tensor, phi_bias: torch.Tensor | None, weights) -> torch.Tensor:
    """``T0 = W_l phi^T (+ b)``: ``(L, d_out, r)`` from L frozen ``(d_out, d_in)`` weights and phi ``(r, d_in)``,
    each weight cast to phi's dtype while it is multiplied (`WeightTokens` without its backward)."""
    tokens = torch.stack([w.to(phi_weight.dtype) @ phi_weight.t() for w in weights])
    return tokens if phi_bias is None else tokens + phi_bias


class WeightTokens(torch.autograd.Function):
    """The generator's input tokens of all L layers of a key, ``T0 = W_l phi^T (+ b)``: ``(L, d_out, r)`` from
    the frozen ``(d_out, d_in)`` weights and phi ``(r, d_in)``. Each weight is cast to phi's dtype only while it
    is multiplied, in forward and again in backward, so no cast copy is kept for backward (autograd's linear
    keeps each layer's cast input: 4 bytes a weight for a bf16 or NF4 backbone under fp32 GIFT weights)."""

    @staticmethod
    def forward(ctx, phi_weight, phi_bias, *weights):
        ctx.save_for_backward(phi_weight, *weights)
        ctx.has_bias = phi_bias is not None
        return weight_tokens(phi_weight, phi_bias, weights)

    @staticmethod
    def backward(ctx, grad):
        phi_weight, *weights = ctx.saved_tensors
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_weight = sum(g.t() @ w.to(phi_weight.dtype) for g, w in zip(grad, weights))
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.sum((0, 1))
        return (grad_weight, grad_bias, *([None] * len(weights)))


def paca_params(attn: PaCa) -> PacaParams:
    """The parameters of a `PaCa` module in the order the fused op takes them."""
    return PacaParams(attn.cluster.cluster.weight, attn.cluster.cluster.bias, attn.q.weight, attn.q.bias,
                      attn.k.weight, attn.k.bias, attn.v.weight, attn.v.bias, attn.proj.weight, attn.proj.bias)


def run_hypernet(hypernet: Hypernet, tokens: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """`Hypernet.forward` for tokens ``(L, N, r)``, each half of each block as one op with a
    hand-written backward (few saved tensors)."""
    plain = in_functorch_transform()
    for block in hypernet.blocks:
        attn = block.attn
        if plain:
            tokens = paca_attention_reference(tokens, paca_params(attn), attn.num_heads, attn.cluster_activation)
        else:
            tokens = paca_attention(tokens, paca_params(attn), attn.num_heads, attn.cluster_activation,
                                    backend=backend)
        if block.mlp is not None:
            mlp = block.mlp
            mlp_op = l2_mlp_residual_reference if plain else l2_mlp_residual
            tokens = mlp_op(tokens, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    return tokens


def settle_backend_cache() -> None:
    """Fill the kernels' dispatch caches that are set lazily (whether Triton imports), so that a compiled forward
    does not trace their first fill and compile again at the second call."""
    triton_available()


class FastGIFT(GIFTModelBase):
    """GIFT on a frozen ``backbone``: same constructor, attributes and checkpoints as `GIFTReference`.

    Every call of the backbone runs adapted: the wrapper's forward, ``model.backbone(x)``,
    ``forward_features``, ``forward_intermediates``, a Hugging Face ``generate``; ``disable_adapter()`` gives
    the plain backbone. The residuals are generated on demand and reused while the weights stand (one owner,
    ``residuals``: `gift.residuals.GeneratedResiduals`, whose docstring has the rules); ``accumulate(k)``
    runs the generator once for the k micro-batches of an optimizer step.

    Args:
        backbone: a timm ViT (or any ``nn.Module`` with the targets); refused when already wrapped.
        config: the ``GIFTConfig``.
        memory: ``"none"``; ``"mlp"`` recomputes each block's MLP (and its pre-norm) in backward;
            ``"block"`` recomputes whole blocks (timm's ``set_grad_checkpointing()`` where the backbone
            has it, else a `Recomputed` wrapper around each of ``backbone.blocks``) and the generator;
            ``"auto"``: at the first training forward, the fastest of those whose predicted peak
            (`gift.predict`, for that input shape, AdamW and the ``accumulate`` block it runs in) fits
            `gift.predict.FIT_FRACTION` of ``memory_budget`` (see `choose_memory`).
        memory_budget: bytes (or ``"24GiB"``) for ``memory="auto"``; default `gift.predict.default_memory_budget`.
        backbone_dtype: store the frozen backbone weights in this dtype (e.g. ``torch.bfloat16``);
            forward then runs the backbone under autocast in that dtype. The head and the generator
            keep their own dtypes.
        backend: ``"auto" | "torch" | "triton"`` for the fused ops (default: the ``GIFT_BACKEND``
            environment variable, else auto: Triton on CUDA); see `gift_kernels.dispatch`.
        recompute_generator: recompute the generator's forward in its backward instead of keeping its
            activations from the forward (default: with ``memory="block"`` only).

    Merge state: ``merged``; `merge` keeps the unmerged target weights (on the CPU) so that `unmerge`
    restores them bit for bit.
    """

    def __init__(self, backbone: nn.Module, config: GIFTConfig | None = None, memory: str = "none",
                 backbone_dtype: torch.dtype | None = None, backend: str | None = None,
                 memory_budget: int | str | None = None, recompute_generator: bool | None = None):
        super().__init__(backbone, config)
        settle_backend_cache()
        self.backend = backend
        if memory not in MEMORY_MODES + ("auto",):
            raise ValueError(f"memory={memory!r} is unknown; choose one of {MEMORY_MODES + ('auto',)}.")
        self.residuals = GeneratedResiduals(self)
        groups = []
        for group in self.target_groups:
            wrapped = tuple(GIFTLinear(m, self.residuals, group.key, layer, backend)
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
        self.recompute_generator = recompute_generator
        self.memory = "none"
        self._key_hook_handles: list = []
        self.set_memory("none" if memory == "auto" else memory)
        self.memory_budget = memory_budget
        self.memory_reason: str | None = None
        self.memory_pending = memory == "auto"
        self._unmerged_weights: list[torch.Tensor] | None = None  # while merged: each target's W before merge
        self._merged_signature: dict[str, int] | None = None  # while merged: GIFT parameter versions per key
        self._unloaded = False
        self._merge_after_load = False
        self.register_state_dict_post_hook(_unmerged_target_weights)
        self.register_load_state_dict_pre_hook(_unmerge_before_load)
        self.register_load_state_dict_post_hook(_forget_residuals)

    @property
    def merged(self) -> bool:
        return self._merged_signature is not None

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        if "residuals" in self.__dict__:  # a move or cast (to, cuda, half, to_empty) replaces the storages
            self.residuals.reset()
        return result

    # ------------------------------------------------------------------ memory modes
    def set_memory(self, memory: str) -> None:
        """Switch between ``"none"``, ``"mlp"`` and ``"block"`` recomputation (reversible; ends a pending "auto")."""
        check_memory_mode(self.backbone, memory)
        self.memory_pending = False
        undo_memory_mode(self.backbone, self.memory, self._key_hook_handles)
        self.memory, self._key_hook_handles = "none", []
        self._key_hook_handles = apply_memory_mode(self.backbone, memory)
        self.memory = memory

    @property
    def supported_memory_modes(self) -> tuple[str, ...]:
        """The memory modes the backbone can take, fastest first (``"mlp"`` and ``"block"`` need timm's blocks)."""
        return supported_memory_modes(self.backbone)

    @property
    def generator_recomputed(self) -> bool:
        """Whether the generator's forward runs again in its backward (``recompute_generator``, default:
        ``memory == "block"``)."""
        return self.memory == "block" if self.recompute_generator is None else bool(self.recompute_generator)

    def choose_memory(self, input_shape: tuple[int, ...], budget: int | str | None = None,
                      amp: torch.dtype | None = None, accumulation: int = 1) -> str:
        """Switch to the fastest memory mode whose predicted training-step peak fits ``budget`` (default:
        ``memory_budget``, else `gift.predict.default_memory_budget`) for inputs of ``input_shape`` (B, C, H, W)
        under autocast ``amp``, in steps of ``accumulation`` micro-batches of that shape; ``memory_reason``
        says why in one line. Raises `gift.predict.DoesNotFit` (naming the batch size that would fit) when no
        mode does."""
        budget = budget if budget is not None else self.memory_budget
        budget = budget if budget is not None else default_memory_budget(self._backbone_device(), self)
        mode, reason = choose_memory_mode(plan_model(self, tuple(input_shape), budget, amp, accumulation))
        self.set_memory(mode)
        self.memory_reason = reason
        logging.getLogger("gift").info(reason)
        return mode

    # ------------------------------------------------------------------ the generator
    def input_tokens(self, key: str | None = None) -> torch.Tensor:
        """T = W_l phi^T for every layer of ``key``, read from the frozen weights in place: ``(L, d_out, r)``
        (`WeightTokens`: no cast copy of the weights kept for backward)."""
        group = self.target_group(key)
        phi = self.in_projections[group.key]
        weights = [m.weight for m in group.modules]
        if not torch.is_grad_enabled() or in_functorch_transform():  # nothing to save, or a transform differentiates
            # the plain product (dynamo cannot trace the Function's forward without grad; torch.func cannot take it)
            return weight_tokens(phi.weight, phi.bias, weights)
        return WeightTokens.apply(phi.weight, phi.bias, *weights)

    def generator_tokens(self, key: str) -> torch.Tensor:
        """T = Hypernet(W phi^T) for all L layers of ``key`` at once: ``(L, d_out, r)``, generator dtype."""
        device_type = self.in_projections[key].weight.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return run_hypernet(self.hypernets[key], self.input_tokens(key), self.backend)

    def make_psi(self, key: str) -> torch.Tensor:
        """psi ``(d_in, r')``: the out projection's weight, with its bias as one more column (r' = r + 1)."""
        out = self.out_projections[key]
        return out.weight if out.bias is None else torch.cat([out.weight, out.bias[:, None]], dim=1)

    def _fold(self, key: str, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``(..., d_out, r')`` such that dW = tokens psi^T with psi from `make_psi` (bias folded in)."""
        if self.out_projections[key].bias is None:
            return tokens
        return torch.cat([tokens, tokens.new_ones(*tokens.shape[:-1], 1)], dim=-1)

    def make_residuals(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One generator run for ``key``: (psi ``(d_in, r')``, T ``(L, d_out, r')``), with its autograd graph when
        grad is enabled (the forward recomputed in backward when `generator_recomputed`)."""
        if torch.is_grad_enabled() and self.generator_recomputed:
            tokens = checkpoint(self.generator_tokens, key, use_reentrant=False)
        else:
            tokens = self.generator_tokens(key)
        return self.make_psi(key), self._fold(key, tokens)

    def target_weights(self, key: str) -> list[torch.Tensor]:
        """The frozen ``(d_out, d_in)`` weights of the L layers of ``key``."""
        return [m.weight for m in self.target_group(key).modules]

    def generator_residuals(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """A new ``{key: (psi (d_in, r'), T (L, d_out, r'))}``: each generator run once for its L layers
        (what the layers get from ``residuals``; this call bypasses it)."""
        return {g.key: self.make_residuals(g.key) for g in self.target_groups}

    def delta_weight(self, key: str, layer: int) -> torch.Tensor:
        """dW_l = T_l psi^T: ``(d_out, d_in)`` in the target weight's dtype (for inspection and merge)."""
        tokens = self._fold(key, self.generator_tokens(key)[layer])
        group = self.target_group(key)
        return (tokens @ self.make_psi(key).t()).to(group.modules[layer].weight.dtype)

    # ------------------------------------------------------------------ calls
    def forward(self, *args, **kwargs):
        """The backbone's own output for ``self.backbone(*args, **kwargs)`` (a tensor for timm; a Hugging Face
        ``ModelOutput``, with its ``loss`` when ``labels`` are given: ``model(**batch)``) with every target adapted,
        under autocast in ``backbone_dtype`` when the weights are stored in it. The first training forward settles
        ``memory="auto"``. Under ``torch.compile`` the generator runs inside the compiled graph, once per call
        (``model.residuals.traced``): training compiles with ``fullgraph=True`` in every memory
        mode; a merged model, and one inside `accumulate`, take their layers' pairs outside the graph (a graph
        break per layer), as ``memory="auto"`` does until its first training forward has settled it."""
        if self._unloaded and not self.merged:
            raise RuntimeError("unload() handed the backbone over: run it (or wrap a fresh backbone) instead.")
        x = _backbone_input(self.backbone, args, kwargs)
        device_type = (x.device if x is not None else self._backbone_device()).type
        if torch.is_grad_enabled():
            if self.memory_pending and x is not None:
                self._settle_memory(tuple(x.shape), device_type)
            if getattr(self.backbone, "grad_checkpointing", False) is True:
                refuse_reentrant_checkpointing()
            if not torch.compiler.is_compiling():
                refuse_hf_reentrant_without_input_grads(self.backbone)
        pairs = None
        if torch.compiler.is_compiling() and not (self.merged or self.residuals.accumulating):
            pairs = {} if self.residuals.disabled else {g.key: self.make_residuals(g.key) for g in self.target_groups}
        else:
            self.residuals.begin_pass()  # excluded from compiled graphs
        if pairs is None:
            return self._run_backbone(device_type, args, kwargs)
        self.residuals.traced = pairs
        try:
            return self._run_backbone(device_type, args, kwargs)
        finally:
            self.residuals.traced = None

    def _run_backbone(self, device_type: str, args: tuple, kwargs: dict):
        if self.backbone_dtype is not None:
            with torch.autocast(device_type=device_type, dtype=self.backbone_dtype):
                return self.backbone(*args, **kwargs)
        return self.backbone(*args, **kwargs)

    @torch.compiler.disable
    def _settle_memory(self, input_shape: tuple[int, ...], device_type: str) -> None:
        amp = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        accumulation = self.residuals.accumulation
        self.choose_memory(input_shape, amp=amp, accumulation=accumulation.micro_batches if accumulation else 1)

    @contextlib.contextmanager
    def accumulate(self, micro_batches: int):
        """A context around the ``micro_batches`` forwards and backwards of one optimizer step (gradient
        accumulation)::

            with model.accumulate(4):
                for x, y in zip(xs.chunk(4), ys.chunk(4)):
                    (loss_fn(model(x), y) / 4).backward()
            opt.step(); opt.zero_grad()

        The generator runs forward once, at the first micro-batch, and backward once, in the last micro-batch's
        backward, with the sum of all micro-batches' gradients: every gradient equals that of one batch. Each
        micro-batch needs its forward, then its backward; another count, or a step of an optimizer of this
        model's GIFT parameters inside the block, raises ``RuntimeError``; so does ``zero_grad()`` between the
        micro-batches. Under DDP, wrap the backwards of all micro-batches but the last in ``ddp_model.no_sync()``:
        the generator's gradients are reduced once, in the synchronised backward. Without it the generator's
        parameters get no gradient in the earlier backwards, and DDP fails at the next forward with its own
        "Expected to have finished reduction in the prior iteration" error (the block cannot see the DDP wrapper).
        Nothing stays behind after the block (an exception inside it drops its state silently)."""
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"accumulate(micro_batches) takes a positive int, got {micro_batches!r}.")
        if self.merged:
            raise RuntimeError("FastGIFT is merged; call unmerge() before training.")
        self.residuals.begin_accumulation(micro_batches)
        try:
            yield self
        except BaseException:
            self.residuals.end_accumulation(check=False)
            raise
        self.residuals.end_accumulation(check=True)

    @contextlib.contextmanager
    def disable_adapter(self):
        """A context in which every call of the backbone runs it plain (as PEFT's ``disable_adapter()``:
        model-wide, so in every thread). Refused while merged (the weights hold the residuals)."""
        if self.merged:
            raise RuntimeError("FastGIFT is merged: its weights hold W + dW; call unmerge() before disable_adapter().")
        with self.residuals.disabled_adapter():
            yield self

    # ------------------------------------------------------------------ deployment
    def _gift_signature(self) -> dict[str, int]:
        return {key: self.residuals.parameter_versions(key) for key in self.residuals.keys()}

    def check_merged_use(self, key: str) -> None:
        """Raise for a call of a merged layer of ``key`` that would not give this adapter's outputs: a training
        call (the generator would get no gradients) or GIFT weights of ``key`` changed since the merge."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.gift_parameters()):
            raise RuntimeError("FastGIFT is merged; call unmerge() before training (or run under torch.no_grad()).")
        if self.residuals.parameter_versions(key) != self._merged_signature[key]:
            raise RuntimeError("the GIFT weights changed while merged, so the merged weights hold the old residuals; "
                               "call unmerge() and merge() again (load_adapter() and load_gift_state_dict() do it).")

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every dW_l into W_l: afterwards the backbone runs with no GIFT overhead. The unmerged
        weights are kept (on the CPU) for `unmerge`.

        Refuses (and changes nothing) when a merged weight would not be finite, like PEFT's safe_merge.
        """
        if self.merged:
            raise RuntimeError("FastGIFT is already merged; call unmerge() first.")
        if self._unloaded:
            raise RuntimeError("unload() handed the backbone over; wrap a fresh backbone to merge.")
        if self.residuals.accumulating:
            raise RuntimeError("merge() inside FastGIFT.accumulate(); merge after training.")
        merged_weights = []
        for group in self.target_groups:
            psi, folded = self.make_psi(group.key), self._fold(group.key, self.generator_tokens(group.key))
            for layer, module in enumerate(group.modules):
                merged = module.weight + (folded[layer] @ psi.t()).to(module.weight.dtype)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"Merging GIFT into {group.names[layer]!r} gives non-finite weights; not merged.")
                merged_weights.append((module, merged))
        self._unmerged_weights = [module.weight.detach().to("cpu", copy=True) for module, _ in merged_weights]
        for module, merged in merged_weights:
            module.weight.copy_(merged)
        self._merged_signature = self._gift_signature()
        self.residuals.reset()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the target weights `merge()` found, bit for bit."""
        if not self.merged:
            raise RuntimeError("FastGIFT is not merged.")
        if self._unloaded:
            raise RuntimeError("merge_and_unload() handed the merged backbone over (it shares its weights with this "
                               "model); build a new FastGIFT on a fresh backbone instead of unmerging.")
        modules = [m for group in self.target_groups for m in group.modules]
        for module, weight in zip(modules, self._unmerged_weights):
            module.weight.copy_(weight)
        self._unmerged_weights, self._merged_signature = None, None
        self.residuals.reset()

    def load_gift_state_dict(self, obj) -> None:
        """As `GIFTModelBase.load_gift_state_dict`; on a merged model the new weights are merged in their turn
        (unmerge, load, merge), so the merged weights always hold the loaded adapter."""
        state = self.checked_gift_state(obj)
        if not self.merged:
            return self.copy_gift_state(state)
        self.unmerge()
        self.copy_gift_state(state)
        self.merge()

    def merge_and_unload(self, dtype: torch.dtype | None = None) -> nn.Module:
        """Merge, then return the plain backbone (targets back to ``nn.Linear``) for deployment, with every
        floating parameter and buffer in one dtype: ``dtype``, else the target weights' (so a ``backbone_dtype``
        backbone's head, kept in float32 for training, is cast to it: the deployable then takes inputs of that dtype,
        as ``model.half()`` does). A ``dtype`` wider than the stored weights' is applied before merging (the
        residuals are added in it). The backbone shares its weights with this model, which can no longer `unmerge`
        (the kept unmerged weights are dropped)."""
        if self._unloaded:
            raise RuntimeError("merge_and_unload() or unload() already handed the backbone over.")
        stored = self.target_groups[0].modules[0].weight.dtype
        if dtype is not None and torch.promote_types(stored, dtype) != stored:
            self._cast_backbone(torch.promote_types(stored, dtype))
        self.merge()
        self._cast_backbone(dtype or stored)
        return self._hand_over()

    def unload(self) -> nn.Module:
        """Return the plain backbone without merging (PEFT's ``unload()``): the targets back to ``nn.Linear`` with
        their pretrained weights (a merged model is unmerged first), the modules trained whole (the head) as
        trained, the memory mode undone. This model can no longer run."""
        if self._unloaded:
            raise RuntimeError("merge_and_unload() or unload() already handed the backbone over.")
        if self.merged:
            self.unmerge()
        return self._hand_over()

    def _hand_over(self) -> nn.Module:
        self.set_memory("none")
        for group in self.target_groups:
            for name, module in zip(group.names, group.modules):
                replace_module(self.backbone, name, module.unwrap())
        self._unmerged_weights, self._unloaded = None, True
        self.residuals.reset()
        return self.backbone

    @torch.no_grad()
    def _cast_backbone(self, dtype: torch.dtype) -> None:
        """Every floating parameter and buffer of the backbone in ``dtype``, in place (the Parameter objects kept;
        quantized weights, tensor subclasses, left as they are)."""
        for module in self.backbone.modules():
            for name, p in module.named_parameters(recurse=False):
                if type(p) is nn.Parameter and p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
            for name, b in module.named_buffers(recurse=False):
                if type(b) is torch.Tensor and b.is_floating_point() and b.dtype != dtype:
                    module._buffers[name] = b.to(dtype)
        self.residuals.reset()


def _backbone_input(backbone: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The input of ``backbone(*args, **kwargs)``: the first positional argument, else the keyword the backbone
    names its input (a Hugging Face model's ``main_input_name``: ``pixel_values``, ``input_ids``; else its forward's
    first parameter); None when that is not a tensor (``labels`` and other tensors are never taken for it)."""
    if args:
        value = args[0]
    else:
        name = getattr(backbone, "main_input_name", None)
        if not isinstance(name, str):
            name = next(iter(inspect.signature(backbone.forward).parameters), None)
        value = kwargs.get(name)
    return value if isinstance(value, torch.Tensor) else None


def _unmerged_target_weights(model: FastGIFT, state: dict, prefix: str, local_metadata) -> None:
    """`state_dict` post-hook: a merged model's state holds the target weights `merge` found (W, not W + dW), so that
    loading it, into a merged model or an unmerged one, applies the adapter once."""
    if model._unmerged_weights is None or model._unloaded:
        return
    modules = [(name, m) for group in model.target_groups for name, m in zip(group.names, group.modules)]
    for (name, module), weight in zip(modules, model._unmerged_weights):
        key = f"{prefix}backbone.{name}.weight"
        if key in state:
            state[key] = weight.to(module.weight.device)


def _unmerge_before_load(model: FastGIFT, state: dict, prefix: str, *args) -> None:
    """`load_state_dict` pre-hook: a merged model is unmerged, loads the state (which holds unmerged target weights,
    `_unmerged_target_weights`) and is merged again with the loaded adapter (`_forget_residuals`)."""
    if model.merged and not model._unloaded:
        model.unmerge()
        model._merge_after_load = True


def _forget_residuals(model: FastGIFT, incompatible_keys) -> None:
    """`load_state_dict` post-hook: a load with ``assign=True`` puts new parameter objects in place; a model merged
    before the load (`_unmerge_before_load`) is merged again."""
    model.residuals.reset()
    if model._merge_after_load:
        model._merge_after_load = False
        model.merge()
