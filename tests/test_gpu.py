"""FastGIFT with the compiled Triton kernels on CUDA against GIFTReference (run by bench/gpu_check.sh)."""
import copy

import pytest
import torch

from gift import GIFTConfig
from gift_kernels.testing import assert_agree

from conftest import outputs_and_grads, tiny_timm_vit, twin_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("cfg", [GIFTConfig(rank=64, num_clusters=64), GIFTConfig(rank=24, num_heads=3, num_clusters=5, num_blocks=2)],
                         ids=["paca-r64-m64", "paca-r24-h3-2blocks"])
def test_fast_triton_on_cuda_agrees_with_reference(cfg):
    ref, fast = twin_models(tiny_timm_vit(), cfg, backend="triton")
    ref, fast = ref.cuda(), fast.cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    got, want = outputs_and_grads(fast, x), outputs_and_grads(ref, x)
    exact = outputs_and_grads(copy.deepcopy(ref).to(torch.float64), x.double())
    assert_agree({k: v.cpu() for k, v in got.items()}, {k: v.cpu() for k, v in exact.items()}, torch.float32,
                 baseline={k: v.cpu() for k, v in want.items()})


def test_fast_triton_under_bf16_autocast_tracks_the_reference():
    ref, fast = twin_models(tiny_timm_vit(), GIFTConfig(rank=64), backend="triton")
    ref, fast = ref.cuda(), fast.cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = outputs_and_grads(fast, x), outputs_and_grads(ref, x)
    exact = outputs_and_grads(copy.deepcopy(ref).to(torch.float64), x.double())
    assert_agree({k: v.float().cpu() for k, v in got.items()}, {k: v.cpu() for k, v in exact.items()}, torch.bfloat16,
                 baseline={k: v.float().cpu() for k, v in want.items()})
