"""Linear bound propagation (CROWN) over the Lipschitz graph, and ``certify --method crown``.

Oracles: exact minima of tiny ReLU networks over a box by enumerating activation patterns and solving
one linear program per pattern (scipy), exact rational arithmetic for linear networks with
adversarially scaled weights, closed-form ranges of affine maps over a box and an l2 ball, dense
sampling and attacks inside the ball on convolutional, pooling, residual and concatenating networks
with every kind of activation, and the number of inputs auto_LiRPA's CROWN certifies on a public model
(published with the request for this method).
"""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import lipverify
from lipverify.bounds.crown import crown_bounds, margin_lower_bounds
from lipverify.cli import main
from lipverify.errors import UnsupportedOpError
from lipverify.models import MinMax
from nets import Mixed


def _relu_net(seed, d=2, h=(4, 3), m=3, scale=1.5, act=nn.ReLU):
    torch.manual_seed(seed)
    layers, k = [], d
    for w in h:
        layers += [nn.Linear(k, w), act()]
        k = w
    net = nn.Sequential(*layers, nn.Linear(k, m)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def _exact_min(net, c, lo, hi):
    """min over the box [lo, hi] of c . net(x) for an MLP with ReLU or MinMax layers: one LP per
    activation pattern (ReLU: each unit on or off; MinMax: each pair's order), on whose polytope the
    network is affine."""
    from scipy.optimize import linprog

    Ws = [m.weight.detach().double().numpy() for m in net if isinstance(m, nn.Linear)]
    bs = [m.bias.detach().double().numpy() for m in net if isinstance(m, nn.Linear)]
    minmax = any(isinstance(m, MinMax) for m in net)
    choices = [W.shape[0] // 2 if minmax else W.shape[0] for W in Ws[:-1]]  # binary choices per layer
    d = Ws[0].shape[1]
    best = math.inf
    for pattern in itertools.product([0, 1], repeat=sum(choices)):
        A, a = np.eye(d), np.zeros(d)
        A_ub, b_ub, k = [], [], 0
        for W, b, width in zip(Ws[:-1], bs[:-1], choices):
            P, p = W @ A, W @ a + b  # pre-activation = P x + p
            s = pattern[k:k + width]
            k += width
            if minmax:  # s[q] = 1: unit 2q is the larger of its pair (z_2q+1 - z_2q <= 0), else 2q+1 is
                perm = []
                for q in range(width):
                    i, j = 2 * q, 2 * q + 1
                    sign = 1.0 if s[q] else -1.0
                    A_ub.append(sign * (P[j] - P[i]))
                    b_ub.append(-sign * (p[j] - p[i]))
                    perm += [i, j] if s[q] else [j, i]
                A, a = P[perm], p[perm]
            else:  # active: P x + p >= 0; inactive: <= 0
                on = np.array(s)
                for u in range(width):
                    sign = -1.0 if on[u] else 1.0
                    A_ub.append(sign * P[u])
                    b_ub.append(-sign * p[u])
                A, a = P * on[:, None], p * on
        obj_A, obj_a = c @ (Ws[-1] @ A), c @ (Ws[-1] @ a + bs[-1])
        res = linprog(obj_A, A_ub=np.array(A_ub), b_ub=np.array(b_ub), bounds=list(zip(lo, hi)), method="highs")
        if res.status == 0:
            best = min(best, res.fun + obj_a)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_bounds_contain_the_exact_range_of_tiny_relu_nets(seed):
    net = _relu_net(seed)
    lm = lipverify.load(net, input_shape=(2,))
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.uniform(0.1, 0.9, size=(1, 2)))
    eps = 0.15
    C = torch.tensor(rng.normal(size=(1, 4, 3)))
    lower, upper, _ = crown_bounds(lm.graph, x, eps, "inf", C=C, domain=(0.0, 1.0))
    a_lower, _, _ = crown_bounds(lm.graph, x, eps, "inf", C=C, domain=(0.0, 1.0), alpha_steps=15, upper=False)
    assert (a_lower >= lower).all()  # optimised slopes keep the best bound, the CROWN one included
    lo = np.clip(x[0].numpy() - eps, 0, 1)
    hi = np.clip(x[0].numpy() + eps, 0, 1)
    for s in range(4):
        c = C[0, s].numpy()
        exact_min = _exact_min(net, c, lo, hi)
        exact_max = -_exact_min(net, -c, lo, hi)
        assert lower[0, s] <= exact_min + 1e-9 and upper[0, s] >= exact_max - 1e-9
        assert a_lower[0, s] <= exact_min + 1e-9
        # not vacuous: within the interval-bound width of the truth
        assert exact_min - lower[0, s] <= 2.0 * (exact_max - exact_min) + 1.0


@pytest.mark.parametrize("seed", range(5))
def test_minmax_bounds_contain_the_exact_range(seed):
    """GroupSort-2 by max(a, b) = b + relu(a - b): the bounds contain the exact range (one LP per
    ordering of the pairs), are exact where every pair is decided, and beat interval arithmetic."""
    net = _relu_net(seed, h=(4, 4), act=MinMax)
    lm = lipverify.load(net, input_shape=(2,))
    assert any(nd.kind == "minmax" for nd in lm.graph.nodes)
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.uniform(0.2, 0.8, size=(1, 2)))
    C = torch.tensor(rng.normal(size=(1, 4, 3)))
    for eps in (0.15, 1e-6):
        lower, upper, _ = crown_bounds(lm.graph, x, eps, "inf", C=C, domain=(0.0, 1.0))
        lo, hi = np.clip(x[0].numpy() - eps, 0, 1), np.clip(x[0].numpy() + eps, 0, 1)
        for s in range(4):
            c = C[0, s].numpy()
            exact_min, exact_max = _exact_min(net, c, lo, hi), -_exact_min(net, -c, lo, hi)
            assert lower[0, s] <= exact_min + 1e-9 and upper[0, s] >= exact_max - 1e-9
            if eps < 1e-3:  # every pair decided: the network is affine on the ball
                assert exact_min - lower[0, s] <= 1e-6 and upper[0, s] - exact_max <= 1e-6
    ibp_lower, _, _ = crown_bounds(lm.graph, x, 0.15, "inf", C=C, domain=(0.0, 1.0), intermediate="ibp")
    crown_lower, _, _ = crown_bounds(lm.graph, x, 0.15, "inf", C=C, domain=(0.0, 1.0))
    assert (crown_lower >= ibp_lower - 1e-12).all()


