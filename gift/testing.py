"""Model-level helpers shared by the test suite (tests/) and the bench (bench/): random GIFT weights,
outputs and gradients of one step, a reference/FastGIFT pair with the same weights, and the
exact / baseline / assert sequence that checks a GIFT model against the float64 reference.

Tensor-level comparison (tolerances, per-tensor scales, zero-by-construction keys) lives in
`gift_kernels.testing`; this module adds what needs model knowledge.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from gift_kernels.testing import disagreements

from .config import GIFTConfig
from .dtypes import autocast_for
from .fast import FastGIFT
from .reference import GIFTReference


def randomize_gift_(model: nn.Module, seed: int = 1, scale: float = 0.1, psi_scale: float | None = None) -> nn.Module:
    """Give every GIFT parameter random values N(0, scale^2) (psi, the out projections, which start at
    zero: N(0, psi_scale^2) when given), so that every gradient is non-zero. Returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    psi = {id(p) for p in model.out_projections.parameters()}
    with torch.no_grad():
        for p in model.gift_parameters():
            std = psi_scale if psi_scale is not None and id(p) in psi else scale
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)
    return model


def outputs_and_grads(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
                      autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``{"output": logits, name: grad}`` for every trainable parameter after one forward/backward (a Hugging Face
    output's ``logits``).

    Loss: cross-entropy against ``target`` (class indices) when given, else ``sum(logits * w)`` with fixed
    weights ``w`` in [-1, 1]. ``autocast_dtype`` (float16/bfloat16) runs the forward under autocast.
    Leaves the model's ``.grad`` cleared.
    """
    model.zero_grad(set_to_none=True)
    with autocast_for(x.device, autocast_dtype):
        out = model(x)
    out = getattr(out, "logits", out)  # a Hugging Face model's output
    logits = out.to(torch.promote_types(out.dtype, torch.float32))
    if target is None:
        weights = torch.linspace(-1, 1, out.numel(), dtype=logits.dtype, device=out.device).reshape(out.shape)
        loss = (logits * weights).sum()
    else:
        loss = F.cross_entropy(logits, target)
    loss.backward()
    result = {"output": out.detach()}
    result.update({n: p.grad.detach() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return result


def twin_models(backbone: nn.Module, cfg: GIFTConfig, dtype: torch.dtype = torch.float32,
                **fast_kwargs) -> tuple[GIFTReference, FastGIFT]:
    """A GIFTReference with random GIFT weights and a FastGIFT (``fast_kwargs`` passed on) holding the same weights."""
    ref = GIFTReference(copy.deepcopy(backbone), cfg).to(dtype)
    randomize_gift_(ref, seed=7, scale=0.2)
    fast = FastGIFT(copy.deepcopy(backbone), cfg, **fast_kwargs)
    fast = fast if dtype == torch.float32 else fast.to(dtype)
    fast.load_gift_state_dict(ref.gift_state_dict())
    return ref, fast


# ------------------------------------------------------------------------------------ agreement
# A whole model's gradients pass through many reductions that a fast path associates differently from the
# reference (x psi before T^T instead of a dense W + dW; Wq, Wp folded into the cluster side; torch.compile's
# fusions), so correct fp32 code lands at a few times the reference's own error on cancellation-heavy gradients,
# where one kernel against the same math stays within gift_kernels.testing.BASELINE_FACTOR. In fp32 a 1% error in
# any single gradient still fails (tests/model/test_testing.py shows both). Under fp16/bf16 autocast the baseline is
# the reference under the same autocast, whose own error is percent-level (autocast rounds weights and activations
# at every matmul), so only gross errors are guaranteed to fail: a zeroed or negated gradient (tested). A baseline
# built as `gift_kernels.testing.exact_and_baseline` does (fp32 on inputs rounded to the dtype) is no option here:
# it models 16-bit inputs only, and so fails correct autocast results.
MODEL_BASELINE_FACTOR = 5.0


def _pre_norm(block: nn.Module, name: str) -> nn.Module | None:
    """``block.<name>``; for ``norm2`` under ``memory="mlp"`` (moved inside the recomputed MLP, an
    ``nn.Identity`` left in its place) the moved LayerNorm, ``block.mlp.norm``."""
    norm = getattr(block, name, None)
    if name == "norm2" and isinstance(norm, nn.Identity):
        return getattr(getattr(block, "mlp", None), "norm", norm)
    return norm


# (blocks' path, final norms, each block's pre-norms, LayerScale modules, the outputs added to the residual stream)
_PRE_NORM_BLOCKS = (
    ("blocks", ("norm", "fc_norm"), ("norm1", "norm2"), ("ls1", "ls2"), ("attn.proj", "mlp.fc2")),  # timm ViT
    ("vit.layers", ("vit.layernorm",), ("layernorm_before", "layernorm_after"), (),  # Hugging Face ViT
     ("attention.o_proj", "mlp.fc2")),
)


def shift_invariant_targets(model: nn.Module) -> list[str]:
    """Target keys whose layers add their output to a pre-norm ViT's residual stream unscaled (timm: ``attn.proj``
    and ``mlp.fc2`` with LayerScale off; Hugging Face ViT: ``attention.o_proj`` and ``mlp.fc2``), which the rest of
    the network reads only through LayerNorms over features: adding one value to every output feature of such a
    layer changes nothing downstream."""
    backbone = model.backbone
    for path, final_norms, pre_norms, layer_scales, outputs in _PRE_NORM_BLOCKS:
        blocks = _submodule(backbone, path)
        norms = [_submodule(backbone, n) for n in final_norms]
        if blocks is None or not any(isinstance(n, nn.LayerNorm) for n in norms):
            continue
        if not all(isinstance(_pre_norm(block, n), nn.LayerNorm) for block in blocks for n in pre_norms):
            return []
        if not all(isinstance(getattr(block, n, nn.Identity()), nn.Identity) for block in blocks for n in layer_scales):
            return []
        block_names = {f"{path}.{i}" for i in range(len(blocks))}
        return [
            group.key for group in model.target_groups
            if all(name.rsplit(".", 2)[0] in block_names and name.endswith(outputs) for name in group.names)
        ]
    return []


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def zero_gradient_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the GIFT parameters of ``model`` whose gradient is zero in exact arithmetic, whatever the input:

    - every PaCa block's key bias ``attn.k.bias`` (it adds ``Q_n . b_k`` to all M logits of a softmax over clusters);
    - with ``cluster_activation="softmax"``, every cluster bias ``attn.cluster.cluster.bias`` (``b_c[m]`` is added to
      all N logits of a softmax over tokens);
    - for `shift_invariant_targets`, the parameters that add one vector to every row of dW (the same value to
      every output feature): psi's bias, the last block's last bias (``mlp.fc2.bias``; for ``paca_attn``
      ``attn.proj.bias`` and ``attn.v.bias``, which reaches the output as ``(sum_m A) b_v = b_v``), and with no
      block phi's bias.
    """
    cfg = model.config
    names = []
    for group in model.target_groups:
        blocks = model.hypernets[group.key].blocks
        for i in range(len(blocks)):
            names.append(f"hypernets.{group.key}.blocks.{i}.attn.k.bias")
            if cfg.cluster_activation == "softmax":
                names.append(f"hypernets.{group.key}.blocks.{i}.attn.cluster.cluster.bias")
        if group.key in shift_invariant_targets(model):
            names.append(f"out_projections.{group.key}.bias")
            if len(blocks) == 0:
                names.append(f"in_projections.{group.key}.bias")
            else:
                last = ("mlp.fc2.bias",) if cfg.block == "paca" else ("attn.proj.bias", "attn.v.bias")
                names += [f"hypernets.{group.key}.blocks.{len(blocks) - 1}.{b}" for b in last]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return tuple(n for n in names if n in trainable)


def model_exact_and_baseline(reference: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
                       autocast_dtype: torch.dtype | None = None) -> tuple[dict, dict]:
    """``(exact, baseline)`` outputs and gradients of ``reference`` (a GIFT model): exact = a float64 copy on
    ``x`` in float64; baseline = ``reference`` itself in its dtype (under ``autocast_dtype`` when given)."""
    exact = outputs_and_grads(copy.deepcopy(reference).to(torch.float64), x.double(), target)
    return exact, outputs_and_grads(reference, x, target, autocast_dtype)


def compare_dtype(result: dict, autocast_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype whose tolerance applies: the autocast dtype, else the dtype of the output."""
    return autocast_dtype if autocast_dtype in (torch.float16, torch.bfloat16) else result["output"].dtype


def model_disagreements(got: dict, exact: dict, baseline: dict | None, model: nn.Module,
                        autocast_dtype: torch.dtype | None = None) -> list[str]:
    """`gift_kernels.testing.disagreements` of ``got`` (outputs_and_grads of a GIFT model) with the float64
    ``exact``: ``MODEL_BASELINE_FACTOR`` times the reference's own error as slack, ``zero_gradient_names(model)``
    as the zero list."""
    return disagreements(got, exact, compare_dtype(got, autocast_dtype), baseline,
                         [n for n in zero_gradient_names(model) if n in exact], MODEL_BASELINE_FACTOR)


def assert_model_agrees(got: dict, exact: dict, baseline: dict | None, model: nn.Module,
                        autocast_dtype: torch.dtype | None = None) -> None:
    """Raise ``AssertionError`` listing every tensor `model_disagreements` finds."""
    bad = model_disagreements(got, exact, baseline, model, autocast_dtype)
    if bad:
        raise AssertionError(f"{len(bad)} of {len(exact)} tensors disagree:\n  " + "\n  ".join(bad))
