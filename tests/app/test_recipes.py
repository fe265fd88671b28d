"""gift.app.recipes: the shipped recipes, `--recipe` as defaults that later flags override, bad recipes."""
import argparse

import pytest

from gift.app.cli import build_parser
from gift.app.options import from_namespace
from gift.app.recipes import RecipeError, add_recipe_argument, list_recipes, load_recipe, recipe_names, recipe_text
from gift.app.run_config import FinetuneConfig
from tests.helpers import ranks_parsed


def parser(sweep=False):
    p = argparse.ArgumentParser(exit_on_error=False)
    add_recipe_argument(p)
    for flag, kind in (("--model", str), ("--method", str), ("--gift-rank", int), ("--lora-rank", int),
                       ("--block", str), ("--num-clusters", int), ("--cluster-activation", str),
                       ("--epochs", int), ("--batch-size", int), ("--warmup", float),
                       ("--drop-path", float), ("--train-split", str), ("--eval-split", str)):
        p.add_argument(flag, type=kind, default=None)
    if sweep:
        for flag in ("--lr", "--weight-decay", "--search-epochs", "--search-train-split", "--search-eval-split",
                     "--final-train-split", "--final-eval-split"):
            p.add_argument(flag, default=None)
    else:
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--weight-decay", type=float, default=0.0)
    return p


def test_shipped_recipes_have_the_papers_settings_and_cite_them():
    assert {"fgvc", "vtab1k", "fgvc-lora", "vtab1k-lora"} <= set(recipe_names())
    assert all(desc for _, desc in list_recipes())
    fgvc, vtab = load_recipe("fgvc")["finetune"], load_recipe("vtab1k")["finetune"]
    for r in (fgvc, vtab):
        assert (r["model"], r["gift_rank"], r["epochs"], r["batch_size"], r["lr"], r["weight_decay"],
                r["drop_path"]) == ("vit_base_patch16_224.augreg_in21k", 16, 100, 64, 1e-4, 0.0, 0.1)
    assert load_recipe("fgvc-lora")["finetune"]["method"] == "lora" and fgvc["method"] == "gift"
    assert load_recipe("vtab1k")["sweep"]["final_train_split"] == "train800val200"
    text = recipe_text("fgvc")
    for line in text.splitlines():  # every number carries its source
        if line.startswith("  ") and any(ch.isdigit() for ch in line.split("#")[0].split(":", 1)[-1]):
            assert "#" in line and "[" in line.split("#", 1)[1], line


def test_recipe_values_are_defaults_that_later_flags_override():
    args = parser().parse_args(["--recipe", "fgvc", "--lr", "5e-4", "--epochs", "3"])
    assert (args.recipe, args.lr, args.epochs, args.batch_size, args.gift_rank, args.block) == \
        ("fgvc", 5e-4, 3, 64, 16, "identity")
    args = parser().parse_args(["--epochs", "3", "--recipe", "vtab1k"])  # before --recipe: the recipe wins
    assert args.epochs == 100 and args.train_split == "train800"
    args = parser(sweep=True).parse_args(["--recipe", "fgvc"])
    assert args.lr == [1e-4, 2.5e-4, 5e-4, 1e-3] and args.search_epochs == 25


def test_bad_recipes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--recipe", "fgcv"])
    assert "unknown recipe 'fgcv'; did you mean fgvc" in capsys.readouterr().err
    bad = tmp_path / "mine.yaml"
    bad.write_text("finetune:\n  lr: 1e-3\n  colour: blue\n")
    with pytest.raises(SystemExit):
        parser().parse_args(["--recipe", str(bad)])
    assert "sets ['colour'], which this command has no flag for" in capsys.readouterr().err
    bad.write_text("finetune:\n  lr: 1e-3\n  epochs: 2\n")
    assert parser().parse_args(["--recipe", str(bad)]).lr == 1e-3
    bad.write_text("finetune: [1, 2\n")
    with pytest.raises(RecipeError, match="mine.yaml:2: not valid YAML"):
        load_recipe(str(bad))
    bad.write_text("finetune: {}\nschedule: cosine\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key\(s\) \['schedule'\]"):
        load_recipe(str(bad))


def test_gift_finetune_takes_a_recipe_then_flags():
    argv = ["finetune", "--recipe", "vtab1k", "--model", "gift_vit_micro_patch4_32", "--epochs", "2"]
    cfg = from_namespace(FinetuneConfig, build_parser(argv).parse_args(argv))
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.batch_size, cfg.block, cfg.method_rank, cfg.train_split, cfg.eval_split,
            cfg.cluster_activation, cfg.warmup) == ("gift_vit_micro_patch4_32", 2, 1e-4, 64, "identity", 16,
                                                    "train800", "val200", "sigmoid", 0.1)


@pytest.mark.parametrize("command", ["finetune", "sweep"])
def test_a_rank_flag_after_a_recipe_wins_and_the_old_rank_key_sets_both(command, tmp_path):
    assert ranks_parsed(command, "--recipe", "fgvc", "--gift-rank", "8") == (8, 16)
    assert ranks_parsed(command, "--recipe", "vtab1k-lora", "--lora-rank", "4") == (16, 4)
    assert ranks_parsed(command, "--gift-rank", "8", "--recipe", "fgvc") == (16, 16)  # the recipe after it wins
    old = tmp_path / "old.yaml"
    old.write_text("finetune:\n  rank: 4\n")
    assert ranks_parsed(command, "--recipe", str(old)) == (4, 4)
    assert ranks_parsed(command, "--recipe", str(old), "--lora-rank", "8") == (4, 8)


def test_recipes_and_sweep_take_grad_accum_steps(tmp_path):
    recipe = tmp_path / "accumulated.yaml"
    recipe.write_text("finetune:\n  batch_size: 64\n  grad_accum_steps: 4\n")
    argv = ["finetune", "--recipe", str(recipe)]
    cfg = from_namespace(FinetuneConfig, build_parser(argv).parse_args(argv))
    assert (cfg.batch_size, cfg.grad_accum_steps) == (64, 4)
    argv = ["sweep", "--recipe", "fgvc", "--grad-accum-steps", "8"]
    args = build_parser(argv).parse_args(argv)
    assert (args.batch_size, args.grad_accum_steps) == (64, 8)
    argv = ["finetune", "--grad-accum-steps", "0"]
    with pytest.raises(Exception, match="--grad-accum-steps must be >= 1"):
        from_namespace(FinetuneConfig, build_parser(argv).parse_args(argv)).validate()
