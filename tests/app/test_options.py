"""gift.app.options: flags declared by dataclass fields; a flag that sets several fields (the old --rank) wins
or loses by its place on the command line like any other; ranges named by flag; the plain argparse types."""
import argparse
import dataclasses

import pytest

from gift.app.errors import UsageError
from gift.app.options import add_arguments, check_ranges, from_namespace, index_list, option, positive_int
from tests.helpers import ranks_parsed


@dataclasses.dataclass
class Toy:
    SHARED_FLAGS = {"width": ("inner", "outer")}

    inner: int = option(2, "inner width", min=1)
    outer: int = option(2, "outer width", min=1)
    colour: str = option("red", "colour", choices=("red", "blue"), also_flags=("--color",))
    rate: float = option(0.5, "a rate", min=0, max=1, max_open=True)


def parsed(*argv) -> Toy:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Toy)
    return from_namespace(Toy, parser.parse_args(list(argv)))


def test_fields_are_flags_and_a_shared_flag_sets_its_fields_where_it_stands():
    assert parsed() == Toy()
    assert parsed("--width", "4", "--inner", "8") == Toy(inner=8, outer=4)
    assert parsed("--inner", "8", "--width", "4") == Toy(inner=4, outer=4)
    assert parsed("--color", "blue").colour == "blue"
    with pytest.raises(UsageError, match="--width must be >= 1, got 0"):  # the flag that was typed
        parsed("--width", "0", "--inner", "3", "--outer", "3")
    with pytest.raises(UsageError, match=r"--rate must be >= 0 and < 1, got 1.0"):
        check_ranges(Toy(rate=1.0))
    with pytest.raises(UsageError, match="--colour must be one of red, blue, got 'green'"):
        check_ranges(Toy(colour="green"))


@pytest.mark.parametrize("command", ["finetune", "sweep", "plan"])
def test_the_rank_flag_given_last_wins_over_the_old_rank(command):
    assert ranks_parsed(command, "--rank", "4", "--gift-rank", "8") == (8, 4)
    assert ranks_parsed(command, "--gift-rank", "8", "--rank", "4") == (4, 4)
    assert ranks_parsed(command, "--lora-rank", "2") == (16, 2)


def test_plain_types_refuse_what_they_cannot_read():
    assert positive_int("3") == 3 and index_list("0,2,3") == [0, 2, 3]
    for bad, function, message in (("0", positive_int, "positive integer"), ("x", positive_int, "positive integer"),
                                   ("a,b", index_list, "comma-separated layer indices"),
                                   ("1,-2", index_list, "must be >= 0")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            function(bad)
