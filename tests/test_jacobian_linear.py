"""Local margin constants by linear relaxation of the backward graph (``lipverify.bounds.jacobian_linear``).

Oracles, none of them the code under test:

* the chords of the slope-gradient products checked point by point on a grid of every box, against
  the box's vertices and against the McCormick planes;
* brute force over the activation patterns of one-hidden-layer nets (the gradient is linear in the
  slopes of the undecided units, so its largest norm is at a vertex pattern);
* gradients and difference quotients of the float64 torch module at points of the ball (vertices,
  uniform points, PGD iterates on the margins) on nets with convolutions, max pooling, residual sums,
  concatenations and ReLU / leaky / clipped / tanh activations: never above the bound;
* a ball on which every unit is stable: the bound equals the exact gradient norm (autograd);
* exact rationals (``fractions.Fraction``) of the gradient of a net with weights of 1e8 that cancel.
"""

from __future__ import annotations

import copy
import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn

import lipverify
from lipverify.bounds.jacobian import margin_jacobian_bounds, pair_directions
from lipverify.bounds.jacobian_linear import linear_jacobian_bounds, product_chord
from lipverify.bounds.local import _Context, local_margin_constants
from nets import Mixed, interval_inputs, one_hidden_layer


def _bounds(lm, x, eps, p, refine_rows=4096):
    lbs, ubs, ops, (C, _, _), _ = interval_inputs(lm, x, eps, p)
    lin, itv = linear_jacobian_bounds(lm.graph, ops, lbs, ubs, C, p, refine_rows=refine_rows)
    return lin, itv, margin_jacobian_bounds(lm.graph, ops, lbs, ubs, C, p), C


