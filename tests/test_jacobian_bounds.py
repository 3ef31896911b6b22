"""Clarke-Jacobian interval bounds of local margin constants (``lipverify.bounds.jacobian``).

Oracles, none of them the code under test:

* brute force over the activation patterns of one-hidden-layer nets: each gradient entry is linear in
  the independent slopes of the unstable units, so its exact range over the ball's patterns is the min /
  max over the vertex patterns, and the bound must equal the norm of the entry-wise maxima;
* gradients of the float64 torch module (autograd) at random points of the ball and difference
  quotients of the margins, on nets with every node kind the rules cover (convolutions with strides,
  padding, dilation and groups; max pooling with padding, dilation, ceil mode and 1-d; MinMax; residual
  sums; concatenations; tanh, sigmoid, leaky ReLU, clipped ReLU): never above the bound;
* a ball of radius ~0 on which every unit is stable: the bound equals the exact gradient norm.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

import lipverify
from lipverify.bounds.jacobian import margin_jacobian_bounds
from lipverify.bounds.local import local_margin_constants
from lipverify.models.layers import MinMax
from nets import interval_inputs, one_hidden_layer


def _pure_bound(lm, x, eps, p, rows=None):
    lbs, ubs, ops, (C, I, J), pb = interval_inputs(lm, x, eps, p, rows)
    return margin_jacobian_bounds(lm.graph, ops, lbs, ubs, C, p), C, I, J, pb


@pytest.mark.parametrize("p", ["2", "inf"])
def test_one_hidden_layer_equals_brute_force_over_activation_patterns(p):
    lm, W1, b1, W2, x, eps = one_hidden_layer(p)
    K, C, _, _, _ = _pure_bound(lm, x, eps, p)
    rown = np.linalg.norm(W1, axis=1) if p == "2" else np.abs(W1).sum(1)
    checked_unstable = False
    for b in range(5):
        z = W1 @ x[b].numpy() + b1
        lo, hi = z - eps * rown, z + eps * rown  # exact ranges of the first layer on the ball
        fixed = {k: (1.0 if lo[k] >= 0 else 0.0) for k in range(7) if lo[k] >= 0 or hi[k] <= 0}
        free = [k for k in range(7) if k not in fixed]
        checked_unstable |= bool(free)
        for q in range(C.shape[1]):
            c = C[b, q].numpy()
            best = np.zeros(4)
            for bits in itertools.product([0.0, 1.0], repeat=len(free)):
                d = np.array([fixed.get(k, 0.0) for k in range(7)])
                d[free] = bits
                g = W1.T @ (d * (W2.T @ c))
                best = np.maximum(best, np.abs(g))
            want = np.linalg.norm(best) if p == "2" else best.sum()
            assert float(K[b, q]) == pytest.approx(want, rel=1e-7, abs=1e-12)
    assert checked_unstable


class _Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 2, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return torch.cat([self.a(x), torch.relu(self.b(x))], dim=1)


class _Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x - 0.5 * self.conv(torch.relu(x))


def _nets():
    return {
        "conv_pool": (lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), nn.Conv2d(4, 6, 2, groups=2, dilation=2),
            nn.LeakyReLU(0.1), nn.Flatten(), nn.LazyLinear(5)), (2, 11, 11)),
        "residual_minmax": (lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), MinMax(), _Res(4), nn.MaxPool2d(2, dilation=2), _Cat(), nn.Tanh(),
            nn.Flatten(), nn.LazyLinear(4)), (1, 9, 9)),
        "pool1d_sigmoid": (lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=2), nn.Sigmoid(), nn.MaxPool1d(3, stride=2, padding=1),
            nn.Conv1d(4, 4, 2), nn.Hardtanh(-0.5, 0.5), nn.Flatten(), nn.LazyLinear(3)), (2, 12)),
    }


@pytest.mark.parametrize("name", list(_nets()))
@pytest.mark.parametrize("p", ["2", "inf"])
def test_bound_is_above_every_sampled_gradient_and_difference_quotient(name, p):
    build, shape = _nets()[name]
    torch.manual_seed(0)
    net = build()
    net(torch.zeros((1,) + shape))
    lm = lipverify.load(net.eval(), input_shape=shape)
    net = copy.deepcopy(net).double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand((3,) + shape, generator=g, dtype=torch.float64)
    for eps in ([0.05, 0.4] if p == "2" else [0.01, 0.08]):
        K, C, I, J, _ = _pure_bound(lm, x, eps, p)
        res = local_margin_constants(lm.graph, x, eps, p, clamp_to_global=False)
        Kl = res.K[torch.arange(3)[:, None], I, J]
        assert bool(torch.all(Kl <= K * (1 + 1e-12))), "the combined bound is the minimum"
        grad_best = torch.zeros_like(K)
        quot_best = torch.zeros_like(K)
        for _ in range(60):
            if p == "2":
                d = torch.randn(x.shape, generator=g, dtype=torch.float64)
                d = d / d.flatten(1).norm(dim=1).reshape((-1,) + (1,) * len(shape))
                d = d * eps * torch.rand((3,) + (1,) * len(shape), generator=g, dtype=torch.float64) ** (1 / 3)
            else:
                d = (torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1) * eps
                d = torch.where(torch.rand(x.shape, generator=g) < 0.5, d.sign() * eps, d)
            z = (x + d).requires_grad_(True)
            out = net(z)
            for q in range(C.shape[1]):
                gr, = torch.autograd.grad((out * C[:, q]).sum(), z, retain_graph=True)
                gn = gr.flatten(1).norm(dim=1) if p == "2" else gr.flatten(1).abs().sum(1)
                grad_best[:, q] = torch.maximum(grad_best[:, q], gn)
            with torch.no_grad():  # difference quotient towards the centre
                dm = (out - net(x)).detach()
                num = (dm[:, None, :] * C).sum(-1).abs()
                den = d.flatten(1).norm(dim=1) if p == "2" else d.flatten(1).abs().amax(1)
                quot_best = torch.maximum(quot_best, num / den[:, None])
        assert bool(torch.all(grad_best <= Kl * (1 + 1e-9) + 1e-12)), (name, p, eps)
        assert bool(torch.all(quot_best <= Kl * (1 + 1e-9) + 1e-12)), (name, p, eps)


def test_tight_on_a_ball_where_every_unit_is_stable():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), MinMax(), nn.Flatten(),
                        nn.LazyLinear(4))
    net(torch.zeros(1, 1, 8, 8))
    lm = lipverify.load(net.eval(), input_shape=(1, 8, 8))
    net = copy.deepcopy(net).double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    K, C, _, _, _ = _pure_bound(lm, x, 1e-9, "2")
    z = x.clone().requires_grad_(True)
    out = net(z)
    for q in range(C.shape[1]):
        gr, = torch.autograd.grad((out * C[:, q]).sum(), z, retain_graph=True)
        exact = gr.flatten(1).norm(dim=1)
        assert torch.allclose(K[:, q], exact, rtol=1e-6, atol=1e-12)


def test_rows_give_the_pairs_of_the_prediction_and_certificates_are_sound():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 7 * 7, 10)).eval()
    lm = lipverify.load(net, input_shape=(1, 14, 14))
    x = torch.rand(4, 1, 14, 14, dtype=torch.float64)
    rows = torch.tensor([3, 0, 9, 3])
    full = local_margin_constants(lm.graph, x, 0.02, rows=None)
    some = local_margin_constants(lm.graph, x, 0.02, rows=rows)
    b = torch.arange(4)
    assert torch.allclose(full.K[b, rows], some.K[b, rows], rtol=1e-12)
    assert torch.equal(some.K[b, :, rows], some.K[b, rows])  # symmetric
    assert bool(full.sound.all()) and "Clarke-Jacobian" in full.method
    without = local_margin_constants(lm.graph, x, 0.02, jacobian=False)
    assert bool(torch.all(full.K <= without.K * (1 + 1e-12)))
    assert float((full.K[b, rows] / without.K[b, rows]).nan_to_num(1.0).min()) < 1.0  # it helps here


def test_graphs_without_rules_keep_the_masked_bound():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    lm = lipverify.load(net, input_shape=(6,))
    x = torch.rand(2, 6, dtype=torch.float64)
    r = local_margin_constants(lm.graph, x, 0.1, domain=lm.effective_domain())
    assert "Clarke" not in r.method and bool(r.sound.all())
    netd = copy.deepcopy(net).double()
    z = (x + 0.05 * torch.randn_like(x)).requires_grad_(True)
    out = netd(z)
    gr, = torch.autograd.grad(out[:, 0].sum() - out[:, 1].sum(), z)
    assert bool(torch.all(gr.norm(dim=1) <= r.K[:, 0, 1] * (1 + 1e-9)))


def test_local_certificates_on_conv_nets_count_and_stay_below_the_attack_radius():
    """A conv / max-pool / residual net whose masked operators are too large for an SVD: every local
    certificate is sound and counted, it certifies at least what global does, and no certified radius
    exceeds the radius of the strongest minimum-norm attack."""
    from lipverify.attacks import min_norm_radius

    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), _Res(8), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 7 * 7, 10)).eval()
    lm = lipverify.load(net, input_shape=(1, 14, 14))
    x = torch.rand(12, 1, 14, 14)
    with torch.no_grad():
        y = net(x).argmax(1)
    g = lm.certify(x, y, eps=[0.02, 0.05])
    loc = lm.certify(x, y, eps=[0.02, 0.05], method="local", local_options={"exact_max_entries": 0})
    assert all(c.sound for c in loc.inputs)
    assert all(loc.vra[e] >= g.vra[e] for e in (0.02, 0.05))
    assert any(c.method == "local" for c in loc.inputs)
    adv = min_norm_radius(net, x, y, norm="2", method="fmn")
    r_loc = torch.tensor([c.radius for c in loc.inputs], dtype=torch.float64)
    assert bool(torch.all(r_loc <= adv.radius.double() + 1e-9))
