"""The rounding-error bound proven once for every input in a box (:mod:`lipverify.bounds.domain`).

Oracles: the float32 tensors of the pass itself at random points and vertices of the box (each must lie
in its interval), exact rational evaluation of the graph (``test_rounding.exact_logits``) and the
float64 graph, and float64 certification (every decision the same)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn as nn

import lipverify
from lipverify.bounds.domain import CACHED_BOXES, DomainForward, computed_intervals, domain_delta
from lipverify.bounds.rounding import trusted_kernels
from test_rounding import Res, exact_logits, mlp, running_nets


def box_points(shape, lo, hi, n, seed):
    """Random points and random vertices of ``[lo, hi]^shape``, float32."""
    g = torch.Generator().manual_seed(seed)
    inner = torch.rand((n,) + tuple(shape), generator=g) * (hi - lo) + lo
    corner = torch.randint(0, 2, (n,) + tuple(shape), generator=g).float() * (hi - lo) + lo
    return torch.cat([inner, corner]).float()


def plain_values(rf, x):
    """Every tensor the plain float32 pass computes."""
    with trusted_kernels(), torch.no_grad():
        return rf.run(x, keep=True, plain=True)


def nets():
    torch.manual_seed(4)
    deep = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=(1, 0)), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
                         nn.ConvTranspose2d(8, 4, 2, stride=2), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(4 * 8 * 7, 10)).eval()
    with torch.no_grad():
        deep[3].running_var.uniform_(0.1, 3)
    wide = nn.Sequential(nn.Linear(512, 4)).eval()  # one tensor's term is the whole bound
    return running_nets() + [(deep, (3, 16, 16)), (Res().eval(), (1, 5, 5)), (wide, (512,))]


@pytest.mark.parametrize("case", range(6))
def test_intervals_contain_every_computed_tensor(case):
    """Every float32 tensor of the plain pass, at random points and vertices of the box, lies inside its
    interval (ReLU, leaky ReLU, MinMax, clipping, max pooling, residual sums, batch norms folded into
    convolutions, transposed convolutions)."""
    net, shape = nets()[case]
    lm = lipverify.load(net, input_shape=shape)
    rf = lm.rounded_forward("2")
    lo, hi = -0.7, 1.3
    C, R = computed_intervals(rf, lo, hi)
    vals = plain_values(rf, box_points(shape, lo, hi, 64, case))
    for j in range(rf.output + 1):
        if C[j] is None:
            continue
        out = (vals[j].double() - C[j]).abs() - R[j]
        assert float(out.max()) <= 0.0, (j, rf.steps[j].label, float(out.max()))


def test_intervals_count_the_float32_rounding_where_it_binds():
    """At the vertex that maximises (or minimises) a dense output, the exact value is the end of the
    interval of exact values; the float32 result goes past it by rounding in about half the outputs.  The
    intervals contain those results, and without their rounding term they would not: the vertices come
    within a few roundings of the ends."""
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    lm = lipverify.load(net, input_shape=(512,))
    rf = lm.rounded_forward("2")
    lo, hi = 0.0, 1.0
    C, R = computed_intervals(rf, lo, hi)
    w = net[0].weight.detach()
    x = torch.cat([(w > 0).float(), (w < 0).float()])  # per output: the maximising and minimising vertex
    vals = plain_values(rf, x)
    j = next(k for k, st in enumerate(rf.steps) if st.role == "linear")
    got = vals[j].double()
    assert float(((got - C[j]).abs() - R[j]).max()) <= 0.0
    rows = torch.arange(64)
    top, bottom = got[rows, rows], got[64 + rows, rows]
    # the exact ends of the exact values' interval: c +- |W| r, c = W / 2 + b, r = 1/2
    c0 = net[0].weight.detach().double().sum(1) / 2 + net[0].bias.detach().double()
    half = net[0].weight.detach().double().abs().sum(1) / 2
    past = (top > c0 + half) | (bottom < c0 - half)
    assert int(past.sum()) > 8  # float32 rounding carries the computed value beyond the exact range
    slack = R[j][0] - half
    over = torch.maximum(top - (c0 + half), (c0 - half) - bottom)
    assert bool((over <= slack).all()) and float((over / slack).max()) > 1e-3


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_domain_bound_holds_against_exact_rationals(norm):
    """For inputs anywhere in the box (random points and vertices), the float32 logits of the plain pass
    are within ``D[j, i]`` of the exact ones, pair by pair, in exact rational arithmetic."""
    for seed, leaky in ((0, False), (1, True)):
        lm = lipverify.load(mlp(seed, leaky=leaky), input_shape=(7,))
        rf = lm.rounded_forward(norm)
        dom = DomainForward(rf, -1.0, 2.0)
        x = box_points((7,), -1.0, 2.0, 6, seed)
        logits, delta = dom(x)
        for b in range(len(x)):
            ex = exact_logits(lm.graph, x[b])
            j = int(logits[b].argmax())
            for i in range(logits.shape[1]):
                got = Fraction(float(logits[b, j])) - Fraction(float(logits[b, i]))
                assert abs(got - (ex[j] - ex[i])) <= Fraction(float(delta[b, i])), (b, i)


def test_domain_bound_holds_against_float64_and_dominates_the_per_example_bound():
    """On conv nets (every step kind) the float32 margins are within the box's bound of the float64
    ones; that bound is at least the per-example one at every input (it holds for all of them), and
    rows outside the box get no bound."""
    for case, (net, shape) in enumerate(nets()):
        lm = lipverify.load(net, input_shape=shape)
        rf = lm.rounded_forward("2")
        dom = DomainForward(rf, 0.0, 1.0)
        x = box_points(shape, 0.0, 1.0, 32, 100 + case)
        lg, d = dom(x)
        l64, d64 = lm.rounded_forward("2", torch.float64)(x)
        e = lg.double() - l64
        err = (e.gather(1, lg.argmax(1)[:, None]) - e).abs()
        assert bool((err <= d + d64.amax(1, keepdim=True)).all())
        _, d_each = rf(x)
        assert bool((d >= d_each * (1 - 1e-9)).all()), case
        out = x.clone()
        out[0].view(-1)[0] = 1.5
        assert bool(torch.isinf(dom(out)[1][0]).all()) and bool(torch.isfinite(dom(out)[1][1:]).all())
    # the matrix is kept per box (a few boxes) and reused, and recomputing it gives the same
    assert DomainForward(rf, 0.0, 1.0).D is dom.D and torch.equal(domain_delta(rf, 0.0, 1.0), dom.D)
    for k in range(CACHED_BOXES + 2):
        DomainForward(rf, 0.0, 2.0 + k)
    assert len(rf.domain_cache) == CACHED_BOXES and (0.0, 1.0) not in rf.domain_cache


def test_certify_with_the_domain_bound_gives_the_float64_decisions(monkeypatch):
    """The probe takes the bound over the input range (the plain pass) where it pays, the per-example
    bound decides inputs it leaves open, and every decision is the float64 one; where it is not
    tried, nothing changes."""
    import lipverify.certify.rules as rules

    lm = lipverify.load()  # the built-in Lipschitz-trained MNIST net
    from lipverify.models.zoo import default_samples

    xs, ys = default_samples()
    torch.manual_seed(0)
    x, y = (xs.repeat(20, 1, 1, 1) + 0.05 * torch.rand(640, *xs.shape[1:])).clamp(0, 1), ys.repeat(20)
    monkeypatch.setattr(rules, "DOMAIN_REACH", 1.0)  # margins of a few bounds: taken when it is cheap
    monkeypatch.setattr(rules, "DOMAIN_COST", 0.1)
    eps = [0.1, 0.3, 0.6, 1.0]
    res = lm.certify(x, y, eps=eps, batch_size=64)
    ref = lm.certify(x, y, eps=eps, batch_size=64, precision="float64")
    assert any("whole input range" in t for t in res.notes), res.notes
    assert torch.equal(res.pred, ref.pred)
    for e in eps:
        assert torch.equal(res.certified_at[e], ref.certified_at[e]), e
    assert bool((res.radius <= ref.radius * (1 + 1e-12)).all())
    note = [t for t in res.notes if "whole input range" in t][0]
    assert "bounded again by the per-example bound" in note  # some inputs near a decision
    monkeypatch.setattr(rules, "DOMAIN_REACH", 0.0)
    plain = lm.certify(x, y, eps=eps, batch_size=64)
    assert not any("whole input range" in t for t in plain.notes)
    for e in eps:
        assert torch.equal(plain.certified_at[e], ref.certified_at[e]), e