def test_product_chord_holds_on_every_box_and_is_the_tightest_line():
    gen = torch.Generator().manual_seed(0)
    n = 2000
    w = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    s = torch.sort(torch.randn(n, 2, generator=gen, dtype=torch.float64), dim=1).values
    s[: n // 4, 1] = s[: n // 4, 0]  # fixed slopes
    g = torch.sort(torch.randn(n, 2, generator=gen, dtype=torch.float64) * 10, dim=1).values
    cg, const = product_chord(w, s[:, 0], s[:, 1], g[:, 0], g[:, 1])
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    for a, b in itertools.product(t, t):
        sv = s[:, 0] + a * (s[:, 1] - s[:, 0])
        gv = g[:, 0] + b * (g[:, 1] - g[:, 0])
        assert bool(torch.all(w * sv * gv <= cg * gv + const + 1e-12 * (1 + (w * sv * gv).abs())))
    # tight: at both ends of the g interval the line meets the largest product over the slopes (a
    # vertex of the box), so no line in g alone is lower at both ends
    scale = w.abs() * (s[:, 0].abs() + s[:, 1].abs()) * g.abs().amax(1)  # the rounding slack's size
    for gv in (g[:, 0], g[:, 1]):
        top = torch.maximum(w * s[:, 0] * gv, w * s[:, 1] * gv)
        assert bool(((cg * gv + const - top).abs() <= 1e-6 * (1 + scale)).all())
    # never above either McCormick plane of w s g with its s term maximised (the textbook relaxation)
    for sa, sb, gb in ((1, 0, 0), (0, 1, 1)):
        lo_w = w < 0
        a_ = torch.where(lo_w, s[:, 1 - sa], s[:, sa])  # the slope multiplying g
        cs = w * g[:, gb]
        smax = torch.maximum(cs * s[:, 0], cs * s[:, 1])
        for b in t:
            gv = g[:, 0] + b * (g[:, 1] - g[:, 0])
            plane = w * a_ * (gv - g[:, gb]) + smax
            assert bool(torch.all(cg * gv + const <= plane + 1e-6 * (1 + scale)))
    # exact where the slope is fixed: the line is the product itself
    k = n // 4
    gv = g[:k, 0] * 0.3 + g[:k, 1] * 0.7
    assert bool(((cg[:k] * gv + const[:k] - w[:k] * s[:k, 0] * gv).abs() <= 1e-6 * (1 + scale[:k])).all())


@pytest.mark.parametrize("p", ["2", "inf"])
@pytest.mark.parametrize("refine", [0, 4096])
def test_one_hidden_layer_between_brute_force_and_the_interval_bound(p, refine):
    lm, W1, b1, W2, x, eps = one_hidden_layer(p)
    lin, itv, itv_ref, C = _bounds(lm, x, eps, p, refine)
    assert torch.allclose(itv, itv_ref, rtol=1e-12)
    rown = np.linalg.norm(W1, axis=1) if p == "2" else np.abs(W1).sum(1)
    gaps = []
    for b in range(5):
        z = W1 @ x[b].numpy() + b1
        lo, hi = z - eps * rown, z + eps * rown
        fixed = {k: (1.0 if lo[k] >= 0 else 0.0) for k in range(7) if lo[k] >= 0 or hi[k] <= 0}
        free = [k for k in range(7) if k not in fixed]
        for q in range(C.shape[1]):
            c = C[b, q].numpy()
            best = 0.0
            for bits in itertools.product([0.0, 1.0], repeat=len(free)):
                d = np.array([fixed.get(k, 0.0) for k in range(7)])
                d[free] = bits
                gr = W1.T @ (d * (W2.T @ c))
                best = max(best, np.linalg.norm(gr) if p == "2" else np.abs(gr).sum())
            assert float(lin[b, q]) >= best * (1 - 1e-9) - 1e-12
            assert float(lin[b, q]) <= float(itv[b, q]) * (1 + 1e-9) + 1e-12
            gaps.append(float(itv[b, q]) - float(lin[b, q]))
    assert max(gaps) > 0  # the relaxation is strictly tighter somewhere


def _points(x, eps, p, net, C, gen, n=600):
    """Points of the ball intersected with [0, 1]: vertices / uniform / sphere points and PGD iterates."""
    d = torch.randn((n,) + tuple(x.shape), generator=gen, dtype=torch.float64)
    if p == "inf":
        half = torch.arange(n)[:, None, None, None] < n // 2
        d = torch.where(half, torch.sign(d) * eps, (torch.rand(d.shape, generator=gen, dtype=torch.float64) * 2 - 1) * eps)
    else:
        d = d / d.flatten(1).norm(dim=1)[:, None, None, None] * eps * torch.rand(n, 1, 1, 1, generator=gen,
                                                                                dtype=torch.float64)
    pts = (x + d).clamp(0, 1)
    z = pts[:48].clone()
    for q in range(C.shape[0]):
        z = z.detach().requires_grad_(True)
        for _ in range(10):
            (gz,) = torch.autograd.grad((net(z) * C[q]).sum(), z)
            with torch.no_grad():
                step = gz.sign() if p == "inf" else gz / (gz.flatten(1).norm(dim=1)[:, None, None, None] + 1e-12)
                delta = z - step * eps / 5 - x
                if p == "inf":
                    delta = delta.clamp(-eps, eps)
                else:
                    delta = delta * torch.clamp(eps / (delta.flatten(1).norm(dim=1) + 1e-300), max=1.0)[:, None, None, None]
                z = (x + delta).clamp(0, 1)
            z.requires_grad_(True)
        pts = torch.cat([pts, z.detach()])
    return pts


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.1), nn.Hardtanh(-0.5, 0.5), nn.Tanh()],
                         ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("p,eps", [("inf", 0.05), ("2", 0.3)])
def test_gradients_and_quotients_on_the_ball_stay_below_the_bound(act, p, eps):
    torch.manual_seed(3)
    net = Mixed(act).eval()
    lm = lipverify.load(net, input_shape=(1, 7, 7))
    net64 = copy.deepcopy(net).double()
    x = torch.rand(2, 1, 7, 7, dtype=torch.float64)
    pred = net64(x).argmax(1)
    gen = torch.Generator().manual_seed(1)
    for mode in ("linear", "linear-refined"):
        r = local_margin_constants(lm.graph, x, eps, p, rows=pred, clamp_to_global=False, jacobian=mode,
                                   box=(0.0, 1.0))
        assert "Shi et al." in r.method
        for b in range(2):
            C, _, _ = pair_directions(5, pred[b:b + 1], 1)
            C = C[0]
            K = r.K[b, pred[b]]
            pts = _points(x[b], eps, p, net64, C, gen).requires_grad_(True)
            out = net64(pts)
            for q in range(5):
                if q == int(pred[b]):
                    continue
                (gr,) = torch.autograd.grad((out * C[q]).sum(), pts, retain_graph=True)
                gn = gr.flatten(1).norm(dim=1) if p == "2" else gr.flatten(1).abs().sum(1)
                assert float(gn.max()) <= float(K[q]) * (1 + 1e-9) + 1e-12, (mode, b, q)
                with torch.no_grad():
                    num = ((out - net64(x[b:b + 1])) * C[q]).sum(1).abs()
                    dd = (pts - x[b]).flatten(1)
                    den = dd.norm(dim=1) if p == "2" else dd.abs().amax(1)
                    quot = num[den > 1e-9] / den[den > 1e-9]
                assert float(quot.max()) <= float(K[q]) * (1 + 1e-9) + 1e-12, (mode, b, q)


