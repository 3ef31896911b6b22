"""Attacks: PGD and minimum-norm search, checked against exact radii computed independently.

Oracles:
* affine classifier: the exact minimum adversarial radius is min_i (f_y - f_i) / ||W_y - W_i||_q
  (q = 2 for l2, q = 1 for l-inf), closed form from the weights;
* tiny 2-D ReLU net: a ray scan over 2048 directions with bisection along each ray (brute force);
* every returned point is re-checked here with the model's forward pass.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from lipverify.attacks import (
    AttackResult,
    MinNormResult,
    margin_loss,
    min_norm_radius,
    pgd_attack,
)


def _affine(n=10, m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    lin = nn.Linear(n, m).double().eval()
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    return lin, W, b


def _exact_affine_radius(W, b, x, y, norm):
    """min over i != y of (f_y - f_i) / ||W_y - W_i||_q, in float64 from the weights."""
    f = x @ W.T + b
    diff = W[y][:, None, :] - W[None, :, :]  # (B, m, n)
    q = diff.norm(dim=2) if norm == "2" else diff.abs().sum(dim=2)
    marg = f.gather(1, y[:, None]) - f
    r = marg / q
    r[torch.arange(len(y)), y] = math.inf
    return r.min(dim=1).values


def _is_adv(model, z, y):
    with torch.no_grad():
        lg = model(z).double()
    f_y = lg.gather(1, y[:, None]).squeeze(1)
    other = lg.scatter(1, y[:, None], -math.inf).amax(1)
    return other >= f_y


def _norm(t, norm):
    t = t.flatten(1).double()
    return t.norm(dim=1) if norm == "2" else t.abs().amax(dim=1)


# --------------------------------------------------------------------------------------------------


def test_margin_loss_values_and_ties():
    lg = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 5.0, 1.0]])
    y = torch.tensor([0, 0, 0])
    out = margin_loss(lg, y)
    assert torch.allclose(out, torch.tensor([-1.0, 0.0, 5.0]))
    # a tie for the top logit counts as broken (>= 0)
    assert bool(out[1] >= 0)


@pytest.mark.parametrize("norm", ["2", "inf"])
@pytest.mark.parametrize("method", ["fmn", "bisection", "auto"])
def test_min_norm_matches_exact_affine_radius(norm, method):
    lin, W, b = _affine()
    x = torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = lin(x).argmax(1)
    exact = _exact_affine_radius(W, b, x, y, norm)
    res = min_norm_radius(lin, x, y, norm=norm, method=method, generator=torch.Generator().manual_seed(0))
    assert isinstance(res, MinNormResult) and res.radius.dtype == torch.float64
    # a verified adversarial point can never be closer than the exact radius
    assert bool((res.radius >= exact * (1 - 1e-9)).all()), (res.radius / exact)
    assert bool((res.radius <= exact * 1.02).all()), (res.radius / exact)
    # the reported radius is the norm of the returned point, which is adversarial
    assert torch.allclose(_norm(res.x_adv - x, norm), res.radius, rtol=0, atol=1e-12)
    assert bool(_is_adv(lin, res.x_adv, y).all())


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_pgd_succeeds_above_and_fails_below_exact_radius(norm):
    lin, W, b = _affine(seed=3)
    x = torch.randn(12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = lin(x).argmax(1)
    exact = _exact_affine_radius(W, b, x, y, norm)
    g = torch.Generator().manual_seed(0)
    above = pgd_attack(lin, x, y, 1.05 * exact, norm=norm, generator=g)
    assert isinstance(above, AttackResult)
    assert bool(above.success.all()), above.margin
    below = pgd_attack(lin, x, y, 0.95 * exact, norm=norm, generator=g)
    assert not bool(below.success.any())  # no adversarial point exists there
    assert bool((below.margin > 0).all())
    for res, eps in ((above, 1.05 * exact), (below, 0.95 * exact)):
        assert bool((_norm(res.x_adv - x, norm) <= eps + 1e-6).all())
        assert torch.equal(res.success, _is_adv(lin, res.x_adv, y))


def _tiny_relu_2d():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    return net.double().eval()


def _ray_scan_radius(net, x, y, norm, R=5.0, n_ang=2048, n_r=500):
    """Brute force: first adversarial radius along each of n_ang rays (scan, then bisection)."""
    th = torch.arange(n_ang, dtype=torch.float64) * (2 * math.pi / n_ang)
    u = torch.stack([th.cos(), th.sin()], 1)
    rs = torch.linspace(0, R, n_r + 1, dtype=torch.float64)[1:]
    others = [k for k in range(3) if k != y]
    with torch.no_grad():
        lg = net((x[None, None, :] + rs[None, :, None] * u[:, None, :]).reshape(-1, 2)).reshape(n_ang, n_r, 3)
        adv = lg[..., others].amax(-1) >= lg[..., y]
        hit = adv.any(1)
        first = adv.double().argmax(1)
        hi = torch.where(hit, rs[first], torch.full((n_ang,), math.inf, dtype=torch.float64))
        lo = torch.where(first > 0, rs[(first - 1).clamp_min(0)], torch.zeros(n_ang, dtype=torch.float64))
        for _ in range(45):
            mid = torch.where(hit, (lo + hi) / 2, torch.zeros_like(lo))
            l = net(x[None] + mid[:, None] * u)
            a = l[:, others].amax(1) >= l[:, y]
            hi = torch.where(hit & a, mid, hi)
            lo = torch.where(hit & ~a, mid, lo)
    length = u.norm(dim=1) if norm == "2" else u.abs().amax(1)
    return float((hi * length).min())


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_min_norm_close_to_brute_force_on_2d_relu_net(norm):
    net = _tiny_relu_2d()
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y = net(x).argmax(1)
    oracle = torch.tensor([_ray_scan_radius(net, x[k], int(y[k]), norm) for k in range(len(x))],
                          dtype=torch.float64)
    assert bool(torch.isfinite(oracle).all()) and bool((oracle > 0).all())
    res = min_norm_radius(net, x, y, norm=norm, method="auto", generator=torch.Generator().manual_seed(0))
    ratio = res.radius / oracle
    # the oracle sits a hair above the true radius (finite set of directions), the attack never below
    assert bool((ratio >= 1 - 1e-3).all()), ratio
    assert bool((ratio <= 1.02).all()), ratio
    assert bool(_is_adv(net, res.x_adv, y).all())


def _tiny_cnn():
    torch.manual_seed(11)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).eval()


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_pgd_respects_ball_and_clip_and_flags_match_forward(norm):
    net = _tiny_cnn()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(16, 1, 6, 6, generator=g)
    x[:, :, :2] = 0.0  # some pixels on the box boundary
    y = torch.randint(0, 5, (16,), generator=g)  # random labels: some already misclassified
    eps = torch.linspace(0.0, 1.5 if norm == "2" else 0.2, 16)
    res = pgd_attack(net, x, y, eps, norm=norm, steps=30, restarts=3, clip=(0.0, 1.0), generator=g)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert bool((_norm(res.x_adv - x, norm) <= eps.double() + 1e-6).all())
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert torch.equal(res.success, _is_adv(net, res.x_adv, y))
    with torch.no_grad():
        lg = net(res.x_adv).double()
    expect = lg.gather(1, y[:, None]).squeeze(1) - lg.scatter(1, y[:, None], -math.inf).amax(1)
    assert torch.allclose(res.margin, expect, atol=1e-6)
    # misclassified at x: success with x_adv = x
    bad0 = _is_adv(net, x, y)
    assert bad0.any()
    assert bool(res.success[bad0].all())
    assert torch.equal(res.x_adv[bad0], x[bad0])
    # eps = 0 cannot move
    assert torch.equal(res.x_adv[0], x[0])
    # the model's parameters collect no gradients
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_min_norm_with_clip_clean_misclassified_and_max_eps(norm):
    net = _tiny_cnn()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 1, 6, 6, generator=g)
    y = net(x).argmax(1)
    y[:2] = (y[:2] + 1) % 5  # two clean misclassified inputs
    res = min_norm_radius(net, x, y, norm=norm, clip=(0.0, 1.0), method="auto", generator=g)
    assert bool((res.radius[:2] == 0).all()) and torch.equal(res.x_adv[:2], x[:2])
    fin = torch.isfinite(res.radius)
    assert bool(fin.all())
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert bool(_is_adv(net, res.x_adv, y).all())
    assert torch.equal(_norm(res.x_adv.double() - x.double(), norm), res.radius)
    # max_eps below every found radius: nothing may be reported (except radius 0)
    cap = float(res.radius[2:].min()) * 0.5
    capped = min_norm_radius(net, x, y, norm=norm, clip=(0.0, 1.0), method="fmn", max_eps=cap)
    assert bool((capped.radius[:2] == 0).all())
    r = capped.radius[2:]
    assert bool(((r <= cap) | torch.isinf(r)).all())
    ok = torch.isfinite(capped.radius)
    assert bool(_is_adv(net, capped.x_adv[ok], y[ok]).all())
    assert torch.equal(capped.x_adv[~ok], x[~ok])


def test_min_norm_float32_radius_is_norm_of_returned_point():
    net = _tiny_cnn()
    x = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(9))
    y = net(x).argmax(1)
    res = min_norm_radius(net, x, y, norm="2", method="fmn")
    expect = (res.x_adv.double() - x.double()).flatten(1).norm(dim=1)
    assert torch.equal(res.radius, expect)
    assert bool(_is_adv(net, res.x_adv, y).all())


def test_bad_arguments():
    lin, _, _ = _affine()
    x = torch.zeros(2, 10, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError):
        pgd_attack(lin, x, y, 0.1, norm="1")
    with pytest.raises(ValueError):
        pgd_attack(lin, x, y, -0.1)
    with pytest.raises(ValueError):
        pgd_attack(lin, x + 2, y, 0.1, clip=(0.0, 1.0))
    with pytest.raises(ValueError):
        min_norm_radius(lin, x, y, method="deepfool")
