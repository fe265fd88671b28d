"""gift.predict: a plan's memory mode for a budget (the CUDA allocator's margin kept), the batch that would fit,
and its bad input."""
import pytest

from gift.plan import (
    FIT_FRACTION,
    DoesNotFit,
    PlanError,
    TrainingSetup,
    choose_memory_mode,
    parse_bytes,
    plan_training,
)
from tests.helpers import budget_for


def test_a_budget_between_two_modes_picks_the_faster_that_fits(small_plan):
    peaks = {m: b.peak for m, b in small_plan.modes.items()}
    assert peaks["none"] > peaks["mlp"] > peaks["block"]
    for budget, want in (
        (budget_for((peaks["none"] + peaks["mlp"]) // 2), "mlp"),
        (budget_for((peaks["mlp"] + peaks["block"]) // 2), "block"),
        (budget_for(peaks["none"]), "none"),
    ):
        plan = small_plan.with_device_memory(budget)
        assert plan.recommended == want and plan.fits(want)
        mode, why = choose_memory_mode(plan)
        assert mode == want and f"memory={want}" in why and "\n" not in why
        assert f"within {FIT_FRACTION:.0%} of" in why and "kept for the CUDA allocator" in why
        assert plan.largest_batch_size >= 8


def test_a_budget_keeps_a_margin_for_the_cuda_allocator(small_plan):
    """A peak that fills the whole budget does not fit: FIT_FRACTION of it is what a step may use."""
    assert FIT_FRACTION == 0.9
    peak = small_plan.modes["none"].peak
    assert not small_plan.with_device_memory(peak + 1).fits("none")
    assert small_plan.with_device_memory(budget_for(peak)).fits("none")


def test_a_budget_below_every_mode_names_the_batch_that_fits(small_plan):
    budget = small_plan.modes["block"].peak - 1
    plan = small_plan.with_device_memory(budget)
    assert plan.recommended is None
    with pytest.raises(
        DoesNotFit, match=r"batch size 8 does not fit .* batch size \d+ would fit with memory=block"
    ) as e:
        choose_memory_mode(plan)
    fitting = e.value.largest_batch_size
    assert 1 <= fitting < 8
    usable = plan.usable_memory
    assert usable == int(budget * FIT_FRACTION)
    assert plan.fake.predict(fitting, "block").peak <= usable < plan.fake.predict(fitting + 1, "block").peak


def test_bad_input_is_one_clear_line():
    with pytest.raises(PlanError, match="unknown model 'vit_smal'"):
        plan_training(TrainingSetup(model="vit_smal", batch_size=2))
    with pytest.raises(PlanError, match="method 'qlora' is unknown"):
        TrainingSetup(model="vit_small_patch16_224", batch_size=2, method="qlora")
    with pytest.raises(PlanError, match="cannot read the memory size '24 gigs'"):
        parse_bytes("24 gigs")
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512") == 512
