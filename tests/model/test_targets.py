"""gift.targets: what GIFT adapts in a timm model, its classifier, and module surgery."""
import torch.nn as nn

from gift.targets import classifier_name, freeze_all_but_classifier
from tests.helpers import tiny_timm_vit


def test_a_linear_probe_trains_the_classifier_only():
    model = freeze_all_but_classifier(tiny_timm_vit())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert classifier_name(model) == "head" and trainable == {"head.weight", "head.bias"}
    assert classifier_name(nn.Linear(2, 2)) is None
