"""`l2_mlp_residual` (mlp.py): its hand-written backward by gradcheck, its forward against the reference."""
import torch

from gift_kernels import l2_mlp_residual, l2_mlp_residual_reference


def test_l2_mlp_residual_gradcheck_and_reference():
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)
              for s in [(3, 5, 6), (10, 6), (10,), (6, 10), (6,)]]
    assert torch.autograd.gradcheck(l2_mlp_residual, tuple(leaves))
    torch.testing.assert_close(l2_mlp_residual(*leaves), l2_mlp_residual_reference(*leaves), rtol=1e-12, atol=1e-12)
