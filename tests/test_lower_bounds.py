"""Empirical Lipschitz lower bounds, checked against constants known in closed form or bounded above
independently (numpy SVD / induced norms of the weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from lipverify.attacks.lower import (
    LowerBoundResult,
    jacobian_spectral_lower_bound,
    margin_lipschitz_lower_bound,
)


def _linear(n=12, m=4, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n, m).double().eval()


def _mlp(n=8, h=16, m=4, seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, m)).double().eval()


def _weights(net):
    return [mod.weight.detach().numpy() for mod in net.modules() if isinstance(mod, nn.Linear)]


def _witness_ratio(model, r: LowerBoundResult, norm):
    """Recompute the margin ratio of the witnesses independently (numpy, float64)."""
    j, i = r.pair
    with torch.no_grad():
        la = model(r.witness_a[None].double()).numpy()[0]
        lb = model(r.witness_b[None].double()).numpy()[0]
    d = (r.witness_a.double() - r.witness_b.double()).numpy().ravel()
    dn = np.linalg.norm(d) if norm == "2" else np.abs(d).max()
    return abs((la[j] - la[i]) - (lb[j] - lb[i])) / dn


PAIRS = [(0, 1), (2, 3), (3, 0)]


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_margin_lower_bound_on_linear_map_is_exact(norm):
    lin = _linear()
    W = lin.weight.detach().numpy()
    xs = torch.rand(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = margin_lipschitz_lower_bound(lin, xs, PAIRS, norm=norm, steps=60,
                                       generator=torch.Generator().manual_seed(0))
    assert [r.pair for r in res] == PAIRS
    for r in res:
        j, i = r.pair
        w = W[j] - W[i]
        exact = np.linalg.norm(w) if norm == "2" else np.abs(w).sum()  # dual norm of the row difference
        assert r.sound_lower is True and isinstance(r.method, str)
        assert r.value <= exact * (1 + 1e-9), (r.value, exact)
        assert r.value >= 0.99 * exact, (r.value, exact)
        assert r.value == pytest.approx(_witness_ratio(lin, r, norm), rel=1e-9)


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_margin_lower_bound_on_relu_mlp_below_weight_bound(norm):
    net = _mlp()
    Ws = _weights(net)
    if norm == "2":
        tail = np.prod([np.linalg.svd(w, compute_uv=False)[0] for w in Ws[:-1]])
    else:
        tail = np.prod([np.abs(w).sum(axis=1).max() for w in Ws[:-1]])  # induced l-inf norms
    xs = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = margin_lipschitz_lower_bound(net, xs, PAIRS, norm=norm, steps=60,
                                       generator=torch.Generator().manual_seed(1))
    for r in res:
        j, i = r.pair
        w = Ws[-1][j] - Ws[-1][i]
        upper = (np.linalg.norm(w) if norm == "2" else np.abs(w).sum()) * tail
        assert 0 < r.value <= upper, (r.value, upper)
        assert r.value == pytest.approx(_witness_ratio(net, r, norm), rel=1e-9)
    # the gradient at any point is itself a limit of ratios; the witness must get (almost) as high
    x0 = xs[:1].clone().requires_grad_(True)
    for r in res:
        j, i = r.pair
        out = net(x0)
        (g,) = torch.autograd.grad(out[0, j] - out[0, i], x0)
        gq = float(g.norm()) if norm == "2" else float(g.abs().sum())
        assert r.value >= gq * (1 - 1e-6)


def test_margin_lower_bound_smooth_function_finds_global_maximum():
    # m(x) = f_0 - f_1 = sin(3 x_0) + x_1; Lip_2 = sqrt(9 + 1), attained where cos(3 x_0) = +-1
    def f(z):
        return torch.stack([torch.sin(3 * z[:, 0]) + z[:, 1], torch.zeros_like(z[:, 0])], dim=1)

    xs = torch.tensor([[0.3, 0.0], [0.2, 1.0]], dtype=torch.float64)  # |cos(3 x_0)| < 0.83 at the seeds
    (r,) = margin_lipschitz_lower_bound(f, xs, [(0, 1)], norm="2", steps=80, restarts=1,
                                        generator=torch.Generator().manual_seed(0))
    exact = math.sqrt(10.0)
    assert r.value <= exact * (1 + 1e-9)
    # needs the ascent on ||grad m||_2 (pairs alone reach ~0.9994 here)
    assert r.value >= 0.9999 * exact, r.value
    assert r.method == "gradient-fd"


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_local_lower_bound_witnesses_stay_in_ball(norm):
    net = _mlp(seed=2)
    xs = torch.rand(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eps = 0.05
    res = margin_lipschitz_lower_bound(net, xs, PAIRS, norm=norm, steps=40, eps=eps, clip=(0.0, 1.0),
                                       generator=torch.Generator().manual_seed(2))
    for r in res:
        assert r.value > 0
        c = xs[r.seed_index]
        for w in (r.witness_a, r.witness_b):
            d = (w - c).flatten()
            dn = float(d.norm()) if norm == "2" else float(d.abs().max())
            assert dn <= eps + 1e-9
            assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
        assert r.value == pytest.approx(_witness_ratio(net, r, norm), rel=1e-9)


def test_jacobian_lower_bound_linear_equals_sigma_max():
    lin = _linear(n=10, m=6, seed=3)
    sigma = np.linalg.svd(lin.weight.detach().numpy(), compute_uv=False)[0]
    xs = torch.rand(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    r = jacobian_spectral_lower_bound(lin, xs, steps=5, iters=40, generator=torch.Generator().manual_seed(3))
    assert r.pair is None and r.sound_lower
    assert r.value <= sigma * (1 + 1e-9)
    assert r.value >= 0.99 * sigma, (r.value, sigma)
    with torch.no_grad():
        num = (lin(r.witness_a[None]) - lin(r.witness_b[None])).norm()
    assert r.value == pytest.approx(float(num / (r.witness_a - r.witness_b).norm()), rel=1e-9)


def test_jacobian_lower_bound_relu_mlp_below_product_of_spectral_norms():
    net = _mlp(seed=4)
    prod = np.prod([np.linalg.svd(w, compute_uv=False)[0] for w in _weights(net)])
    xs = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    r = jacobian_spectral_lower_bound(net, xs, steps=20, iters=20, generator=torch.Generator().manual_seed(4))
    assert 0 < r.value <= prod
    # at least the spectral norm of the Jacobian at the first seed (power iteration from below)
    J = torch.autograd.functional.jacobian(lambda z: net(z[None])[0], xs[0])
    assert r.value >= 0.99 * float(torch.linalg.matrix_norm(J, 2))


def test_float32_model_and_no_parameter_gradients():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()
    xs = torch.rand(2, 1, 6, 6)
    res = margin_lipschitz_lower_bound(net, xs, [(0, 1)], steps=20)
    r = jacobian_spectral_lower_bound(net, xs, steps=5, iters=10)
    assert res[0].value > 0 and r.value > 0
    assert res[0].witness_a.shape == (1, 6, 6)
    assert all(p.grad is None for p in net.parameters())


def test_invalid_pairs_rejected():
    lin = _linear()
    with pytest.raises(ValueError):
        margin_lipschitz_lower_bound(lin, torch.zeros(1, 12, dtype=torch.float64), [(1, 1)])
    with pytest.raises(ValueError):
        margin_lipschitz_lower_bound(lin, torch.zeros(1, 12, dtype=torch.float64), [(0, 7)])
