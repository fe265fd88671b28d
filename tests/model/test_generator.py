"""Each PaCa equation of GIFT_SPEC.md section 3 on a hand-built case, against numpy loops."""
import math

import numpy as np
import pytest
import torch

from gift.config import GIFTConfig
from gift.generator import GeneratorBlock, PaCa, l2_normalize

N, M, R = 3, 2, 4


def _np_l2(x):
    return x / np.maximum(np.sqrt((x * x).sum(-1, keepdims=True)), 1e-12)


def _np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _hand_built(num_heads=1, activation="sigmoid"):
    torch.manual_seed(0)
    paca = PaCa(R, M, num_heads, activation).double()
    u = l2_normalize(torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, 1.0, -1.0], [2.0, 0.5, -1.5, 0.25]]).double())
    return paca, u


def _np_params(paca):
    return {name: p.detach().numpy() for name, p in paca.named_parameters()}


def _np_paca(p, u, num_heads, activation):
    """Independent loop-by-loop evaluation of every PaCa equation."""
    n, r = u.shape
    s = np.zeros((n, M))
    for i in range(n):
        for m in range(M):
            s[i, m] = sum(u[i, j] * p["cluster.cluster.weight"][m, j] for j in range(r)) + p["cluster.cluster.bias"][m]
    if activation == "sigmoid":
        c = 1.0 / (1.0 + np.exp(-s)) / n
    else:
        c = _np_softmax(s, axis=0)
    z = _np_l2(np.array([[sum(c[i, m] * u[i, j] for i in range(n)) for j in range(r)] for m in range(M)]))
    q = u @ p["q.weight"].T + p["q.bias"]
    k = z @ p["k.weight"].T + p["k.bias"]
    v = z @ p["v.weight"].T + p["v.bias"]
    d = r // num_heads
    a = np.zeros((num_heads, n, M))
    o = np.zeros((n, r))
    for h in range(num_heads):
        sl = slice(h * d, (h + 1) * d)
        a[h] = _np_softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), axis=1)
        o[:, sl] = a[h] @ v[:, sl]
    out = o @ p["proj.weight"].T + p["proj.bias"]
    return dict(S=s, C=c, Z=z, Q=q, K=k, V=v, A=a, O=o, out=out)


@pytest.mark.parametrize("num_heads", [1, 2])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_each_paca_equation(num_heads, activation):
    paca, u = _hand_built(num_heads, activation)
    want = _np_paca(_np_params(paca), u.numpy(), num_heads, activation)
    with torch.no_grad():
        c = paca.cluster_assignment(u)
        z = paca.cluster_tokens(u, c)
        q, k, v = paca.q(u), paca.k(z), paca.v(z)
        a = paca.attention_probs(q, k)
        out = paca(u)
    np.testing.assert_allclose(paca.cluster(u).detach().numpy(), want["S"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(c.numpy(), want["C"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(z.numpy(), want["Z"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(k.numpy(), want["K"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v.numpy(), want["V"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.numpy(), want["A"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.numpy(), want["out"], rtol=1e-12, atol=1e-12)
    # softmax over the M clusters: every row of every head sums to one
    np.testing.assert_allclose(a.sum(-1).numpy(), np.ones((num_heads, N)), rtol=0, atol=1e-12)


def test_sigmoid_assignment_is_divided_by_n():
    paca, u = _hand_built()
    with torch.no_grad():
        c = paca.cluster_assignment(u)
        raw = paca.cluster_assignment(u, divide_by_n=False)
    torch.testing.assert_close(c * N, torch.sigmoid(paca.cluster(u)).detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(raw, torch.sigmoid(paca.cluster(u)).detach(), rtol=0, atol=0)


def test_softmax_assignment_normalises_over_tokens():
    paca, u = _hand_built(activation="softmax")
    with torch.no_grad():
        c = paca.cluster_assignment(u)
    torch.testing.assert_close(c.sum(0), torch.ones(M, dtype=torch.float64), rtol=0, atol=1e-12)


def test_l2_normalize_has_torch_eps_semantics():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-14, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        l2_normalize(x), torch.tensor([[0.6, 0.8], [0.0, 0.0], [1e-2, 0.0]], dtype=torch.float64)
    )


def test_block_is_prenorm_with_l2_and_exact_gelu():
    cfg = GIFTConfig(rank=R, num_clusters=M, num_heads=2)
    torch.manual_seed(3)
    block = GeneratorBlock(cfg).double()
    t = torch.randn(5, R, dtype=torch.float64)
    with torch.no_grad():
        mid = t + block.attn(t / t.norm(dim=-1, keepdim=True))
        hidden = block.mlp.fc1(mid / mid.norm(dim=-1, keepdim=True))
        gelu = 0.5 * hidden * (1.0 + torch.erf(hidden / math.sqrt(2.0)))
        want = mid + block.mlp.fc2(gelu)
        torch.testing.assert_close(block(t), want, rtol=1e-12, atol=1e-12)


def test_paca_is_batched_over_leading_layer_dims():
    torch.manual_seed(0)
    paca = PaCa(6, 4, 3).double()
    u = l2_normalize(torch.randn(3, 7, 6, dtype=torch.float64))
    with torch.no_grad():
        batched = paca(u)
        one_by_one = torch.stack([paca(u[i]) for i in range(3)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-12, atol=1e-12)


def test_gradcheck_through_one_paca_block():
    cfg = GIFTConfig(rank=4, num_clusters=3, num_heads=2)
    torch.manual_seed(1)
    block = GeneratorBlock(cfg).double()
    names = [n for n, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in block.parameters())
    t = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def f(t, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (t,))

    assert torch.autograd.gradcheck(f, (t, *params), eps=1e-6, atol=1e-7)