def test_affine_maps_get_their_exact_range():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3)).eval()
    lm = lipverify.load(net, input_shape=(5,))
    x = torch.rand(4, 5, dtype=torch.float64) * 0.6 + 0.2
    W, b = net[0].weight.double(), net[0].bias.double()
    centre = x @ W.T + b
    lower, upper, _ = crown_bounds(lm.graph, x, 0.1, "inf")  # box: c -+ |W| eps
    assert torch.allclose(lower, centre - 0.1 * W.abs().sum(1), atol=1e-10)
    assert torch.allclose(upper, centre + 0.1 * W.abs().sum(1), atol=1e-10)
    lower, upper, _ = crown_bounds(lm.graph, x, 0.1, "2")  # ball: c -+ eps ||row||_2
    assert torch.allclose(lower, centre - 0.1 * W.norm(dim=1), atol=1e-10)
    # on the domain [0, 1] with a large ball, the box [0, 1] decides: the exact box range
    lower, _, _ = crown_bounds(lm.graph, x, 10.0, "2", domain=(0.0, 1.0))
    box_min = b + W.clamp_max(0).sum(1)
    assert torch.allclose(lower, box_min.expand(4, 3), atol=1e-10)


def test_outward_rounding_on_adversarially_scaled_weights():
    """y = W2 W1 x with entries 1e8 and 1e-8 that cancel: the bound stays below the exact rational
    minimum over the box."""
    W1 = torch.tensor([[1e8, -1e8 + 1.0, 3e-8], [1e-8, 1.0, -1e8]], dtype=torch.float64)
    W2 = torch.tensor([[1.0, 1.0], [1e8, -1e-8]], dtype=torch.float64)
    net = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(W1)
        net[1].weight.copy_(W2)
    net32 = net.float()
    lm = lipverify.load(net32, input_shape=(3,))
    x = torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64)
    eps = 0.25
    lower, upper, _ = crown_bounds(lm.graph, x, eps, "inf")
    # the float32 network's own weights, exactly, as rationals
    M = [[sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(row2, col))
          for col in zip(*[[float(v) for v in r] for r in net32[0].weight.detach()])]
         for row2 in [[float(v) for v in r] for r in net32[1].weight.detach()]]
    lo_box, hi_box = Fraction(1, 4), Fraction(3, 4)
    for k in range(2):
        exact_min = sum(m * (lo_box if m > 0 else hi_box) for m in M[k])
        exact_max = sum(m * (hi_box if m > 0 else lo_box) for m in M[k])
        assert Fraction(float(lower[0, k])) <= exact_min and Fraction(float(upper[0, k])) >= exact_max


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-0.5, 0.5), nn.LeakyReLU(0.1), nn.Tanh(),
                                 nn.GELU(), nn.ELU(), nn.SiLU(), nn.Sigmoid(), nn.Softplus(beta=3.0), MinMax()],
                         ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("norm,eps", [("inf", 0.05), ("2", 0.3)])
