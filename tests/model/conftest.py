import pytest

from gift.plan import TrainingSetup, plan_training


@pytest.fixture(scope="module")
def small_plan():
    """The plan of ViT-S/16 at batch 8 (fake tensors), shared by the planner's tests."""
    return plan_training(TrainingSetup(model="vit_small_patch16_224", batch_size=8))
