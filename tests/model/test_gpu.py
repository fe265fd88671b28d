"""FastGIFT with the compiled Triton kernels on CUDA against GIFTReference (run by bench/gpu_check.sh)."""
import pytest
import torch

from gift import GIFTConfig
from gift.testing import assert_model_agrees, model_exact_and_baseline, outputs_and_grads, twin_models
from tests.helpers import tiny_timm_vit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    "cfg",
    [GIFTConfig(rank=64, num_clusters=64), GIFTConfig(rank=24, num_heads=3, num_clusters=5, num_blocks=2)],
    ids=["paca-r64-m64", "paca-r24-h3-2blocks"],
)
def test_fast_triton_on_cuda_agrees_with_reference(cfg):
    ref, fast = twin_models(tiny_timm_vit(), cfg, backend="triton")
    ref, fast = ref.cuda(), fast.cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    got = outputs_and_grads(fast, x)
    exact, want = model_exact_and_baseline(ref, x)
    assert_model_agrees(got, exact, want, ref)


def test_fast_triton_under_bf16_autocast_tracks_the_reference():
    ref, fast = twin_models(tiny_timm_vit(), GIFTConfig(rank=64), backend="triton")
    ref, fast = ref.cuda(), fast.cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    got = outputs_and_grads(fast, x, autocast_dtype=torch.bfloat16)
    exact, want = model_exact_and_baseline(ref, x, autocast_dtype=torch.bfloat16)
    assert_model_agrees(got, exact, want, ref, autocast_dtype=torch.bfloat16)
