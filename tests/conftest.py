import os

# Triton kernels run on CPU tensors under the interpreter; it must be set before they are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (after TRITON_INTERPRET)
import torch  # noqa: E402  (after TRITON_INTERPRET)

from tests.helpers import ToyViT  # noqa: E402  (after TRITON_INTERPRET)


@pytest.fixture
def toy_vit():
    torch.manual_seed(0)
    return ToyViT()
