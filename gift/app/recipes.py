"""Recipes: YAML files shipped in ``gift/recipes/`` with the paper's settings (each number's source is a
comment in the file). ``--recipe NAME`` (or a path to such a file) sets them as defaults; any flag given
after it overrides them. ``gift recipes`` (`gift.app.commands.recipes`) lists them.

A recipe holds ``description`` (one line), ``finetune`` (settings named as `gift finetune`'s flags, e.g.
``batch_size`` for ``--batch-size``) and ``sweep`` (the search grid and the splits of `gift sweep`).
"""
from __future__ import annotations

import argparse
import difflib
import os

from .errors import UsageError

SECTIONS = ("description", "finetune", "sweep")
SWEEP_KEYS = ("lr", "weight_decay", "search_epochs", "search_train_split", "search_eval_split",
              "final_train_split", "final_eval_split")


class RecipeError(UsageError):
    """An unknown or malformed recipe: the message says which and what to do."""


def recipe_dir() -> str:
    """The folder of the shipped recipes (package data of ``gift``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


def recipe_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(recipe_dir()) if f.endswith(".yaml"))


def recipe_path(name: str) -> str:
    """The file of recipe ``name``: a shipped name (``fgvc``) or a path to a YAML file."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        if not os.path.isfile(name):
            raise RecipeError(f"recipe file {name!r} does not exist")
        return name
    path = os.path.join(recipe_dir(), name + ".yaml")
    if not os.path.isfile(path):
        close = difflib.get_close_matches(name, recipe_names(), n=3, cutoff=0.5)
        raise RecipeError(f"unknown recipe {name!r}; " + (f"did you mean {', '.join(close)}? " if close else "")
                          + f"`gift recipes` lists them: {', '.join(recipe_names())}")
    return path


def recipe_text(name: str) -> str:
    with open(recipe_path(name), encoding="utf-8") as f:
        return f.read()


def load_recipe(name: str) -> dict:
    """``{"description": str, "finetune": {...}, "sweep": {...}}`` of recipe ``name``, checked for shape."""
    import yaml

    path = recipe_path(name)
    try:
        recipe = yaml.safe_load(recipe_text(name))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise RecipeError(
            f"{path}:{mark.line + 1 if mark else 1}: not valid YAML ({getattr(e, 'problem', e)})"
        ) from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("finetune"), dict):
        raise RecipeError(f"{path}: a recipe is a mapping with a 'finetune' section (see `gift recipes show fgvc`)")
    unknown = sorted(set(recipe) - set(SECTIONS)) + sorted(set(recipe.get("sweep") or {}) - set(SWEEP_KEYS))
    if unknown:
        raise RecipeError(f"{path}: unknown recipe key(s) {unknown}; sections are {list(SECTIONS)}, "
                          f"sweep keys {list(SWEEP_KEYS)}")
    recipe.setdefault("sweep", {})
    recipe.setdefault("description", "")
    return recipe


def list_recipes() -> list[tuple[str, str]]:
    """[(name, one-line description)] of the shipped recipes."""
    return [(name, load_recipe(name)["description"]) for name in recipe_names()]


def recipe_defaults(name: str, dests, sweep: bool = False) -> dict:
    """The settings recipe ``name`` gives to a parser with destinations ``dests``: its ``finetune`` section,
    plus (``sweep=True``) its ``sweep`` section, whose ``lr``/``weight_decay`` grids replace the single values.
    A setting the parser does not have is refused naming it."""
    recipe = load_recipe(name)
    values = dict(recipe["finetune"])
    if sweep:  # the sweep section's splits replace the single run's
        values = {k: v for k, v in values.items() if k not in ("train_split", "eval_split")}
        values.update(recipe["sweep"])
    unknown = sorted(k for k in values if k not in dests)
    if unknown:
        raise RecipeError(f"recipe {name!r} sets {unknown}, which this command has no flag for")
    return values


class RecipeAction(argparse.Action):
    """``--recipe NAME``: sets the recipe's values on the namespace at that point of the command line, so
    flags given after it override them (and flags before it are overridden)."""

    def __call__(self, parser, namespace, name, option_string=None):
        actions = {a.dest: a for a in parser._actions}
        try:
            values = recipe_defaults(name, actions, sweep="search_epochs" in actions)
            for key, value in values.items():
                kind = actions[key].type
                if isinstance(value, str) and callable(kind):  # YAML reads 1e-3 (no dot) as a string
                    value = kind(value)
                # a flag that sets several settings (the old `rank`: gift_rank and lora_rank) sets them all
                for dest in getattr(actions[key], "sets", None) or (key,):
                    setattr(namespace, dest, value)
        except (RecipeError, ValueError, TypeError) as e:
            parser.error(f"--recipe {name}: {e}")
        setattr(namespace, self.dest, name)


def add_recipe_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", action=RecipeAction, default=None, metavar="NAME",
                        help="defaults from a shipped recipe (`gift recipes`) or a YAML file; flags after it override")
