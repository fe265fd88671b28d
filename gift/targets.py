"""Which layers GIFT adapts: target discovery by module-name suffix (as PEFT matches ``target_modules``),
the classifier head, and swapping one submodule for another (GIFT_SPEC.md, section 1)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch.nn as nn


def target_key(suffix: str) -> str:
    """Checkpoint key of a target suffix: the module path with ':' for '.' (``attn.proj -> attn:proj``)."""
    return suffix.replace(".", ":")


@dataclass(frozen=True)
class TargetGroup:
    """The L frozen linear layers adapted by one generator; each weight is ``(out_features, in_features)``."""

    key: str
    names: tuple[str, ...]
    modules: tuple[nn.Linear, ...]

    @property
    def in_features(self) -> int:
        return self.modules[0].in_features

    @property
    def out_features(self) -> int:
        return self.modules[0].out_features

    def __len__(self) -> int:
        return len(self.modules)


def _close_candidates(suffix: str, module_names: list[str]) -> list[str]:
    suffixes = set()
    for name in module_names:
        parts = name.split(".")
        for k in range(1, min(3, len(parts)) + 1):
            suffixes.add(".".join(parts[-k:]))
    return difflib.get_close_matches(suffix, sorted(suffixes), n=5, cutoff=0.5)


def find_targets(backbone: nn.Module, target_modules: tuple[str, ...]) -> list[TargetGroup]:
    """Match ``target_modules`` against ``backbone``'s module names by suffix, as PEFT does.

    Raises a ``ValueError`` or ``TypeError`` naming the module and the fix when a suffix matches
    nothing, matches a module that is not ``nn.Linear``, or matches layers of different shapes.
    """
    named = [(n, m) for n, m in backbone.named_modules() if n]
    all_names = [n for n, _ in named]
    groups, claimed = [], {}
    for suffix in target_modules:
        matches = [(n, m) for n, m in named if n == suffix or n.endswith("." + suffix)]
        if not matches:
            hint = _close_candidates(suffix, all_names)
            hint_text = f" Close candidates: {', '.join(repr(h) for h in hint)}." if hint else ""
            raise ValueError(
                f"GIFT target {suffix!r} matches no module of {type(backbone).__name__}.{hint_text} "
                f"Set GIFTConfig(target_modules=...) to suffixes of names from backbone.named_modules()."
            )
        for name, module in matches:
            if not isinstance(module, nn.Linear):
                raise TypeError(
                    f"GIFT target {suffix!r} matched {name!r}, a {type(module).__name__}, not an nn.Linear. "
                    f"GIFT adapts linear layers only: pick a longer suffix that names a Linear inside it."
                )
            if name in claimed:
                raise ValueError(
                    f"Module {name!r} is matched by both target {claimed[name]!r} and {suffix!r}; "
                    f"make the target_modules suffixes disjoint."
                )
            claimed[name] = suffix
        first_name, first = matches[0]
        for name, module in matches[1:]:
            if (module.out_features, module.in_features) != (first.out_features, first.in_features):
                raise ValueError(
                    f"GIFT target {suffix!r} shares one generator across its layers, so they need one shape, "
                    f"but {name!r} is {module.out_features}x{module.in_features} (out x in) while {first_name!r} "
                    f"is {first.out_features}x{first.in_features}. Give the differently shaped layers their own, "
                    f"longer target suffix."
                )
        groups.append(TargetGroup(target_key(suffix), tuple(n for n, _ in matches), tuple(m for _, m in matches)))
    return groups


def classifier_name(backbone: nn.Module) -> str | None:
    """Module name of ``backbone.get_classifier()`` (timm API), or None."""
    get_classifier = getattr(backbone, "get_classifier", None)
    if get_classifier is None:
        return None
    head = get_classifier()
    if not isinstance(head, nn.Module):
        return None
    for name, module in backbone.named_modules():
        if module is head and name:
            return name
    return None


def freeze_all_but_classifier(model: nn.Module) -> nn.Module:
    """A linear probe: every parameter of the timm model ``model`` frozen but its classifier's (timm's
    ``get_classifier()``), in place; returns ``model``."""
    model.requires_grad_(False)
    model.get_classifier().requires_grad_(True)
    return model


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` (a dotted path) of ``root``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