def test_samples_and_attacks_stay_inside_the_bounds(act, norm, eps):
    torch.manual_seed(3)
    net = Mixed(act).eval()
    lm = lipverify.load(net, input_shape=(1, 7, 7))
    x = torch.rand(2, 1, 7, 7, dtype=torch.float64)
    lower, upper, _ = crown_bounds(lm.graph, x, eps, norm, domain=(0.0, 1.0))
    net64 = net.double()
    g = torch.Generator().manual_seed(0)
    for b in range(2):
        d = torch.randn(3000, 1, 7, 7, generator=g, dtype=torch.float64)
        if norm == "inf":  # vertices of the box and uniform points inside it
            d = torch.where(torch.arange(3000)[:, None, None, None] < 1500, torch.sign(d) * eps,
                            (torch.rand(d.shape, generator=g, dtype=torch.float64) * 2 - 1) * eps)
        else:
            d = d / d.flatten(1).norm(dim=1)[:, None, None, None] * eps
        pts = (x[b] + d).clamp(0, 1)
        # a few steps of projected gradient descent on every logit, both directions
        for sign in (1.0, -1.0):
            z = pts[:64].clone().requires_grad_(True)
            for _ in range(20):
                out = net64(z).sum() * sign
                (gz,) = torch.autograd.grad(out, z)
                with torch.no_grad():
                    step = gz.sign() * eps / 10 if norm == "inf" else gz / (gz.flatten(1).norm(dim=1)[:, None, None, None] + 1e-12) * eps / 10
                    z = z - step
                    delta = z - x[b]
                    if norm == "inf":
                        delta = delta.clamp(-eps, eps)
                    else:
                        nrm = delta.flatten(1).norm(dim=1)[:, None, None, None]
                        delta = delta * torch.clamp(eps / (nrm + 1e-300), max=1.0)
                    z = (x[b] + delta).clamp(0, 1)
                z.requires_grad_(True)
            pts = torch.cat([pts, z.detach()])
        with torch.no_grad():
            y = net64(pts)
        assert (y >= lower[b] - 1e-9).all() and (y <= upper[b] + 1e-9).all()


def test_unsupported_nodes_are_named():
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    lm = lipverify.load(net, input_shape=(4,))
    with pytest.raises(UnsupportedOpError, match="normalization"):
        crown_bounds(lm.graph, torch.rand(1, 4, dtype=torch.float64), 0.1, "inf")
    with pytest.raises(UnsupportedOpError, match="no linear relaxation"):
        lm.certify(torch.rand(2, 4), torch.zeros(2, dtype=torch.long), eps=[0.1], method="crown")


def test_certify_crown_radii_are_proven_and_below_the_attacks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    lm = lipverify.load(net, input_shape=(6,))
    x = torch.rand(24, 6)
    with torch.no_grad():
        y = net(x).argmax(1)
    g = lm.certify(x, y, eps=[0.05, 0.1], norm="inf", method="global")
    c = lm.certify(x, y, eps=[0.05, 0.1], norm="inf", method="crown")
    assert (c.radius >= g.radius).all() and c.vra[0.05] >= g.vra[0.05]
    assert "crown" in c.counts and c.vra[0.1] > g.vra[0.1]
    # every reported radius was proven: the margins' lower bounds are positive there
    pred = c.pred
    for i in range(24):
        r = float(c.radius[i])
        if r > 0:
            low = margin_lower_bounds(lm.graph, x[i:i + 1].double(), pred[i:i + 1], r, "inf", domain=(0.0, 1.0))
            assert (low > 0).all()
    rob = lm.attack(x, y, eps=[0.05, 0.1], norm="inf", strength="thorough")
    assert (c.radius.double() <= rob.radius.double() * (1 + 1e-9) + 1e-12).all()
    best = lm.certify(x, y, eps=[0.05, 0.1], norm="inf", method="best")
    loc = lm.certify(x, y, eps=[0.05, 0.1], norm="inf", method="local")
    # the largest of the methods' radii, up to the bisection's resolution (8 halvings of [r, 2r])
    assert (best.radius >= torch.maximum(loc.radius, c.radius) * (1 - 2 ** -7)).all()
    assert best.vra[0.1] >= max(c.vra[0.1], loc.vra[0.1]) and bool(best.sound.all())


