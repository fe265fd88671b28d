"""The clustering-based forward explainer (GIFT_SPEC.md section 4), its baselines and how its quality is scored.

For target layer l with cluster assignment C_l (d_out x M, weights only) and adapted output Y_l
(P patch tokens x d_out, prefix tokens dropped): ``maps_l = Y_l C_l`` (P x M), reshaped to the patch
grid, upsampled bilinearly to the image, each map min-max normalised over space; argmax over the
M maps is a hard segmentation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .wrapper import GIFTModelBase, block_index_argument


@dataclass
class ClusterMaps:
    """``maps[layer]``: (B, M, H, W) in [0, 1]; ``segmentation[layer]``: (B, H, W) cluster indices;
    ``grid``: the (h, w) patch grid. Layers are indexed 0..L-1 in backbone order."""

    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    segmentation: dict[int, torch.Tensor] = field(default_factory=dict)
    grid: tuple[int, int] = (0, 0)


def _prefix_tokens(backbone: nn.Module) -> int:
    return int(getattr(backbone, "num_prefix_tokens", 1 if getattr(backbone, "cls_token", None) is not None else 0))


def patch_grid(backbone: nn.Module, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) patch grid for an image of this size (non-square and dynamic sizes too)."""
    pe = getattr(backbone, "patch_embed", None)
    if pe is None:
        raise ValueError(f"{type(backbone).__name__} has no patch_embed: the explainer needs a ViT-style patch grid.")
    if getattr(backbone, "dynamic_img_size", False):
        if hasattr(pe, "dynamic_feat_size"):
            return tuple(pe.dynamic_feat_size(image_hw))
        return image_hw[0] // pe.patch_size[0], image_hw[1] // pe.patch_size[1]
    if tuple(getattr(pe, "img_size", image_hw)) != tuple(image_hw):
        raise ValueError(f"images are {tuple(image_hw)} but the model takes {tuple(pe.img_size)}; resize them, "
                         f"or build the model with dynamic_img_size=True.")
    return tuple(pe.grid_size)


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Normalise each map (last two dims) to [0, 1]; constant maps become 0."""
    flat = maps.flatten(-2)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(maps)


def explain(model: GIFTModelBase, images: torch.Tensor, layers=None, pre_delta: bool = False, key: str | None = None,
            block_index: int = 0, clusters: torch.Tensor | None = None, *, block: int | None = None,
            size: int | tuple[int, int] | str | None = None) -> ClusterMaps:
    """Cluster maps of ``images`` (B, 3, H, W) for the requested target layers, from one forward pass.

    Memory: each requested layer keeps its maps only, (B, M, h, w) at ``size``, made while the forward runs (its
    layer output is dropped right after); ask for the layers and the size you need (``layers=[-1],
    size="grid"`` holds B x M x the patch grid).

    Args:
        model: a `GIFTReference` or `FastGIFT` (not merged).
        layers: indices into the target layers of ``key`` (default: all; negative ones count from the end).
        pre_delta: use the frozen output x W^T + b instead of the adapted one.
        key: target key (default: the first, e.g. ``attn:proj``).
        block_index: which PaCa block of the generator gives the clusters (``block``: its old name).
        clusters: override C (L, d_out, M), e.g. for a baseline.
        size: the maps' (h, w) (an int: square): default the image size (H, W); ``"grid"``: the patch grid,
            not upsampled.
    """
    if not isinstance(model, GIFTModelBase):
        raise TypeError(
            f"explain() needs a model wrapped with GIFT (GIFTReference or FastGIFT), got {type(model).__name__}."
        )
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}.")
    group = model.target_group(key)
    L = len(group)
    layers = list(range(L)) if layers is None else [int(i) for i in layers]
    bad = [i for i in layers if not -L <= i < L]
    if bad:
        raise IndexError(f"layer index {bad[0]} is out of range: {group.key} has layers 0..{L - 1}.")
    layers = list(dict.fromkeys(i % L for i in layers))
    backbone = model.backbone
    grid = patch_grid(backbone, tuple(images.shape[-2:]))
    out_size = _map_size(size, tuple(images.shape[-2:]), grid)
    prefix = _prefix_tokens(backbone)
    result = ClusterMaps(grid=grid)
    with torch.no_grad():
        c = model.cluster_assignments(group.key, block_index_argument(block_index, block)) if clusters is None \
            else clusters
        handles = []

        def capture(index):
            def hook(module, args, output):
                y = F.linear(args[0], module.weight, module.bias) if pre_delta else output
                result.maps[index] = _cluster_maps(y.detach(), c[index], grid, prefix, out_size, group.names[index])
            return hook

        try:
            for i in layers:
                handles.append(group.modules[i].register_forward_hook(capture(i)))
            model(images)
        finally:
            for h in handles:
                h.remove()
    result.maps = {i: result.maps[i] for i in layers}
    result.segmentation = {i: result.maps[i].argmax(1) for i in layers}
    return result


def _map_size(size, image_hw: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) maps are resized to; None: the patch grid (no resize)."""
    if size is None:
        return image_hw
    if size == "grid":
        return None
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return tuple(size)
    raise ValueError(f"size={size!r}: give (h, w), an int, 'grid' (the {grid[0]}x{grid[1]} patch grid) or None "
                     f"(the image size).")


