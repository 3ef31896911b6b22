"""l-inf distance nets: the layer against a naive implementation, its Lipschitz constants (sampled and
optimised ratios), safe large p, and certification (margin > 2 eps, l-inf and p = inf only)."""

from __future__ import annotations

import math

import pytest
import torch

import lipverify
import lipverify.models.linf_dist as ld
from lipverify.attacks import min_norm_radius
from lipverify.errors import UserInputError
from lipverify.models.linf_dist import LinfDist, LinfDistNet


def _naive(x, w, b, p):
    z = (x[:, None, :] - w[None]).abs()
    y = z.amax(-1) if math.isinf(p) else (z ** p).sum(-1) ** (1 / p)
    return y + b


@pytest.mark.parametrize("p", [math.inf, 8.0, 2.0])
def test_layer_matches_the_naive_form_in_chunks(p, monkeypatch):
    monkeypatch.setattr(ld, "MAX_ELEMENTS", 7 * 5)  # several output chunks
    torch.manual_seed(0)
    lay = LinfDist(5, 13, p=p).double()
    with torch.no_grad():
        lay.bias.normal_()
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y = lay(x)
    x2 = x.detach().clone().requires_grad_(True)
    w2 = lay.weight.detach().clone().requires_grad_(True)
    ref = _naive(x2, w2, lay.bias.detach(), p)
    assert torch.allclose(y, ref, atol=1e-12)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad((y * g).sum(), (x, lay.weight))
    rx, rw = torch.autograd.grad((ref * g).sum(), (x2, w2))
    assert torch.allclose(gx, rx, atol=1e-10) and torch.allclose(gw, rw, atol=1e-10)
    if math.isinf(p):  # the gradient flows through the arg-max entry only
        gw1 = torch.autograd.grad(lay(x[:1])[0, 0], lay.weight)[0]
        assert int((gw1 != 0).sum()) == 1


def test_large_p_is_finite_and_close_to_the_max():
    lay = LinfDist(50, 4, p=1000.0).double()
    x = 1e3 * torch.randn(3, 50, dtype=torch.float64)
    y = lay(x)
    lay.p = math.inf
    yinf = lay(x)
    assert torch.isfinite(y).all()
    assert bool((y >= yinf - 1e-9).all() and (y <= yinf * 50 ** (1 / 1000) + 1e-9).all())


def test_net_is_one_lipschitz_in_linf_sampled_and_optimised():
    torch.manual_seed(1)
    net = LinfDistNet(12, depth=3, width=16, n_classes=4).double().eval()
    a = torch.randn(4000, 12, dtype=torch.float64)
    b = a + 0.3 * torch.randn_like(a)
    r = (net(a) - net(b)).abs().amax(1) / (a - b).abs().amax(1)
    assert float(r.max()) <= 1 + 1e-12
    # gradient ascent on the ratio
    u = torch.randn(64, 12, dtype=torch.float64, requires_grad=True)
    v = (u.detach() + 0.1 * torch.randn(64, 12, dtype=torch.float64)).requires_grad_(True)
    opt = torch.optim.Adam([u, v], lr=0.01)
    for _ in range(200):
        ratio = (net(u) - net(v)).abs().amax(1) / (u - v).abs().amax(1).clamp_min(1e-9)
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    with torch.no_grad():
        ratio = (net(u) - net(v)).abs().amax(1) / (u - v).abs().amax(1)
    assert float(ratio.max()) <= 1 + 1e-12


def test_bounds_certificates_and_refusals():
    torch.manual_seed(2)
    net = LinfDistNet(16, depth=3, width=24, n_classes=3).eval()
    lm = lipverify.load(net, input_shape=(16,))
    assert lm.bounds("inf").global_bound.value == pytest.approx(1.0, rel=1e-9)
    K = lm.margin_constants("inf").K
    assert float(K[0, 1]) == pytest.approx(2.0, rel=1e-5)
    x = torch.rand(40, 16)
    with torch.no_grad():
        logits = net(x.double().float()).double()
    y = logits.argmax(1)
    eps = 0.01
    res = lm.certify(x, y, eps=[eps], norm="inf")
    top2 = logits.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    for c, m in zip(res.inputs, margin.tolist()):
        assert c.certified == (m > 2 * eps * (1 + 1e-5)) or abs(m - 2 * eps) < 1e-4
    adv = min_norm_radius(lm.module, x, y, norm="inf")
    for c, ra in zip(res.inputs, adv.radius.tolist()):
        assert c.radius <= ra + 1e-9
    with pytest.raises(UserInputError, match="l-inf norm only"):
        lm.certify(x, y, eps=[eps], norm="2")
    net.set_p(8.0)
    lm8 = lipverify.load(net, input_shape=(16,))
    d = 16
    first = next(r for r in lm8.bounds("inf").layers if r.kind == "linf_dist")
    assert first.lipschitz == pytest.approx(d ** (1 / 8))  # the first layer: fan-in 16
    with pytest.raises(UserInputError, match="p = inf"):
        lm8.certify(x, y, eps=[eps], norm="inf")