def test_certify_cli_crown(tmp_path):
    from lipverify.models.zoo import default_samples

    x, y = default_samples()
    data = tmp_path / "d.npz"
    np.savez(data, x=x[:3].numpy(), y=y[:3].numpy())
    res = CliRunner().invoke(main, ["certify", "--data", str(data), "--eps", "0.5,1.5", "--method", "crown",
                                    "--json"])
    assert res.exit_code == 0, res.stdout + res.stderr
    d = json.loads(res.stdout)
    assert d["method"] == "crown" and any("linear bound propagation (CROWN)" in n for n in d["notes"])
    assert any("[0, 1]" in n for n in d["notes"] if "CROWN" in n)  # the domain it holds on is said


@pytest.mark.realdata
def test_crown_certifies_what_the_reference_library_certifies(realdata):
    """auto_LiRPA's CROWN certified 32 of the first 50 MNIST test images of mnist-net_256x2 at l_inf
    0.02 (ball intersected with [0, 1]); lipverify's CROWN must be within 2 of it, and never above
    what the attacks leave robust."""
    lm = lipverify.load(str(realdata / "models" / "onnx" / "mnist-net_256x2.onnx"))
    d = np.load(realdata / "data" / "mnist_test_1000.npz")
    x = torch.from_numpy(d["x"][:50]).reshape(50, *lm.input_shape).double()
    y = torch.from_numpy(d["y"][:50]).long()
    with torch.no_grad():
        pred = lm(x.float()).argmax(1)
    low = margin_lower_bounds(lm.graph, x, pred, 0.02, "inf", domain=(0.0, 1.0))
    certified = (low > 0).all(1) & (pred == y)
    assert abs(int(certified.sum()) - 32) <= 2
    # optimised slopes: auto_LiRPA's alpha-CROWN certified 35 (10 inputs here, to keep it quick)
    low_a = margin_lower_bounds(lm.graph, x[:10], pred[:10], 0.02, "inf", domain=(0.0, 1.0), alpha_steps=20)
    assert ((low_a > 0).all(1) >= (low[:10] > 0).all(1)).all()
    rob = lm.attack(x.float(), y, eps=[0.02], norm="inf", strength="fast")
    broken = rob.radius <= 0.02
    assert not bool((certified & broken).any())


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("name,data,norm_kw,norm,eps", [
    ("mnist-net_256x2", "mnist_test_1000.npz", {}, "2", 0.3),
    ("Convnet_maxpool", "mnist_test_1000.npz", {}, "inf", 0.02),
    ("cifar_base_kw", "cifar10_test_100.npz", {"mean": "0.485,0.456,0.406", "std": "0.225"}, "inf", 2 / 255),
    ("resnet_2b", "cifar10_test_100.npz", {"mean": "0.4914,0.4822,0.4465", "std": "0.2471,0.2435,0.2616"},
     "inf", 1 / 255),
])
def test_no_attack_breaks_a_crown_certificate_on_the_public_models(realdata, name, data, norm_kw, norm, eps):
    """Certified at eps by CROWN implies no adversarial example within eps (the standard preset);
    the certified radii of the smaller models stay below the adversarial radii."""
    lm = lipverify.load(str(realdata / "models" / "onnx" / f"{name}.onnx"), **norm_kw)
    d = np.load(realdata / "data" / data)
    n = 4
    x = torch.from_numpy(d["x"][:n]).float()
    x = (x / 255 if x.max() > 1.5 else x).reshape(n, *lm.input_shape)
    y = torch.from_numpy(d["y"][:n]).long()
    with torch.no_grad():
        pred = lm(x).argmax(1)
    low = margin_lower_bounds(lm.graph, x.double(), pred, eps, norm, domain=(0.0, 1.0))
    certified = (low > 0).all(1) & (pred == y)
    rob = lm.attack(x, y, eps=[eps], norm=norm, strength="standard")
    assert not bool((certified & (rob.radius <= eps)).any())
    if name in ("mnist-net_256x2", "Convnet_maxpool"):
        c = lm.certify(x, y, eps=[eps], norm=norm, method="crown")
        ok = c.pred == y
        assert (c.radius[ok].double() <= rob.radius[ok].double() * (1 + 1e-9) + 1e-12).all()


