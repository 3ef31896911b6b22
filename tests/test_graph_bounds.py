"""Bounds over the Lipschitz graph, checked against independent oracles.

Oracles: the exact Jacobian of linear networks (autograd in float64 + SVD), the impulse-response
operator matrix of single layers, known values (orthonormal dense 1, 2x2 average pool 1/2, identity
residual 1), and sampled / gradient-ascent-optimised difference quotients on random networks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import lipverify
from lipverify.errors import UnsupportedOpError

REL = 1e-6


def jac_matrix(module: nn.Module, shape) -> torch.Tensor:
    """Operator matrix (out_dim x in_dim) of an affine network from impulse responses, in float64."""
    m = module.double()
    n = math.prod(shape)
    with torch.no_grad():
        f0 = m(torch.zeros((1,) + tuple(shape), dtype=torch.float64)).reshape(1, -1)
        cols = [m(e.reshape((-1,) + tuple(shape))).reshape(len(e), -1) - f0
                for e in torch.eye(n, dtype=torch.float64).split(512)]
    module.float()
    return torch.cat(cols).T


def exact_l2(module, shape) -> float:
    return float(torch.linalg.matrix_norm(jac_matrix(module, shape), ord=2))


def exact_linf(module, shape) -> float:
    return float(jac_matrix(module, shape).abs().sum(1).max())


def global_bound(module, shape, norm="2", **kw):
    """The proven global bound of the imported module (its output node's cumulative constant, which
    ``bounds`` reports; without the margin constants, which on the headless nets here would pair
    thousands of outputs)."""
    lm = lipverify.load(module, input_shape=shape, **kw)
    return lm.node_constants(norm, "sound")[lm.graph.output].cumulative


# ------------------------------------------------------------------------------------------------
# linear networks: the bound is an upper bound of the exact norm, and exact where the op is merged


@pytest.mark.parametrize("sizes", [(7, 5), (20, 30, 4), (16, 16, 16, 3)])
def test_dense_chain_merged_equals_exact(sizes):
    layers = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
    net = nn.Sequential(*layers)
    exact = exact_l2(net, (sizes[0],))
    g = global_bound(net, (sizes[0],))
    assert g.sound
    assert exact <= g.value <= exact * (1 + 1e-5)
    gi = global_bound(net, (sizes[0],), norm="inf")
    assert exact_linf(net, (sizes[0],)) <= gi.value * (1 + 1e-12)


def test_single_dense_matches_matrix_norm():
    lin = nn.Linear(37, 23)
    lm = lipverify.load(nn.Sequential(lin), input_shape=(37,))
    rows = lm.bounds("2").layers
    want = float(torch.linalg.matrix_norm(lin.weight.double(), ord=2))
    assert rows[0].lipschitz == pytest.approx(want, rel=2e-6)
    assert rows[0].lipschitz >= want
    rows_inf = lm.bounds("inf").layers
    assert rows_inf[0].lipschitz == pytest.approx(float(lin.weight.double().abs().sum(1).max()), rel=2e-6)


def test_orthonormal_dense_is_one():
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    lin = nn.Linear(12, 12, bias=False)
    lin.weight.data = q.float()
    g = global_bound(nn.Sequential(lin), (12,))
    assert g.value == pytest.approx(1.0, abs=1e-5)


def test_avgpool_two_by_two_is_half():
    g = global_bound(nn.Sequential(nn.AvgPool2d(2, 2)), (3, 8, 8))
    assert g.value == pytest.approx(0.5, rel=1e-5)
    lm = lipverify.load(nn.Sequential(nn.AvgPool2d(2, 2)), input_shape=(16, 32, 32))  # FFT path
    big = lm.node_constants("2")[lm.graph.output].cumulative
    assert big.value == pytest.approx(0.5, rel=1e-5) and big.sound


class Residual(nn.Module):
    def __init__(self, c, zero=False, act=False):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = act
        if zero:
            nn.init.zeros_(self.conv.weight)

    def forward(self, x):
        y = self.conv(x)
        return x + (torch.relu(y) if self.act else y)


def test_identity_residual_block_is_one():
    g = global_bound(Residual(4, zero=True), (4, 6, 6))
    assert g.value == pytest.approx(1.0, abs=1e-5)
    g2 = global_bound(Residual(8, zero=True), (8, 24, 24))  # FFT path with the folded centre tap
    assert g2.value == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("size", [5, 20])
def test_linear_residual_merged(size):
    torch.manual_seed(3)
    net = Residual(4)
    exact = exact_l2(net, (4, size, size))
    g = global_bound(net, (4, size, size))
    assert g.value >= exact * (1 - 1e-9)
    # merged I + W is far tighter than 1 + ||W||
    w_norm = global_bound(nn.Sequential(net.conv), (4, size, size)).value
    assert g.value < 1 + w_norm
    if size == 5:  # small enough to materialise: exact
        assert g.value == pytest.approx(exact, rel=1e-5)


CONV_CASES = [
    dict(cin=3, cout=5, k=3, stride=1, padding=1, dilation=1, groups=1),
    dict(cin=4, cout=6, k=4, stride=2, padding=1, dilation=1, groups=2),
    dict(cin=4, cout=4, k=3, stride=1, padding=2, dilation=2, groups=4),
    dict(cin=2, cout=3, k=5, stride=3, padding=0, dilation=1, groups=1),
    dict(cin=6, cout=4, k=2, stride=2, padding=0, dilation=1, groups=1),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("size", [7, 16])
def test_conv_layer_vs_impulse_response_svd(case, size):
    conv = nn.Conv2d(case["cin"], case["cout"], case["k"], stride=case["stride"], padding=case["padding"],
                     dilation=case["dilation"], groups=case["groups"])
    shape = (case["cin"], size, size)
    exact = exact_l2(nn.Sequential(conv), shape)
    lm = lipverify.load(nn.Sequential(conv), input_shape=shape)
    # the layer's constant as ``bounds`` reports it (node constants: no margin constants of the
    # thousands of headless outputs)
    (row,) = [c.constant for c in lm.node_constants("2") if c.kind == "linear"]
    assert row.sound and row.value >= exact * (1 - 1e-9)
    assert row.value <= 1.6 * exact
    (rinf,) = [c.constant for c in lm.node_constants("inf") if c.kind == "linear"]
    assert rinf.sound and rinf.value >= exact_linf(nn.Sequential(conv), shape) * (1 - 1e-9)


def test_normalisation_conv_batchnorm_chain_is_folded():
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(6)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.2, 3)
    bn.weight.data.uniform_(-2, 2)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), bn).eval()
    shape = (3, 24, 24)  # too large for the exact path: folding must do the work
    mean, std = "0.4,0.5,0.6", "0.2,0.3,0.25"
    lm = lipverify.load(net, input_shape=shape, mean=mean, std=std)
    consts = lm.node_constants("2")
    assert len([c for c in consts if c.kind == "linear"]) == 1  # one merged operator
    total = consts[lm.graph.output].cumulative.value
    full = nn.Sequential(lipverify.importers.normalize.Normalize(torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1),
                                                     torch.tensor([0.2, 0.3, 0.25]).view(3, 1, 1)), net)
    exact = exact_l2(full, shape)
    prod = (1 / 0.2) * global_bound(nn.Sequential(net[0]), shape).value * float(
        (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().max())
    assert exact * (1 - 1e-9) <= total < prod
    assert total <= 1.3 * exact


def test_outside_normalisation_scales_bound():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    g1 = global_bound(net, (1, 4, 4)).value
    g2 = global_bound(net, (1, 4, 4), mean="0.5", std="0.25").value
    assert g2 == pytest.approx(4 * g1, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# soundness on random nonlinear networks


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.b1 = nn.Conv2d(4, 4, 3, padding=1)
        self.b2 = nn.Conv2d(4, 4, 3, padding=1)
        self.short = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.b2(torch.tanh(self.b1(x)))
        x = torch.relu(self.bn(y + self.short(x)))
        x = self.pool(x)
        return self.fc(torch.flatten(x, 1))


def random_nets():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(12)
    bn.running_var.uniform_(0.5, 2)
    return [
        ("mlp", nn.Sequential(nn.Linear(6, 12), bn, nn.ReLU(), nn.Linear(12, 12), nn.LeakyReLU(0.2),
                              nn.Linear(12, 4)).eval(), (6,)),
        ("conv", nn.Sequential(nn.Conv2d(2, 4, 3, stride=2), nn.Sigmoid(), nn.Conv2d(4, 4, 2), nn.ReLU(),
                               nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 1 * 1, 3)).eval(), (2, 8, 8)),
        ("resnet", ResNetish().eval(), (1, 8, 8)),
    ]


def _ascent_ratio(model, shape, pair, p, steps=150, restarts=4):
    """Gradient ascent on |m(a) - m(b)| / ||a - b||_p: a lower bound on the margin constant."""
    j, i = pair
    best = 0.0
    for r in range(restarts):
        g = torch.Generator().manual_seed(r)
        a = torch.randn((16,) + shape, generator=g, dtype=torch.float64).requires_grad_(True)
        b = (a.detach() + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
        opt = torch.optim.Adam([a, b], lr=0.02)
        for _ in range(steps):
            fa, fb = model(a), model(b)
            num = (fa[:, j] - fa[:, i]) - (fb[:, j] - fb[:, i])
            den = (a - b).flatten(1).norm(p=2 if p == "2" else float("inf"), dim=1)
            ratio = num.abs() / den.clamp_min(1e-12)
            best = max(best, float(ratio.max()))
            opt.zero_grad()
            (-ratio.sum()).backward()
            opt.step()
    return best


@pytest.mark.parametrize("name,net,shape", random_nets(), ids=[n for n, _, _ in random_nets()])
@pytest.mark.parametrize("p", ["2", "inf"])
def test_optimised_ratios_never_exceed_bounds(name, net, shape, p):
    lm = lipverify.load(net, input_shape=shape)
    K = lm.margin_constants(p).K
    glob = lm.bounds(p).global_bound.value
    model = net.double()
    m = K.shape[0]
    # random sampling of many pairs: every margin and the whole logit map
    g = torch.Generator().manual_seed(5)
    a = torch.randn((4000,) + shape, generator=g, dtype=torch.float64)
    b = a + 0.05 * torch.randn(a.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        fa, fb = model(a), model(b)
    pn = 2 if p == "2" else float("inf")
    dx = (a - b).flatten(1).norm(p=pn, dim=1)
    assert float(((fa - fb).norm(p=pn, dim=1) / dx).max()) <= glob * (1 + 1e-9)
    for j in range(m):
        for i in range(m):
            if i == j:
                continue
            d = ((fa[:, j] - fa[:, i]) - (fb[:, j] - fb[:, i])).abs() / dx
            assert float(d.max()) <= float(K[j, i]) * (1 + 1e-9)
    for pair in [(0, 1), (m - 1, 0)]:
        r = _ascent_ratio(model, shape, pair, p)
        assert 0 < r <= float(K[pair]) * (1 + 1e-9)
    net.float()


def test_power_estimates_are_below_sound_bounds_and_labelled():
    net = random_nets()[1][1]
    lm = lipverify.load(net, input_shape=(2, 8, 8))
    s = lm.bounds("2", "sound")
    pw = lm.bounds("2", "power")
    assert not pw.global_bound.sound and s.global_bound.sound
    for rs, rp in zip(s.layers, pw.layers):
        if rs.kind == "linear":
            assert not rp.sound
            assert rp.lipschitz <= rs.lipschitz * (1 + 1e-6)
            assert rp.lipschitz >= 0.98 * rs.lipschitz / 1.6  # FFT may be looser than the true norm


# ------------------------------------------------------------------------------------------------
# refusals and notes


class Weird(nn.Module):
    def forward(self, x):
        y = torch.sin(x)
        z = x / (x + 2.0)
        return torch.flatten(y + z, 1)


def test_unsupported_ops_are_all_listed():
    with pytest.raises(UnsupportedOpError) as ei:
        lipverify.load(Weird(), input_shape=(3,))
    names = {op.split(" ")[0] for op, _ in ei.value.nodes}
    assert "sin" in names and any("div" in n for n in names)
    assert "sin" in str(ei.value) and "division by an input-dependent tensor" in str(ei.value)


def test_trailing_softmax_is_stripped_with_note():
    net = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1))
    lm = lipverify.load(net, input_shape=(4,))
    assert any("Softmax" in n for n in lm.notes)
    x = torch.randn(5, 4)
    assert torch.allclose(lm.graph.forward(x), net[0](x), atol=1e-6)
    mid = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1), nn.Linear(3, 2))
    with pytest.raises(UnsupportedOpError):
        lipverify.load(mid, input_shape=(4,))


def test_graph_reproduces_model_on_other_batch_sizes():
    net = ResNetish().eval()
    lm = lipverify.load(net, input_shape=(1, 8, 8))
    for b in (1, 7):
        x = torch.rand(b, 1, 8, 8)
        assert torch.allclose(lm.graph.forward(x), net(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# ONNX round trip


def test_onnx_round_trip(tmp_path):
    net = ResNetish().eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    a = lipverify.load(net, input_shape=(1, 8, 8))
    b = lipverify.load(str(path))
    assert b.fidelity is not None and b.fidelity.passed and b.fidelity.max_abs_diff < 1e-4
    x = torch.rand(6, 1, 8, 8)
    assert torch.allclose(a(x), b(x), atol=1e-5)
    for p in ("2", "inf"):
        ra, rb = a.bounds(p), b.bounds(p)
        assert rb.global_bound.value == pytest.approx(ra.global_bound.value, rel=1e-5)
        assert torch.allclose(torch.tensor(rb.margin.K), torch.tensor(ra.margin.K), rtol=1e-5)


def test_margin_constants_exact_for_affine_tail():
    lin1, lin2 = nn.Linear(5, 8), nn.Linear(8, 4)
    net = nn.Sequential(lin1, nn.ReLU(), lin2)
    lm = lipverify.load(net, input_shape=(5,))
    K = lm.margin_constants("2").K
    s1 = float(torch.linalg.matrix_norm(lin1.weight.double(), ord=2))
    W = lin2.weight.double()
    for i in range(4):
        for j in range(4):
            want = 0.0 if i == j else float((W[i] - W[j]).norm()) * s1
            assert float(K[i, j]) == pytest.approx(want, rel=1e-5)
    Kinf = lm.margin_constants("inf").K
    s1i = float(lin1.weight.double().abs().sum(1).max())
    assert float(Kinf[0, 1]) == pytest.approx(float((W[0] - W[1]).abs().sum()) * s1i, rel=1e-5)
    assert math.isclose(float(K[2, 2]), 0.0)


def test_liresnet_block_bounded_as_one_convolution():
    """x + s*beta*conv(x) (LiResNet): identity folded into the centre tap of the scaled kernel."""
    from lipverify.models.zoo import ScaledResidualConv

    torch.manual_seed(7)
    blk = ScaledResidualConv(4, 0.5).eval()
    with torch.no_grad():
        blk.beta.uniform_(0.5, 1.5)
    shape = (4, 12, 12)
    lm = lipverify.load(nn.Sequential(blk), input_shape=shape)
    rows = [r for r in lm.bounds("2").layers if r.kind == "linear"]
    assert len(rows) == 1 and "centre tap" in rows[0].method
    exact = exact_l2(nn.Sequential(blk), shape)
    conv_only = global_bound(nn.Sequential(blk.conv), shape).value
    assert exact * (1 - 1e-9) <= rows[0].lipschitz <= 1.3 * exact
    assert rows[0].lipschitz < 1 + 0.5 * 1.5 * conv_only


def test_pairwise_distances_never_cancel_a_small_distance():
    """Rows of norm 1e4 that differ by 1e-6: the Gram shortcut |a|^2 + |b|^2 - 2 a.b loses the
    difference; both paths (explicit differences, Gram with its rounding term) stay above the exact
    distance (computed with fractions) and the explicit one is within 1e-9 of it."""
    from fractions import Fraction

    from lipverify.bounds.global_bound import pairwise_distances

    torch.manual_seed(0)
    base = torch.randn(1, 40, dtype=torch.float64) * 1e4 / 6
    rows = base + torch.randn(30, 40, dtype=torch.float64) * 1e-6
    exact = torch.tensor([[float(sum((Fraction(float(a)) - Fraction(float(b))) ** 2
                                     for a, b in zip(rows[i], rows[j]))) ** 0.5 for j in range(30)]
                          for i in range(30)], dtype=torch.float64)
    direct = pairwise_distances(rows, "2")
    assert torch.allclose(direct, exact, rtol=1e-9, atol=0)
    chunked = pairwise_distances(rows, "2", max_entries=1)  # explicit differences, one row at a time
    assert torch.allclose(chunked, exact, rtol=1e-9, atol=0)
    big = rows.repeat(20, 60)  # 600 rows of 2400 entries: the Gram path
    g = pairwise_distances(big, "2")
    ref = torch.linalg.vector_norm(big[:40, None] - big[None, :40], dim=2)
    assert bool((g[:40, :40] >= ref).all())
    naive = torch.cdist(big[:40], big[:40], compute_mode="use_mm_for_euclid_dist")
    assert bool((naive < ref * 0.5).any())  # the shortcut alone does lose them