def _cluster_maps(y: torch.Tensor, clusters: torch.Tensor, grid: tuple[int, int], prefix: int,
                  size: tuple[int, int] | None, name: str) -> torch.Tensor:
    """One layer's min-max normalised maps ``(B, M, h, w)`` from its output ``y`` (B, tokens, d_out) and its
    clusters (d_out, M)."""
    if y.dim() != 3:
        raise ValueError(f"target layer {name} output is {tuple(y.shape)}; expected (B, tokens, d_out).")
    patches = y[:, prefix:prefix + grid[0] * grid[1]].float()                   # (B, P, d_out)
    if patches.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"layer {name} has {y.shape[1]} tokens; expected {prefix} prefix + {grid[0] * grid[1]} "
                         f"patches.")
    maps = patches @ clusters.to(patches.dtype)                                   # (B, P, M)
    maps = maps.transpose(1, 2).reshape(maps.shape[0], -1, *grid)                # (B, M, h, w)
    if size is not None and tuple(size) != tuple(grid):
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return min_max(maps)


# ------------------------------------------------------------------------------------------ quality
def cls_attention_maps(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Baseline: the CLS token's attention to the patches in every block of a timm ViT (mean over
    heads), upsampled and min-max normalised: ``(B, L, H, W)``."""
    grid = patch_grid(backbone, tuple(images.shape[-2:]))
    prefix = _prefix_tokens(backbone)
    inputs, handles = [], []
    for blk in backbone.blocks:
        handles.append(blk.attn.register_forward_hook(lambda m, a, o: inputs.append((m, a[0].detach()))))
    try:
        with torch.no_grad():
            backbone(images)
            maps = []
            for attn, x in inputs:
                B, N, C = x.shape
                q, k, _ = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
                q, k = attn.q_norm(q), attn.k_norm(k)
                probs = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)   # (B, h, N, N)
                cls = probs[:, :, 0, prefix:prefix + grid[0] * grid[1]].mean(1)
                maps.append(cls.reshape(B, 1, *grid))
    finally:
        for h in handles:
            h.remove()
    maps = F.interpolate(torch.cat(maps, 1), size=images.shape[-2:], mode="bilinear", align_corners=False)
    return min_max(maps)


THRESHOLDS = (0.3, 0.5, 0.7)


def _iou_table(candidates: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """IoU of every thresholded candidate map with the mask: ``(B, K, len(THRESHOLDS))``."""
    out = []
    m = masks[:, None].bool()
    for thr in THRESHOLDS:
        pred = candidates > thr
        inter = (pred & m).flatten(2).sum(-1).float()
        union = (pred | m).flatten(2).sum(-1).float()
        out.append(inter / union.clamp_min(1))
    return torch.stack(out, -1)


def select_and_score(candidate_fn, train_images, train_masks, train_labels, test_images, test_masks, test_labels,
                     batch_size: int = 256) -> dict:
    """Pick, for each class, the (candidate map, threshold) with the best mean IoU on the training
    images, then report the mean IoU of that choice on the test images (mean over classes).

    ``candidate_fn(images) -> (B, K, H, W)`` maps in [0, 1].
    """
    def tables(images, masks):
        return torch.cat([_iou_table(candidate_fn(images[i:i + batch_size]), masks[i:i + batch_size])
                          for i in range(0, len(images), batch_size)])

    train, test = tables(train_images, train_masks), tables(test_images, test_masks)
    per_class, choices = {}, {}
    for c in sorted(set(train_labels.tolist())):
        mean = train[train_labels == c].mean(0)                                    # (K, T)
        k, t = divmod(int(mean.argmax()), mean.shape[1])
        choices[c] = (k, THRESHOLDS[t])
        if (test_labels == c).any():
            per_class[c] = test[test_labels == c][:, k, t].mean().item()
    return {"miou": sum(per_class.values()) / max(len(per_class), 1), "per_class": per_class, "choices": choices}


def explainer_candidates(model: GIFTModelBase, clusters: torch.Tensor | None = None, pre_delta: bool = False):
    """``images -> (B, L*M, H, W)``: every cluster map of every target layer, as candidates."""
    def fn(images):
        maps = explain(model, images, clusters=clusters, pre_delta=pre_delta).maps
        return torch.cat([maps[i] for i in sorted(maps)], 1)
    return fn


def random_clusters(model: GIFTModelBase, seed: int = 0) -> torch.Tensor:
    """Baseline: cluster assignments from freshly initialised (random) cluster weights Wc, bc."""
    clone = copy.deepcopy(model)
    torch.manual_seed(seed)
    for hypernet in clone.hypernets.values():
        for blk in hypernet.blocks:
            blk.attn.cluster.cluster.reset_parameters()
    return clone.cluster_assignments()