def test_refinement_without_operator_columns_and_with_a_small_cap_stays_sound(monkeypatch):
    """The first step of each refinement pass reads the operator's columns; applying the operator to the
    unit vectors instead (the path for operators too large to tabulate) gives the same bounds, and a cap
    of one refined unit per node keeps every bound above the gradients found on the ball."""
    import lipverify.bounds.jacobian_linear as jl

    torch.manual_seed(3)
    net = Mixed(nn.ReLU()).eval()
    lm = lipverify.load(net, input_shape=(1, 7, 7))
    net64 = copy.deepcopy(net).double()
    x = torch.rand(2, 1, 7, 7, dtype=torch.float64)
    pred = net64(x).argmax(1)

    def run():
        return local_margin_constants(lm.graph, x, 0.3, "2", rows=pred, clamp_to_global=False,
                                      jacobian="linear-refined", box=(0.0, 1.0)).K
    with_cols = run()
    monkeypatch.setattr(jl, "_columns", lambda op, k, memo: None)
    without = run()
    assert torch.allclose(with_cols, without, rtol=1e-9, atol=1e-12)
    monkeypatch.setattr(jl, "MAX_REFINED", 1)
    capped = run()
    gen = torch.Generator().manual_seed(1)
    for b in range(2):
        C = pair_directions(5, pred[b:b + 1], 1)[0][0]
        pts = _points(x[b], 0.3, "2", net64, C, gen).requires_grad_(True)
        out = net64(pts)
        for q in range(5):
            if q == int(pred[b]):
                continue
            (gr,) = torch.autograd.grad((out * C[q]).sum(), pts, retain_graph=True)
            top = float(gr.flatten(1).norm(dim=1).max())
            for K in (with_cols, capped):
                assert top <= float(K[b, pred[b], q]) * (1 + 1e-9) + 1e-12


def test_exact_on_a_ball_where_every_unit_is_stable():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(6), nn.ReLU(),
                        nn.Linear(6, 4))
    net(torch.zeros(1, 1, 8, 8))
    lm = lipverify.load(net.eval(), input_shape=(1, 8, 8))
    net = copy.deepcopy(net).double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    for p in ("2", "inf"):
        lin, _, _, C = _bounds(lm, x, 1e-9, p, refine_rows=0)
        z = x.clone().requires_grad_(True)
        out = net(z)
        for q in range(C.shape[1]):
            gr, = torch.autograd.grad((out * C[:, q]).sum(), z, retain_graph=True)
            exact = gr.flatten(1).norm(dim=1) if p == "2" else gr.flatten(1).abs().sum(1)
            assert torch.allclose(lin[:, q], exact, rtol=1e-6, atol=1e-12)


def test_outward_rounding_on_weights_that_cancel():
    """Weights of 1e8 whose contributions cancel: the bound stays above the exact (rational) gradient."""
    w1 = torch.tensor([[1e8 + 0.1, 1.0], [1e8 - 8, -1.0], [0.3, 1e8 + 0.7]], dtype=torch.float64)
    w2 = torch.tensor([[1.0, -1.0, 1e-8], [0.5, 0.5, -3e-8]], dtype=torch.float64)
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(w1)
        net[0].bias.copy_(torch.tensor([5e7, 5e7, 5e7], dtype=torch.float64))
        net[2].weight.copy_(w2)
        net[2].bias.zero_()
    lm = lipverify.load(net.float(), input_shape=(2,))
    x = torch.tensor([[0.25, 0.5]], dtype=torch.float64)
    ops = _Context(lm.graph, "inf", {}).ops
    first, second = sorted(ops)
    W1 = [[Fraction(v) for v in row] for row in ops[first].matrix(torch.float64).tolist()]
    W2 = [[Fraction(v) for v in row] for row in ops[second].matrix(torch.float64).tolist()]
    assert W1[0][0] == Fraction(float(torch.tensor(1e8 + 0.1, dtype=torch.float32)))  # the model's own weights
    for p in ("inf", "2"):
        lin, _, _, C = _bounds(lm, x, 1e-6, p, refine_rows=0)
        c = [Fraction(float(v)) for v in C[0, 0].tolist()]
        # every hidden unit is active on the ball (pre-activations ~5e7)
        v = [sum(c[k] * W2[k][u] for k in range(2)) for u in range(3)]
        g = [sum(v[u] * W1[u][i] for u in range(3)) for i in range(2)]
        if p == "inf":
            exact = float(sum(abs(t) for t in g))
            assert float(lin[0, 0]) >= exact
        else:
            sq = sum(t * t for t in g)
            assert Fraction(float(lin[0, 0])) ** 2 >= sq


