"""``gift recipes``: one line per shipped recipe; ``gift recipes show NAME`` prints one, comments included."""
from __future__ import annotations

import argparse

from ..recipes import RecipeError, list_recipes, recipe_names, recipe_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`gift recipes [show NAME]`."""
    parser.add_argument("action", nargs="?", default="list", choices=["list", "show"])
    parser.add_argument("name", nargs="?", default=None, help="the recipe to show")


def run(args) -> int:
    """`gift recipes`: one line per recipe; `gift recipes show NAME`: the YAML, comments included."""
    if args.action == "show":
        if not args.name:
            raise RecipeError(f"gift recipes show NAME: which recipe? ({', '.join(recipe_names())})")
        print(recipe_text(args.name), end="")
        return 0
    recipes = list_recipes()
    width = max(len(n) for n, _ in recipes)
    for name, description in recipes:
        print(f"{name:<{width}}  {description}")
    return 0