@pytest.mark.realdata
@pytest.mark.slow
def test_crown_never_certifies_a_sat_competition_instance(realdata):
    """Every competition instance with ground truth: CROWN on the specification's own box never proves
    a `sat` one (a counterexample exists), and proves some of the `unsat` ones."""
    import csv

    from lipverify.data import load_data

    rows = list(csv.DictReader(open(realdata / "ground_truth" / "instances.csv")))
    models: dict = {}
    proven_unsat = 0
    for r in rows:
        lm = models.setdefault(r["model_file"], lipverify.load(realdata / r["model_file"]))
        ds = load_data(realdata / r["vnnlib_file"], lm.input_shape, n_classes=lm.n_classes)
        res = lm.certify_properties(ds.x, ds.properties, *ds.box(), norm="inf", method="crown")
        if r["verdict"].startswith("sat"):
            assert not res.inputs[0].certified, r["vnnlib_file"]
        else:
            proven_unsat += bool(res.inputs[0].certified)
    assert proven_unsat >= 10  # 13 of the 18 `unsat` ones when this was written (the global constants: 0)


def test_best_never_starts_crown_from_an_estimate(monkeypatch):
    """``best`` runs the local constants first; an unproven (estimated) local radius must not become the
    start of CROWN's bisection, which reports its start as proven."""
    import lipverify.certify.local as local_mod

    def inflated(model, x, pred, diffs, mask, radius, targets, norm, cert_at, eps_list, per_example, **kw):
        return {i: (50.0, False, {}) for i in range(len(x))}  # estimates, far beyond any true radius

    monkeypatch.setattr(local_mod, "local_certify", inflated)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    lm = lipverify.load(net, input_shape=(6,))
    x = torch.rand(8, 6)
    with torch.no_grad():
        y = net(x).argmax(1)
    res = lm.certify(x, y, eps=[0.05], norm="inf", method="best")
    for c in res.inputs:
        assert c.sound and c.radius < 50.0 and c.method in ("global", "crown")
        if c.radius > 0:  # proven: the margins' lower bounds are positive at the reported radius
            low = margin_lower_bounds(lm.graph, x[c.index:c.index + 1].double(), torch.tensor([c.pred]), c.radius,
                                      "inf", domain=(0.0, 1.0))
            assert (low > 0).all()


