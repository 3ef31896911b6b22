"""Linear relaxations of the activations (lipverify.bounds.relaxations), checked against the functions
themselves on dense grids: every line stays on its side on the whole interval, the convexity table
matches second differences, and the tangent/secant lines are exact where they should be."""

from __future__ import annotations

import math

import pytest
import torch

from lipverify.bounds.relaxations import CURVATURE, relaxation
from lipverify.graph.nodes import make_activation

ACTIVATIONS = [("relu", {}), ("leaky_relu", {"negative_slope": 0.1}), ("clip", {"min": -0.5, "max": 0.5}),
               ("relu6", {}), ("tanh", {}), ("sigmoid", {}), ("gelu", {}), ("gelu", {"scale": 2.0}),
               ("gelu", {"approximate": "tanh"}), ("silu", {}), ("elu", {}), ("elu", {"alpha": 2.0}),
               ("softplus", {}), ("softplus", {"beta": 3.0}), ("softsign", {}), ("selu", {}),
               ("celu", {"alpha": 0.5}), ("mish", {}), ("hardswish", {}), ("hardsigmoid", {}), ("abs", {})]


def _intervals(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, generator=g, dtype=torch.float64) * 4
    r = torch.rand(n, generator=g, dtype=torch.float64) ** 3 * 6
    r[:50] = 0.0  # points
    r[50:100] = 1e-9  # tiny intervals
    l, u = c - r, c + r
    # end points on the kinks and the curvature changes (0, where derivatives jump; -+sqrt 2; -+3; 6)
    kinks = [(0.0, 1.0), (-1.0, 0.0), (0.0, 2.0), (-math.sqrt(2), 0.0), (-3.0, 3.0), (0.0, 6.0), (0.0, 1e-9),
             (0.0, 4.0), (0.0, 0.25), (-2.0, 0.0), (-0.5, 0.0), (math.sqrt(2), 3.0), (-3.0, -1.0), (3.0, 6.0)]
    k = len(kinks)
    l[100:100 + k] = torch.tensor([a for a, _ in kinks], dtype=torch.float64)
    u[100:100 + k] = torch.tensor([b for _, b in kinks], dtype=torch.float64)
    return l, u


@pytest.mark.parametrize("name,kw", ACTIVATIONS, ids=lambda v: str(v))
def test_relaxation_lines_hold_on_the_whole_interval(name, kw):
    act = make_activation(name, **kw)
    l, u = _intervals()
    aL, bL, aU, bU = relaxation(act, l, u)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    h = torch.minimum(l[:, None] + (u - l)[:, None] * t[None], u[:, None])
    f = act.fn(h)
    assert (aL[:, None] * h + bL[:, None] <= f).all(), name
    assert (f <= aU[:, None] * h + bU[:, None]).all(), name


@pytest.mark.parametrize("name,kw", [a for a in ACTIVATIONS if a[0] in ("tanh", "sigmoid", "gelu", "silu", "elu",
                                                                          "softplus", "softsign")],
                         ids=lambda v: str(v))
def test_relaxation_is_much_tighter_than_the_global_slope_lines(name, kw):
    """The gap at the midpoint is never above that of the lines through an end point with the
    activation's global slope range (mean value theorem), and on average at most half of it."""
    act = make_activation(name, **kw)
    l, u = _intervals(seed=1)
    aL, bL, aU, bU = relaxation(act, l, u)
    m = (l + u) / 2
    gap = (aU - aL) * m + (bU - bL)
    global_gap = (act.hi - act.lo) * (u - l) / 2
    assert (gap <= global_gap + 1e-8 * (1 + act.fn(m).abs())).all()
    wide = u - l > 0.1
    assert gap[wide].mean() <= 0.5 * global_gap[wide].mean()


@pytest.mark.parametrize("base", sorted(CURVATURE))
def test_convexity_table_matches_second_differences(base):
    act = make_activation({"abs": "abs"}.get(base, base))
    for lo, hi, sign in CURVATURE[base]:
        a, b = max(lo, -30.0), min(hi, 30.0)
        z = torch.linspace(a, b, 20001, dtype=torch.float64)
        f = act.fn(z)
        second = f[:-2] - 2 * f[1:-1] + f[2:]
        # torch's softplus switches to the identity above a threshold, a jump of 1e-10 of its value
        # (the relaxations' 1e-9 relative slack on the values covers it)
        assert (sign * second >= -(1e-12 + 1e-9 * f[1:-1].abs())).all(), (base, lo, hi)


def test_tangent_and_secant_are_exact_on_convex_and_concave_intervals():
    """tanh is convex below 0 and concave above: the upper line passes through both end points below
    0 (the secant), the lower one above 0, and the other side touches the function at the midpoint."""
    act = make_activation("tanh")
    l = torch.tensor([-3.0, 0.5], dtype=torch.float64)
    u = torch.tensor([-0.5, 3.0], dtype=torch.float64)
    aL, bL, aU, bU = relaxation(act, l, u)
    fl, fu, fm = torch.tanh(l), torch.tanh(u), torch.tanh((l + u) / 2)
    m = (l + u) / 2
    assert math.isclose(float(aU[0] * l[0] + bU[0]), float(fl[0]), abs_tol=1e-8)
    assert math.isclose(float(aU[0] * u[0] + bU[0]), float(fu[0]), abs_tol=1e-8)
    assert math.isclose(float(aL[1] * l[1] + bL[1]), float(fl[1]), abs_tol=1e-8)
    assert math.isclose(float(aL[1] * u[1] + bL[1]), float(fu[1]), abs_tol=1e-8)
    assert math.isclose(float(aL[0] * m[0] + bL[0]), float(fm[0]), abs_tol=1e-8)  # tangent at m
    assert math.isclose(float(aU[1] * m[1] + bU[1]), float(fm[1]), abs_tol=1e-8)
    assert math.isclose(float(aL[0]), 1 - math.tanh(float(m[0])) ** 2, rel_tol=1e-9)