def test_auto_picks_the_linear_relaxation_where_crown_is_affordable():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 7 * 7, 10)).eval()
    lm = lipverify.load(net, input_shape=(1, 14, 14))
    x = torch.rand(4, 1, 14, 14, dtype=torch.float64)
    rows = net.double()(x).argmax(1)
    auto = local_margin_constants(lm.graph, x, 0.02, "inf", rows=rows, box=(0.0, 1.0), jacobian="auto")
    itv = local_margin_constants(lm.graph, x, 0.02, "inf", rows=rows)  # the default: interval bounds
    assert "Shi et al." in auto.method and "Shi et al." not in itv.method
    b = torch.arange(4)
    assert bool(torch.all(auto.K[b, rows] <= itv.K[b, rows] * (1 + 1e-12)))
    assert float((auto.K[b, rows] / itv.K[b, rows]).nan_to_num(1.0).min()) < 0.9
    with pytest.raises(ValueError, match="jacobian must be"):
        local_margin_constants(lm.graph, x, 0.02, "inf", jacobian="fast")


@pytest.mark.realdata
@pytest.mark.slow
def test_kw_mnist_linear_constants_are_sound_tighter_and_certify_below_the_attacks(realdata):
    """On a network trained by others (Wong-Kolter's MNIST convnet): the linear relaxation's local
    constants stay above every sampled gradient, are several times below the interval constants at
    l_inf 0.02, and its certified radii stay below the attack radii."""
    from pathlib import Path

    arch = Path(__file__).resolve().parent.parent / "examples" / "architectures.py"
    lm = lipverify.load(str(realdata / "models" / "pytorch" / "kw_mnist.pth"), arch=f"{arch}:kw_mnist",
                        input_shape=(1, 28, 28))
    d = np.load(realdata / "data" / "mnist_test_1000.npz")
    n = 4
    x = torch.from_numpy(d["x"][:n]).double()
    x = (x / 255 if x.max() > 1.5 else x).reshape(n, 1, 28, 28)
    y = torch.from_numpy(d["y"][:n]).long()
    pred = lm(x).argmax(1)
    lin = lm.local_constants(x, 0.02, "inf", jacobian="linear", rows=pred)
    itv = lm.local_constants(x, 0.02, "inf", jacobian="interval", rows=pred)
    b = torch.arange(n)
    mask = torch.arange(10)[None] != pred[:, None]
    ratio = (itv.K[b, pred] / lin.K[b, pred])[mask]
    assert float(ratio.median()) > 5.0
    net = lm.module_double()
    gen = torch.Generator().manual_seed(0)
    C, _, _ = pair_directions(10, pred, n)
    for k in range(n):
        pts = _points(x[k], 0.02, "inf", net, C[k], gen, n=200).requires_grad_(True)
        out = net(pts)
        for j in range(10):
            if j == int(pred[k]):
                continue
            (gr,) = torch.autograd.grad((out[:, pred[k]] - out[:, j]).sum(), pts, retain_graph=True)
            assert float(gr.flatten(1).abs().sum(1).max()) <= float(lin.K[k, pred[k], j]) * (1 + 1e-9)
    c = lm.certify(x.float(), y, eps=[0.02], norm="inf", method="local", local_options={"jacobian": "linear"})
    rob = lm.attack(x.float(), y, eps=[0.02], norm="inf", strength="standard")
    ok = c.pred == y
    assert (c.radius[ok].double() <= rob.radius[ok].double() * (1 + 1e-9) + 1e-12).all()