def test_a_ball_that_misses_the_domain_is_refused_and_not_certified():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    lm = lipverify.load(net, input_shape=(3,))
    x = torch.tensor([[1.5, 0.5, 0.5]], dtype=torch.float64)  # 0.5 outside [0, 1]
    with pytest.raises(lipverify.UserInputError, match="outside the input domain"):
        crown_bounds(lm.graph, x, 0.1, "inf", domain=(0.0, 1.0))
    lm.set_domain(0.0, 1.0)
    xs = torch.tensor([[1.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    with torch.no_grad():
        y = net(xs).argmax(1)
    res = lm.certify(xs, y, eps=[0.01], norm="inf", method="crown")
    assert res.inputs[0].method != "crown"  # never examined: its ball and the domain do not meet


def test_alpha_crown_time_budget_falls_back_to_crown_soundly(tmp_path):
    """alpha_budget=0: no optimisation step runs, so every bound is CROWN's (identical radii) and a note
    says the budget cut it; a large budget: radii at least CROWN's and no such note."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    lm = lipverify.load(net, input_shape=(6,))
    x = torch.rand(12, 6)
    with torch.no_grad():
        y = net(x).argmax(1)
    c = lm.certify(x, y, eps=[0.05], norm="inf", method="crown")
    cut = lm.certify(x, y, eps=[0.05], norm="inf", method="alpha-crown", alpha_budget=0.0)
    assert torch.equal(cut.radius, c.radius)
    assert any("time budget" in n for n in cut.notes)
    full = lm.certify(x, y, eps=[0.05], norm="inf", method="alpha-crown", alpha_budget=1e6)
    assert (full.radius >= c.radius).all() and not any("time budget" in n for n in full.notes)
    with pytest.raises(lipverify.UserInputError):
        lm.certify(x, y, eps=[0.05], norm="inf", method="alpha-crown", alpha_budget=-1.0)
    data = tmp_path / "d.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(net, torch.rand(1, 6), str(onnx_path), dynamo=False, opset_version=17)
    res = CliRunner().invoke(main, ["certify", str(onnx_path), "--data", str(data), "--eps", "0.05", "--norm", "inf",
                                    "--method", "alpha-crown", "--alpha-budget", "-1"])
    assert res.exit_code == 2


def _pgd_margins(net, x, pred, eps, steps=15):
    """Smallest margins ``f_pred - f_j`` (``(B, m)``) seen by targeted l_inf PGD in the ball within [0, 1]."""
    ar = torch.arange(len(x))
    with torch.no_grad():
        best = net(x)
        best = best[ar, pred][:, None] - best
    for j in range(best.shape[1]):
        z = x.clone()
        for _ in range(steps):
            z.requires_grad_(True)
            out = net(z)
            marg = out[ar, pred] - out[:, j]
            (g,) = torch.autograd.grad(marg.sum(), z)
            with torch.no_grad():
                best[:, j] = torch.minimum(best[:, j], marg)
                z = (x + (z - 2.5 * eps / steps * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
        with torch.no_grad():
            out = net(z)
            best[:, j] = torch.minimum(best[:, j], out[ar, pred] - out[:, j])
    best[ar, pred] = math.inf
    return best


@pytest.mark.slow
def test_crown_on_a_torchvision_resnet_never_beats_pgd(tmp_path):
    """The ecosystem's own architecture (residual sums, max pooling, average pooling, folded batch
    norms whose statistics are not the identity), exported the standard way: CROWN's margin bounds
    stay below the margins a targeted PGD reaches, so an input certified at eps has no adversarial
    example PGD finds within eps (the trained families, with the attack, are in
    benchmarks/bench_crown_zoo.py)."""
    family, size, n, eps = "resnet18", 8, 1, 1 / 255
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = getattr(tv.models, family)(num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics of a network that has seen data
            m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    path = tmp_path / f"{family}.onnx"
    torch.onnx.export(net, (torch.rand(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "b"}})
    lm = lipverify.load(str(path))
    x = torch.rand(n, 3, size, size, generator=g, dtype=torch.float64)
    pred = lm(x).argmax(1)
    low = margin_lower_bounds(lm.graph, x, pred, eps, "inf", domain=(0.0, 1.0))
    reached = _pgd_margins(lm.module_double(), x, pred, eps)
    assert (low <= reached + 1e-9 * (1 + reached.abs())).all()
    certified = (low > 0).all(1)  # and so no margin PGD reached is negative: not broken
    assert bool(certified.any()) and bool((reached[certified] > 0).all())


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_refinement_walks_reading_operator_rows_match_the_adjoints(norm, monkeypatch):
    """A refinement walk starts from unit vectors; its first linear steps read the operators' rows
    (``A^T e_u``) instead of applying the adjoints.  The bounds are the same either way, through
    convolutions, a residual sum (whose inputs inherit the unit vectors), pooling and a concatenation,
    and they contain the network's outputs at sampled points of the ball."""
    import lipverify.bounds.crown as crown_mod

    torch.manual_seed(11)
    net = Mixed(nn.ReLU()).eval()
    lm = lipverify.load(net, input_shape=(1, 7, 7))
    x = torch.rand(3, 1, 7, 7, dtype=torch.float64)
    eps = 0.08 if norm == "inf" else 0.4
    lo, up, inter = crown_bounds(lm.graph, x, eps, norm, domain=(0.0, 1.0))
    monkeypatch.setattr(crown_mod, "ROW_TABLE", 0)
    lo0, up0, inter0 = crown_bounds(lm.graph, x, eps, norm, domain=(0.0, 1.0))
    assert torch.allclose(lo, lo0, rtol=1e-12, atol=1e-12) and torch.allclose(up, up0, rtol=1e-12, atol=1e-12)
    for j in inter:
        assert torch.allclose(inter[j][0], inter0[j][0], rtol=1e-12, atol=1e-12)
    net64 = net.double()
    gen = torch.Generator().manual_seed(2)
    d = torch.randn((400,) + tuple(x.shape), generator=gen, dtype=torch.float64)
    if norm == "inf":
        d = d.sign() * eps
    else:
        d = d / d.flatten(2).norm(dim=2)[..., None, None, None] * eps
    with torch.no_grad():
        out = net64((x[None] + d).clamp(0, 1).reshape(-1, 1, 7, 7)).reshape(400, 3, -1)
    assert bool((out >= lo[None] - 1e-9).all() and (out <= up[None] + 1e-9).all())
