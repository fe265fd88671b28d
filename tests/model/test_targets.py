"""gift.targets: what GIFT adapts in a timm model, its classifier, and module surgery."""
import pytest
import torch.nn as nn

from gift import GIFTConfig, GIFTReference
from gift.targets import classifier_name, freeze_all_but_classifier
from tests.helpers import tiny_timm_vit


def test_a_linear_probe_trains_the_classifier_only():
    model = freeze_all_but_classifier(tiny_timm_vit())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert classifier_name(model) == "head" and trainable == {"head.weight", "head.bias"}
    assert classifier_name(nn.Linear(2, 2)) is None


def test_target_that_matches_nothing_lists_close_candidates(toy_vit):
    with pytest.raises(ValueError, match=r"'attn\.prj' matches no module of ToyViT\. Close candidates: 'attn\.proj'"):
        GIFTReference(toy_vit, GIFTConfig(target_modules=("attn.prj",)))


def test_target_that_is_not_linear_is_refused(toy_vit):
    with pytest.raises(TypeError, match=r"matched 'blocks\.0\.attn', a ToyAttention, not an nn\.Linear"):
        GIFTReference(toy_vit, GIFTConfig(target_modules=("attn",)))


def test_targets_of_different_shapes_under_one_key_are_refused(toy_vit):
    toy_vit.blocks[1].attn.proj = nn.Linear(10, 12)
    with pytest.raises(
        ValueError, match=r"'blocks\.1\.attn\.proj' is 12x10 \(out x in\) while 'blocks\.0\.attn\.proj' is 12x12"
    ):
        GIFTReference(toy_vit, GIFTConfig())


def test_module_claimed_by_two_targets_is_refused(toy_vit):
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.proj' is matched by both target 'attn\.proj' and 'proj'"):
        GIFTReference(toy_vit, GIFTConfig(target_modules=("attn.proj", "proj")))
