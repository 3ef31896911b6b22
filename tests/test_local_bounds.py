"""Local Lipschitz bounds (SPEC section 4, Huang et al. 2021), checked against independent oracles.

Oracles:
* interval bounds: node values at many points of the ball (random interior points, points on the
  sphere / box corners, and projected-gradient maximisers and minimisers of every single unit);
* soundness of the local margin constants: difference quotients ``|m_ij(a) - m_ij(b)| / ||a - b||`` and
  gradient norms at points of the ball (random and gradient-ascent optimised) never exceed ``K_ij``;
* the exact path: masks and masked matrices recomputed from the weights with numpy;
* the global ``K`` (local <= global), monotonicity in ``eps``, batch independence;
* the new ``LinearOp.abs_apply`` / ``row_norms`` against the materialised operator matrices.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

import lipverify
from lipverify.bounds.local import (
    local_margin_constants,
    preactivation_bounds,
    varying_masks,
)
from lipverify.graph.linear_ops import (
    Chain,
    Conv,
    ConvTranspose,
    Dense,
    Residual,
    Scale,
    Select,
    identity_select,
)
from lipverify.models.layers import MinMax

# ------------------------------------------------------------------------------------------------
# networks


def _mlp(seed=0, sizes=(8, 12, 10, 4)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval(), (sizes[0],)


def _convnet(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    return net, (1, 8, 8)


class _ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.d = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h) + self.d(x)))


def _resnet(seed=0):
    torch.manual_seed(seed)
    return _ResNet().eval(), (6,)


def _mixed(seed=0):
    """Clipped ReLUs (const_above), a non-monotone GELU and an abs: exercises every interval rule."""
    torch.manual_seed(seed)

    class Abs(nn.Module):
        def forward(self, x):
            return torch.abs(x)

    net = nn.Sequential(nn.Linear(6, 8), nn.Hardtanh(), nn.Linear(8, 8), nn.ReLU6(), nn.Linear(8, 8),
                        nn.GELU(), nn.Linear(8, 8), Abs(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        net[2].weight.mul_(4.0)
        net[2].bias.add_(2.0)
    return net, (6,)


class _CatMinMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(6, 6), nn.Linear(6, 4), nn.Linear(10, 8), nn.Linear(8, 3)
        self.mm = MinMax()

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.d(self.mm(self.c(h)))


def _catminmax(seed=0):
    torch.manual_seed(seed)
    return _CatMinMax().eval(), (6,)


NETS = {"mlp": _mlp, "conv": _convnet, "residual": _resnet, "concat_minmax": _catminmax}


def _load(builder):
    net, shape = builder()
    lm = lipverify.load(net, input_shape=shape)
    return lm, copy.deepcopy(net).double(), shape


# ------------------------------------------------------------------------------------------------
# sampling in the ball


def _flat_norm(d, p):
    d = d.reshape(d.shape[0], -1)
    return d.norm(dim=1) if p == "2" else d.abs().amax(dim=1)


def _project(x, a, eps, p):
    d = a - x
    if p == "2":
        n = _flat_norm(d, p).clamp_min(1e-300)
        d = d * (eps / n).clamp(max=1.0).reshape((-1,) + (1,) * (d.dim() - 1))
    else:
        d = d.clamp(-eps, eps)
    return x + d


def _sample_ball(x, eps, p, n, g, scale=1.0, boundary=False):
    """``n`` points of ``B_p(x, eps * scale)`` (``x``: one example, shape ``(1, *shape)``)."""
    shape = x.shape[1:]
    dim = x[0].numel()
    if p == "2":
        d = torch.randn((n, dim), generator=g, dtype=torch.float64)
        d = d / d.norm(dim=1, keepdim=True)
        r = torch.ones(n, 1, dtype=torch.float64) if boundary else torch.rand(n, 1, generator=g,
                                                                                dtype=torch.float64) ** (1 / dim)
        d = d * r
    else:
        if boundary:
            d = torch.randint(0, 2, (n, dim), generator=g).to(torch.float64) * 2 - 1
        else:
            d = torch.rand((n, dim), generator=g, dtype=torch.float64) * 2 - 1
    return x + (eps * scale) * d.reshape((n,) + tuple(shape))


def _unit_extremisers(graph, x, eps, p, node, steps=60):
    """Projected gradient ascent / descent of every unit of ``node`` over the ball: returns points."""
    with torch.no_grad():
        n_units = graph.forward(x, upto=node)[0].numel()
    B = 2 * n_units
    xs = x.expand((B,) + tuple(x.shape[1:])).clone()
    sign = torch.cat([torch.ones(n_units), -torch.ones(n_units)]).double()
    unit = torch.cat([torch.arange(n_units), torch.arange(n_units)])
    g = torch.Generator().manual_seed(node)
    a = _sample_ball(x, eps, p, B, g, scale=0.5)
    for _ in range(steps):
        a = a.detach().requires_grad_(True)
        v = graph.forward(a, upto=node).reshape(B, -1)
        obj = (v[torch.arange(B), unit] * sign).sum()
        (grad,) = torch.autograd.grad(obj, a)
        with torch.no_grad():
            if p == "2":
                step = grad / _flat_norm(grad, p).clamp_min(1e-300).reshape((-1,) + (1,) * (grad.dim() - 1))
            else:
                step = grad.sign()
            a = _project(xs, a + 0.25 * eps * step, eps, p)
    return a.detach()


def _logit_ratios(model, a, b, p):
    """``(N, m, m)`` difference quotients ``|m_ij(a) - m_ij(b)| / ||a - b||``."""
    with torch.no_grad():
        fa, fb = model(a).reshape(a.shape[0], -1), model(b).reshape(b.shape[0], -1)
    d = fa - fb
    num = (d[:, None, :] - d[:, :, None]).abs()
    den = _flat_norm(a - b, p).reshape(-1, 1, 1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))  # a == b: no info


def _gradient_lower_bounds(model, pts, p):
    """``(m, m)`` max over points of the dual norm of the margin gradients."""
    pts = pts.detach().requires_grad_(True)
    out = model(pts).reshape(pts.shape[0], -1)
    m = out.shape[1]
    jac = []
    for k in range(m):
        (gk,) = torch.autograd.grad(out[:, k].sum(), pts, retain_graph=True)
        jac.append(gk.reshape(pts.shape[0], -1))
    J = torch.stack(jac, dim=1)  # (N, m, n)
    diff = J[:, :, None, :] - J[:, None, :, :]
    q = 2.0 if p == "2" else 1.0
    return torch.linalg.vector_norm(diff, ord=q, dim=-1).amax(dim=0)


def _ascent_pairs(model, x, eps, p, steps=80, restarts=3, seed=0):
    """Adam on pairs ``(a, b)`` in the ball maximising each margin ratio; returns ``(m, m)`` maxima."""
    with torch.no_grad():
        m = model(x).reshape(1, -1).shape[1]
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    n = len(pairs) * restarts
    g = torch.Generator().manual_seed(seed)
    a = _sample_ball(x, eps, p, n, g, scale=0.9)
    b = _project(x.expand_as(a), a + _sample_ball(torch.zeros_like(x), eps, p, n, g, scale=0.1), eps, p)
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ii = torch.tensor([pr[0] for pr in pairs] * restarts)
    jj = torch.tensor([pr[1] for pr in pairs] * restarts)
    opt = torch.optim.Adam([a, b], lr=0.05 * eps)
    best = torch.zeros(m, m, dtype=torch.float64)
    xs = x.expand_as(a)
    for _ in range(steps):
        fa, fb = model(a).reshape(n, -1), model(b).reshape(n, -1)
        num = (fa[torch.arange(n), jj] - fa[torch.arange(n), ii]) - (fb[torch.arange(n), jj] - fb[torch.arange(n), ii])
        den = _flat_norm(a - b, p).clamp_min(1e-12)
        ratio = num.abs() / den
        with torch.no_grad():
            for k in range(n):
                best[ii[k], jj[k]] = max(best[ii[k], jj[k]], float(ratio[k]))
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
        with torch.no_grad():
            a.copy_(_project(xs, a, eps, p))
            b.copy_(_project(xs, b, eps, p))
    return torch.maximum(best, best.T)


# ------------------------------------------------------------------------------------------------
# (a) interval bounds contain the node values of points in the ball


@pytest.mark.parametrize("name", ["mlp", "conv", "residual", "concat_minmax", "mixed"])
@pytest.mark.parametrize("p", ["2", "inf"])
def test_interval_bounds_contain_sampled_and_extremal_points(name, p):
    builder = {**NETS, "mixed": _mixed}[name]
    lm, _, shape = _load(builder)
    g = torch.Generator().manual_seed(3)
    x = torch.rand((2,) + shape, generator=g, dtype=torch.float64)
    eps = 0.3 if p == "2" else 0.05
    bounds = preactivation_bounds(lm.graph, x, eps, p)
    assert set(bounds) == set(range(len(lm.graph.nodes)))
    linear = [i for i, n in enumerate(lm.graph.nodes) if n.kind == "linear"]
    for b in range(2):
        xb = x[b:b + 1]
        pts = [_sample_ball(xb, eps, p, 150, g), _sample_ball(xb, eps, p, 100, g, boundary=True), xb]
        pts += [_unit_extremisers(lm.graph, xb, eps, p, i) for i in linear]
        pts = torch.cat(pts)
        assert bool(torch.all(_flat_norm(pts - xb, p) <= eps * (1 + 1e-9)))
        with torch.no_grad():
            vals = lm.graph.forward_all(pts)
        for i, (lb, ub) in bounds.items():
            v = vals[i].reshape(pts.shape[0], -1)
            lo, hi = lb[b].reshape(1, -1), ub[b].reshape(1, -1)
            tol = 1e-9 * (1 + v.abs())
            assert bool(torch.all(v >= lo - tol)), (name, p, i, float((lo - v).max()))
            assert bool(torch.all(v <= hi + tol)), (name, p, i, float((v - hi).max()))
        # the first linear node is bounded exactly: its extremisers attain the bounds
        first = linear[0]
        if lm.graph.nodes[first].inputs == [0]:
            ext = _unit_extremisers(lm.graph, xb, eps, p, first)
            with torch.no_grad():
                v = lm.graph.forward(ext, upto=first).reshape(ext.shape[0], -1)
            n_units = v.shape[1]
            vmax = v[torch.arange(n_units), torch.arange(n_units)]
            vmin = v[n_units + torch.arange(n_units), torch.arange(n_units)]
            lb, ub = bounds[first]
            scale = 1 + ub[b].abs().reshape(-1)
            assert torch.allclose(vmax, ub[b].reshape(-1), rtol=0, atol=0) or \
                bool(torch.all((ub[b].reshape(-1) - vmax).abs() <= 1e-6 * scale))
            assert bool(torch.all((lb[b].reshape(-1) - vmin).abs() <= 1e-6 * scale))


def test_bounds_are_nested_in_eps():
    lm, _, shape = _load(_convnet)
    x = torch.rand((2,) + shape, dtype=torch.float64)
    small = preactivation_bounds(lm.graph, x, 0.1)
    big = preactivation_bounds(lm.graph, x, 0.4)
    for i in small:
        assert bool(torch.all(big[i][0] <= small[i][0] + 1e-12))
        assert bool(torch.all(big[i][1] >= small[i][1] - 1e-12))


# ------------------------------------------------------------------------------------------------
# (b) + (c) local <= global, and >= every empirical difference quotient in the ball


@pytest.mark.parametrize("name", ["mlp", "conv", "residual", "concat_minmax"])
@pytest.mark.parametrize("p", ["2", "inf"])
def test_local_constants_between_empirical_lower_bounds_and_global(name, p):
    lm, ref, shape = _load(NETS[name])
    g = torch.Generator().manual_seed(5)
    x = torch.rand((2,) + shape, generator=g, dtype=torch.float64)
    eps = 0.25 if p == "2" else 0.04
    K_glob = lm.margin_constants(p).K
    res = local_margin_constants(lm.graph, x, eps, p, clamp_to_global=False)
    assert bool(res.sound.all())
    assert bool(torch.all(res.K <= K_glob.unsqueeze(0) * (1 + 1e-9)))
    clamped = local_margin_constants(lm.graph, x, eps, p)
    assert torch.equal(clamped.K, torch.minimum(res.K, K_glob.unsqueeze(0)))
    lip_glob = lm.node_constants(p)[lm.graph.output].cumulative.value
    assert bool(torch.all(res.lipschitz <= lip_glob * (1 + 1e-9)))
    for b in range(2):
        xb = x[b:b + 1]
        a = _sample_ball(xb, eps, p, 300, g)
        c = _project(xb.expand_as(a), a + _sample_ball(torch.zeros_like(xb), eps, p, 300, g, scale=0.05),
                     eps, p)
        lb = _logit_ratios(ref, a, c, p).amax(dim=0)
        far = _sample_ball(xb, eps, p, 300, g, boundary=True)
        lb = torch.maximum(lb, _logit_ratios(ref, far, far.flip(0), p).amax(dim=0))
        lb = torch.maximum(lb, _gradient_lower_bounds(ref, _sample_ball(xb, eps, p, 200, g, scale=0.97), p))
        lb = torch.maximum(lb, _ascent_pairs(ref, xb, eps, p, seed=b))
        K = res.K[b]
        assert bool(torch.all(lb <= K * (1 + 1e-9) + 1e-12)), (lb, K)
        assert float(lb.max()) > 0.05 * float(K.max())  # the oracle is not vacuous
        # the whole logit map: ||f(a) - f(b)|| / ||a - b|| <= lipschitz
        with torch.no_grad():
            d = ref(a) - ref(c)
        ratio = _flat_norm(d, p) / _flat_norm(a - c, p)
        assert float(ratio.max()) <= float(res.lipschitz[b]) * (1 + 1e-9)


@pytest.mark.parametrize("p", ["2", "inf"])
def test_sharp_on_identity_hidden_layer(p):
    """``f = T relu(x + c)``: the local bound is exactly ``||(T_j - T_i) I_V||_q`` and a point of the ball
    where every non-dead unit is active has exactly that gradient norm, so the oracle is two-sided:
    deleting one unit too many (or too few) fails."""
    n, eps = 12, 0.1
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, 3)).eval()
    x = torch.full((1, n), 0.5, dtype=torch.float64)
    # offsets of the pre-activations at x, in units of eps: dead, always active, straddling (active at
    # x for l2, where one push must activate all at once), then just dead / just alive
    mid = [0.3, 0.2, 0.1, 0.05] if p == "2" else [-0.9, -0.5, 0.5, 0.9]
    offs = [-2.0] * 3 + [2.0] * 3 + mid + [-1.01, -0.999]
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(n))
        net[0].bias.copy_(-x[0].float() + eps * torch.tensor(offs))
    lm = lipverify.load(net, input_shape=(n,))
    ref = copy.deepcopy(net).double()
    res = local_margin_constants(lm.graph, x, eps, p, clamp_to_global=False)
    K = res.K[0]
    # the point where every unit with upper bound > 0 is active
    alive = torch.tensor([o > -1.0 for o in offs])
    if p == "inf":
        pt = x + eps * (1 - 1e-6)
    else:
        pt = x.clone()
        pt[0, n - 1] += eps * (1 - 1e-6)  # only the "just alive" unit needs a push
    assert float(_flat_norm(pt - x, p)) <= eps
    lb = _gradient_lower_bounds(ref, pt, p)
    T = net[2].weight.detach().double()[:, alive]
    q = 2.0 if p == "2" else 1.0
    want = torch.cdist(T, T, p=q)
    assert torch.allclose(lb, want, rtol=1e-9, atol=1e-12)  # the oracle attains the bound
    assert torch.allclose(K, want, rtol=1e-5, atol=1e-12)
    assert bool(torch.all(lb <= K * (1 + 1e-9) + 1e-12))
    assert res.varying_fraction[0] == pytest.approx(float(alive.double().mean()))


def test_power_path_estimates_close_to_exact_and_flagged():
    lm, _, shape = _load(_convnet)
    x = torch.rand((3,) + shape, dtype=torch.float64)
    exact = local_margin_constants(lm.graph, x, 0.2, clamp_to_global=False, jacobian=False)
    power = local_margin_constants(lm.graph, x, 0.2, tol=1e-9, max_iter=5000, exact_max_entries=0, gram_max_entries=0,
                                   clamp_to_global=False, jacobian=False, estimate=True)
    assert bool(exact.exact.all()) and int(exact.iterations.max()) == 0 and exact.K_estimate is None
    assert not bool(power.exact.any()) and int(power.iterations.min()) > 0
    assert torch.allclose(power.K_estimate, exact.K, rtol=1e-4, atol=1e-12)
    # estimates approach from below; the certificate without the SVDs is sound, hence not smaller
    assert bool(torch.all(power.K_estimate <= exact.K * (1 + 1e-9) + 1e-12))
    assert bool(power.sound.all()) and bool(torch.all(power.K >= exact.K * (1 - 1e-9)))


# ------------------------------------------------------------------------------------------------
# (d) exact path against a brute-force numpy computation


def _numpy_local_K(net, x, eps, p):
    """Masks and masked matrices recomputed from the weights of a Linear-ReLU-...-Linear net."""
    Ws = [m.weight.detach().double().numpy() for m in net if isinstance(m, nn.Linear)]
    bs = [m.bias.detach().double().numpy() for m in net if isinstance(m, nn.Linear)]
    opn = (lambda M: np.linalg.norm(M, 2)) if p == "2" else (lambda M: np.abs(M).sum(1).max())
    rown = (lambda M: np.linalg.norm(M, axis=1)) if p == "2" else (lambda M: np.abs(M).sum(1))
    out = []
    for xb in x.reshape(x.shape[0], -1).numpy():
        # first layer: exact ranges
        z = Ws[0] @ xb + bs[0]
        rad = eps * rown(Ws[0])
        lb, ub = z - rad, z + rad
        h = np.maximum(z, 0)
        masks = [ub > 0]
        L_prefix = opn(Ws[0])  # global bound of input -> ReLU output
        for W, bias in zip(Ws[1:-1], bs[1:-1]):
            hl, hu = np.maximum(lb, 0), np.maximum(ub, 0)
            c, r = (hl + hu) / 2, (hu - hl) / 2
            z = W @ h + bias
            ibp_l, ibp_u = W @ c + bias - np.abs(W) @ r, W @ c + bias + np.abs(W) @ r
            if p == "2":
                brad = eps * rown(W) * L_prefix
            else:
                brad = eps * (np.abs(W) @ masks[-1].astype(float)) * L_prefix
            lb, ub = np.maximum(ibp_l, z - brad), np.minimum(ibp_u, z + brad)
            h = np.maximum(z, 0)
            masks.append(ub > 0)
            L_prefix *= opn(W)
        L = opn(Ws[0][masks[0], :])
        for k, W in enumerate(Ws[1:-1], start=1):
            L *= opn(W[masks[k]][:, masks[k - 1]])
        T = Ws[-1][:, masks[-1]]
        m = T.shape[0]
        K = np.zeros((m, m))
        for i, j in itertools.product(range(m), range(m)):
            d = T[j] - T[i]
            K[i, j] = (np.linalg.norm(d) if p == "2" else np.abs(d).sum()) * L
        out.append((K, [mk.mean() for mk in masks]))
    return out


@pytest.mark.parametrize("p", ["2", "inf"])
def test_exact_path_matches_numpy_brute_force(p):
    net, shape = _mlp(seed=2, sizes=(5, 7, 6, 3))
    lm = lipverify.load(net, input_shape=shape)
    g = torch.Generator().manual_seed(11)
    x = torch.rand((4,) + shape, generator=g, dtype=torch.float64)
    eps = 0.2 if p == "2" else 0.06
    res = local_margin_constants(lm.graph, x, eps, p, clamp_to_global=False, jacobian=False)
    assert bool(res.sound.all()) and bool(res.exact.all())
    want = _numpy_local_K(net, x, eps, p)
    some_masked = False
    for b, (K, fracs) in enumerate(want):
        np.testing.assert_allclose(res.K[b].numpy(), K, rtol=1e-5, atol=1e-12)
        some_masked |= min(fracs) < 1.0
    assert some_masked  # the test exercises masks
    if p == "2":  # the power path converges to the same numbers
        pw = local_margin_constants(lm.graph, x, eps, p, clamp_to_global=False, exact_max_entries=0, gram_max_entries=0,
                                    tol=1e-10, max_iter=5000, jacobian=False, estimate=True)
        for b, (K, _) in enumerate(want):
            np.testing.assert_allclose(pw.K_estimate[b].numpy(), K, rtol=1e-4, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# (e) monotone in eps, (f) strictly tighter when ReLUs are dead


@pytest.mark.parametrize("name", ["mlp", "conv"])
@pytest.mark.parametrize("p", ["2", "inf"])
def test_monotone_in_eps(name, p):
    lm, _, shape = _load(NETS[name])
    x = torch.rand((2,) + shape, dtype=torch.float64)
    scale = 1.0 if p == "2" else 0.15
    prev_K, prev_f = None, None
    for eps in [0.0, 0.01, 0.03, 0.1, 0.2, 0.4, 0.8, 2.0]:
        r = local_margin_constants(lm.graph, x, eps * scale, p)
        if prev_K is not None:
            assert bool(torch.all(r.K >= prev_K * (1 - 1e-12))), eps
            assert all(a >= b for a, b in zip(r.varying_fraction, prev_f))
        prev_K, prev_f = r.K, r.varying_fraction
    assert torch.allclose(prev_K, lm.margin_constants(p).K.expand_as(prev_K), rtol=1e-6) or \
        bool(torch.all(prev_K <= lm.margin_constants(p).K))


@pytest.mark.parametrize("p", ["2", "inf"])
def test_dead_relus_make_local_strictly_smaller(p):
    net, shape = _mlp(seed=4, sizes=(10, 32, 16, 4))
    with torch.no_grad():
        net[0].bias[:26] = -20.0  # 26 of 32 first-layer units dead around x in [0, 1]^10
    lm = lipverify.load(net, input_shape=shape)
    x = torch.rand((3,) + shape, dtype=torch.float64)
    eps = 0.1 if p == "2" else 0.02
    res = local_margin_constants(lm.graph, x, eps, p)
    K_glob = lm.margin_constants(p).K
    off = ~torch.eye(4, dtype=torch.bool)
    assert res.varying_fraction[0] <= 6 / 32
    assert bool(torch.all(res.K[:, off] < 0.8 * K_glob[off]))


# ------------------------------------------------------------------------------------------------
# batch independence, per-example eps, warm starts, result fields


@pytest.mark.parametrize("exact_max_entries", [250_000, 0])
def test_batch_independence(exact_max_entries):
    lm, _, shape = _load(_convnet)
    x = torch.rand((4,) + shape, dtype=torch.float64)
    eps = torch.tensor([0.05, 0.2, 0.5, 0.1], dtype=torch.float64)
    batch = local_margin_constants(lm.graph, x, eps, exact_max_entries=exact_max_entries)
    for b in range(4):
        one = local_margin_constants(lm.graph, x[b:b + 1], float(eps[b]), exact_max_entries=exact_max_entries)
        assert torch.allclose(batch.K[b], one.K[0], rtol=1e-9, atol=1e-12)
        assert torch.allclose(batch.lipschitz[b], one.lipschitz[0], rtol=1e-9)
        assert bool(batch.sound[b] == one.sound[0])
        assert int(batch.iterations[b]) == int(one.iterations[0])
    masks = varying_masks(lm.graph, x, eps)
    for b in range(4):
        one = varying_masks(lm.graph, x[b:b + 1], float(eps[b]))
        for i in masks:
            assert torch.equal(masks[i][b], one[i][0])


def test_result_fields_and_warm_start_cache():
    lm, _, shape = _load(_convnet)
    x = torch.rand((3,) + shape, dtype=torch.float64)
    ws: dict = {}
    r1 = local_margin_constants(lm.graph, x, 0.3, exact_max_entries=0, gram_max_entries=0, warm_start=ws, estimate=True)
    linear = [i for i, n in enumerate(lm.graph.nodes) if n.kind == "linear"]
    assert any(i in ws for i in linear)  # unmasked singular vectors cached under the node index
    r2 = local_margin_constants(lm.graph, x, 0.3, exact_max_entries=0, gram_max_entries=0, warm_start=ws, estimate=True)
    assert torch.equal(r1.K, r2.K) and torch.equal(r1.K_estimate, r2.K_estimate)
    assert bool(torch.all(r1.K_estimate <= r1.K))
    assert r1.K.dtype == torch.float64 and r1.K.shape == (3, 3, 3)
    assert r1.lipschitz.shape == (3,) and r1.sound.dtype == torch.bool
    assert r1.iterations.shape == (3,) and r1.iterations.dtype == torch.int64
    n_act = sum(1 for n in lm.graph.nodes if n.kind == "activation")
    assert len(r1.varying_fraction) == n_act and all(0 <= f <= 1 for f in r1.varying_fraction)
    assert torch.equal(r1.K, r1.K.transpose(1, 2)) and bool(torch.all(r1.K.diagonal(dim1=1, dim2=2) == 0))


def test_activations_without_constant_regions_keep_every_unit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    lm = lipverify.load(net, input_shape=(6,))
    r = local_margin_constants(lm.graph, torch.rand(2, 6, dtype=torch.float64), 0.5)
    assert r.varying_fraction == [1.0]


def test_rejects_bad_arguments():
    lm, _, shape = _load(_mlp)
    x = torch.rand((2,) + shape)
    with pytest.raises(ValueError):
        local_margin_constants(lm.graph, x, -0.1)
    with pytest.raises(ValueError):
        local_margin_constants(lm.graph, x, 0.1, "1")
    with pytest.raises(ValueError):
        local_margin_constants(lm.graph, x, torch.tensor([0.1, 0.2, 0.3]))


# ------------------------------------------------------------------------------------------------
# the new LinearOp methods against materialised matrices


def _ops():
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    conv_a = Conv(r(4, 2, 3, 3), (2, 7, 6), (2, 1), (1, 1), (1, 2), 1)
    conv_g = Conv(r(4, 1, 3, 2), (2, 5, 5), (1, 2), (0, 1, 2, 0), (1, 1), 2)
    conv_1d = Conv(r(3, 2, 3), (2, 9), (2,), (1, 2), (1,), 1, one_d=True)
    scale = Scale(r(2, 1, 1), (2, 7, 6))
    sel = Select(torch.tensor([3, -1, 0, 0, 5, 2]), (6,), (6,))
    dense = Dense(r(5, 6), (6,))
    same = Conv(r(2, 2, 3, 3), (2, 5, 5), (1, 1), (1, 1), (1, 1), 1)
    convt = ConvTranspose(r(2, 3, 3, 3), (2, 4, 5), (2, 2), (1, 1), (1, 0), (1, 1), 1)
    exact = {"dense": dense, "dense_md": Dense(r(3, 4), (2, 4)), "conv": conv_a, "conv_groups": conv_g,
             "conv1d": conv_1d, "scale": scale, "select": sel, "conv_transpose": convt}
    upper = {"chain": Chain([scale, conv_a]), "chain_dense": Chain([sel, dense]),
             "residual_conv": Residual([identity_select((2, 5, 5)), same], [1.0, -0.5]),
             "residual": Residual([dense, Dense(r(5, 6), (6,))], [1.0, -2.0])}
    return exact, upper


@pytest.mark.parametrize("which", ["exact", "upper"])
def test_abs_apply_and_row_norms_against_matrices(which):
    exact, upper = _ops()
    ops = exact if which == "exact" else upper
    for name, op in ops.items():
        op = op.to_double_copy()
        M = op.matrix(torch.float64)
        x = torch.rand((3,) + op.in_shape, dtype=torch.float64)
        want = (x.reshape(3, -1) @ M.abs().T).reshape((3,) + op.out_shape)
        got = op.abs_apply(x)
        assert got.shape == want.shape, name
        for q, ref in (("2", M.norm(dim=1)), ("1", M.abs().sum(dim=1))):
            rn = op.row_norms(q)
            assert rn.shape == op.out_shape and rn.dtype == torch.float64, name
            if which == "exact":
                assert torch.allclose(rn.reshape(-1), ref, rtol=1e-12, atol=1e-12), (name, q)
            else:
                assert bool(torch.all(rn.reshape(-1) >= ref * (1 - 1e-12) - 1e-12)), (name, q)
        y = torch.rand((3,) + op.out_shape, dtype=torch.float64)
        want_t = (y.reshape(3, -1) @ M.abs()).reshape((3,) + op.in_shape)
        got_t = op.abs_adjoint(y)
        assert got_t.shape == want_t.shape, name
        if which == "exact":
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), name
            assert torch.allclose(got_t, want_t, rtol=1e-12, atol=1e-12), name
        else:
            assert bool(torch.all(got >= want * (1 - 1e-12) - 1e-12)), name
            assert bool(torch.all(got_t >= want_t * (1 - 1e-12) - 1e-12)), name
    with pytest.raises(ValueError):
        exact["dense"].row_norms("inf")
