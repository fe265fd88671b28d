"""Which layers GIFT adapts: target discovery by module-name suffix (as PEFT matches ``target_modules``), with
``*`` standing for one module name so that a pattern can pick one stage of a hierarchical model
(``layers.0.blocks.*.attn.proj``); the modules trained and saved whole (the classifier head, PEFT's
``modules_to_save``); and swapping one submodule for another (GIFT_SPEC.md, section 1)."""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

import torch.nn as nn


def target_key(suffix: str) -> str:
    """Checkpoint key of a target suffix: the module path with ':' for '.' (``attn.proj -> attn:proj``,
    ``layers.0.blocks.*.attn.proj -> layers:0:blocks:*:attn:proj``)."""
    return suffix.replace(".", ":")


def matches_suffix(name: str, suffix: str) -> bool:
    """Whether the module path ``name`` ends with ``suffix``, whole names only, as PEFT matches ``target_modules``;
    a ``*`` in the suffix stands for any one module name (``blocks.*.attn.proj`` matches ``blocks.3.attn.proj``)."""
    parts, wanted = name.split("."), suffix.split(".")
    if len(wanted) > len(parts):
        return False
    return all(fnmatch.fnmatchcase(part, want) for part, want in zip(parts[len(parts) - len(wanted):], wanted))


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
        matches = [(n, m) for n, m in named if matches_suffix(n, suffix)]
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
                    f"is {first.out_features}x{first.in_features}. {_split_hint(suffix, matches)}"
                )
        groups.append(TargetGroup(target_key(suffix), tuple(n for n, _ in matches), tuple(m for _, m in matches)))
    return groups


def _split_hint(suffix: str, matches: list[tuple[str, nn.Linear]]) -> str:
    """How to give each shape its own generator: one pattern per shape (``*`` where the names of a shape differ),
    when those patterns match exactly the layers of their shape; else the general advice."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, module in matches:
        by_shape.setdefault((module.out_features, module.in_features), []).append(name)
    patterns = []
    for names in by_shape.values():
        split = [n.split(".") for n in names]
        if len({len(parts) for parts in split}) != 1:
            patterns = []
            break
        patterns.append(".".join(p[0] if len(set(p)) == 1 else "*" for p in zip(*split)))
    chosen = [[n for n, _ in matches if matches_suffix(n, p)] for p in patterns]
    if patterns and all(sorted(c) == sorted(names) for c, names in zip(chosen, by_shape.values())):
        listed = ", ".join(repr(p) for p in patterns)
        return (f"Give each shape its own generator, one pattern each ('*' stands for one module name): "
                f"GIFTConfig(target_modules=({listed},)).")
    return ("Give the differently shaped layers their own, longer target suffix ('*' stands for one module name, "
            "e.g. 'layers.0.blocks.*.attn.proj').")


#: children that hold the classifier of a Hugging Face model (``...ForImageClassification.classifier``,
#: ``...ForSequenceClassification.score``)
HF_CLASSIFIERS = ("classifier", "score")


def classifier_name(backbone: nn.Module) -> str | None:
    """Module name of the classifier head: ``backbone.get_classifier()`` (timm API), else a child named
    `HF_CLASSIFIERS` that has parameters (Hugging Face ``classifier`` / ``score``), else None. A language model's
    ``lm_head`` is no classifier: name it in ``GIFTConfig(modules_to_save=...)`` to train it."""
    get_classifier = getattr(backbone, "get_classifier", None)
    if get_classifier is not None:
        head = get_classifier()
        if not isinstance(head, nn.Module):
            return None
        for name, module in backbone.named_modules():
            if module is head and name:
                return name
        return None
    children = dict(backbone.named_children())
    for name in HF_CLASSIFIERS:
        child = children.get(name)
        if isinstance(child, nn.Module) and any(True for _ in child.parameters()):
            return name
    return None


def saved_modules(backbone: nn.Module, modules_to_save: tuple[str, ...] | None,
                  targets: list[TargetGroup] = ()) -> tuple[str, ...]:
    """Names of the modules of ``backbone`` that train whole and are saved with the adapter (PEFT's
    ``modules_to_save``): for None, the classifier head (`classifier_name`), if any; else the modules whose names end
    with one of the suffixes (whole names, ``*`` as in `matches_suffix`), the outermost only. Raises ``ValueError``
    naming the fix for a suffix that matches nothing or a module that holds a GIFT target."""
    if modules_to_save is None:
        head = classifier_name(backbone)
        return () if head is None else (head,)
    named = [(n, m) for n, m in backbone.named_modules() if n]
    found: list[str] = []
    for suffix in modules_to_save:
        matches = [n for n, _ in named if matches_suffix(n, suffix)]
        if not matches:
            hint = _close_candidates(suffix, [n for n, _ in named])
            hint_text = f" Close candidates: {', '.join(repr(h) for h in hint)}." if hint else ""
            raise ValueError(f"GIFTConfig.modules_to_save entry {suffix!r} matches no module of "
                             f"{type(backbone).__name__}.{hint_text}")
        found += [n for n in matches if n not in found]
    outermost = tuple(n for n in found if not any(n.startswith(other + ".") for other in found))
    for group in targets:
        for target in group.names:
            holder = next((n for n in outermost if target == n or target.startswith(n + ".")), None)
            if holder is not None:
                raise ValueError(f"GIFTConfig.modules_to_save entry {holder!r} holds the GIFT target {target!r}; a "
                                 f"module trained whole cannot also be adapted: pick modules outside the targets.")
    return outermost


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
