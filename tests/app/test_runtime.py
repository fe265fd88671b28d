"""gift.app.runtime: one process without torchrun, batches of a dataset, and top-1 / top-5 accuracy."""
import torch

from gift.app.runtime import Dist, accuracy, batch_of, init_distributed


class Fixed(torch.nn.Module):
    """Logits that rank class ``(label + shift) % C`` first, then the others in order."""

    def __init__(self, num_classes: int, shift: int):
        super().__init__()
        self.num_classes, self.shift = num_classes, shift

    def forward(self, x):
        label = x[:, 0, 0, 0].long()
        first = (label + self.shift) % self.num_classes
        logits = -torch.arange(self.num_classes, dtype=torch.float32).repeat(len(x), 1)
        logits[torch.arange(len(x)), first] = 1.0
        return logits


def dataset(labels):
    return [(torch.full((3, 2, 2), float(y)), y) for y in labels]


def test_one_process_without_torchrun():
    d = init_distributed("cpu")
    assert (d.process_rank, d.world_size, d.main, d.device) == (0, 1, True, torch.device("cpu"))
    assert d.all_reduce([1.0, 2.0]) == [1.0, 2.0]


def test_accuracy_counts_top1_and_top5_and_leaves_the_model_training():
    data = dataset([0, 1, 2, 3, 4, 5, 6])
    x, y = batch_of(data, [2, 5])
    assert x.shape == (2, 3, 2, 2) and y.tolist() == [2, 5]
    right, shifted = Fixed(10, 0), Fixed(10, 1)
    assert accuracy(right, data, 3, Dist(), None) == {"top1": 1.0, "top5": 1.0, "num_images": 7}
    assert right.training
    # never first; in the top 5 (the shifted class, then 0, 1, 2, ...) for labels 0 to 3 only
    assert accuracy(shifted, data, 3, Dist(), None) == {"top1": 0.0, "top5": 4 / 7, "num_images": 7}
    few = accuracy(Fixed(3, 1), dataset([0, 1, 2]), 2, Dist(), None)  # fewer than 5 classes: top-C
    assert few == {"top1": 0.0, "top5": 1.0, "num_images": 3}
