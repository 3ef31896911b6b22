"""Products of input-dependent tensors and data-dependent normalisations, bounded on the input domain:
interval bounds and the exact minimum variance against brute force, every bound against sampled
Jacobian norms and difference quotients inside the domain, in all three import formats."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import lipverify
from lipverify.bounds.global_bound import propagate
from lipverify.errors import UserInputError
from lipverify.graph.domain import interval_bounds, min_variance


def test_min_variance_exact_on_two_intervals_and_below_every_sample():
    rng = np.random.default_rng(0)
    for _ in range(50):
        l = rng.uniform(-1, 1, size=2)
        u = l + rng.uniform(0, 1, size=2)
        gap = max(0.0, max(l) - min(u))
        # var of two numbers is (x1 - x2)^2 / 4: the closest points of the intervals
        got = float(min_variance(torch.tensor(l)[None], torch.tensor(u)[None]))
        assert got == pytest.approx(gap ** 2 / 4, rel=1e-7, abs=1e-12)
        assert got <= gap ** 2 / 4
    for n in (3, 5):
        for _ in range(20):
            l = rng.uniform(-1, 1, size=n)
            u = l + rng.uniform(0, 0.5, size=n)
            got = float(min_variance(torch.tensor(l)[None], torch.tensor(u)[None]))
            grid = np.stack(np.meshgrid(*[np.linspace(a, b, 9) for a, b in zip(l, u)]), -1).reshape(-1, n)
            sampled = grid.var(axis=1).min()
            assert got <= sampled + 1e-12
            # and tight: projected-gradient descent on the box reaches it
            x = (l + u) / 2
            for _ in range(3000):
                x = np.clip(x - 0.1 * (x - x.mean()), l, u)
            assert x.var() >= got - 1e-12 and x.var() <= got + 1e-6


class GatedNet(nn.Module):
    """Conv -> squeeze-excitation gate -> GroupNorm -> InstanceNorm -> channels-last LayerNorm -> dense."""

    def __init__(self, c=6, hw=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(c, 3, 1), nn.Conv2d(3, c, 1)
        self.gn = nn.GroupNorm(2, c)
        self.inorm = nn.InstanceNorm2d(c, affine=True)
        self.ln = nn.LayerNorm(c)
        with torch.no_grad():
            for m in (self.gn, self.inorm, self.ln):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        self.out = nn.Linear(c * hw * hw, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        y = self.gn(y * g)
        y = self.inorm(y)
        y = self.ln(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.out(y.flatten(1))


def _jac_norm(f, x, p):
    J = torch.autograd.functional.jacobian(lambda z: f(z.reshape(x.shape)).reshape(-1), x.reshape(-1))
    return float(torch.linalg.matrix_norm(J, 2)) if p == "2" else float(J.abs().sum(1).max())


def _load(net, fmt, tmp_path, shape):
    if fmt == "module":
        return lipverify.load(net.eval(), input_shape=shape)
    x = torch.rand(2, *shape)
    if fmt == "onnx":
        path = tmp_path / "m.onnx"
        torch.onnx.export(net.eval(), x, str(path), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "b"}})
        return lipverify.load(path)
    path = tmp_path / "m.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(net.eval(), (x,), dynamic_shapes=({0: batch},)), str(path))
    return lipverify.load(path)


@pytest.mark.parametrize("fmt", ["module", "onnx", "pt2"])
def test_gated_normalised_net_bounded_on_the_domain_in_every_format(tmp_path, fmt):
    shape = (3, 5, 5)
    net = GatedNet()
    lm = _load(net, fmt, tmp_path, shape)
    kinds = [n.kind for n in lm.graph.nodes]
    assert "mul" in kinds and kinds.count("normalization") == 3, kinds
    f64 = lm.module_double()
    for lo, hi in ((0.0, 1.0), (0.4, 0.6)):
        lm.set_domain(lo, hi)
        for p in ("2", "inf"):
            rep = lm.bounds(p)
            assert rep.domain == [lo, hi] and "holds on the input domain" in rep.global_bound.method
            L = rep.global_bound.value
            gen = torch.Generator().manual_seed(1)
            for _ in range(6):
                x = lo + (hi - lo) * torch.rand((1, *shape), generator=gen, dtype=torch.float64)
                assert _jac_norm(f64, x, p) <= L
                y = (x + 1e-3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(lo, hi)
                d = (f64(x) - f64(y)).reshape(-1)
                dx = (x - y).reshape(-1)
                q = float(d.norm() / dx.norm()) if p == "2" else float(d.abs().max() / dx.abs().max())
                assert q <= L
    # a smaller domain gives a smaller (or equal) bound
    lm.set_domain(0.0, 1.0)
    wide = lm.bounds("2").global_bound.value
    lm.set_domain(0.45, 0.55)
    assert lm.bounds("2").global_bound.value <= wide


def test_intervals_enclose_every_node_on_sampled_inputs():
    net = GatedNet(seed=3)
    lm = lipverify.load(net.eval(), input_shape=(3, 5, 5))
    g = lm.graph
    g64 = [n.op.to_double_copy() if n.kind == "linear" else None for n in g.nodes]
    ibp = interval_bounds(g, 0.2, 0.7)
    xs = 0.2 + 0.5 * torch.rand(64, 3, 5, 5, dtype=torch.float64)
    corners = torch.tensor(list(itertools.product([0.2, 0.7], repeat=3)), dtype=torch.float64)
    xs = torch.cat([xs, corners[:, :, None, None].expand(8, 3, 5, 5)])
    vals: list = [None] * len(g.nodes)
    from lipverify.graph import apply_node

    for i, n in enumerate(g.nodes):
        if n.kind == "input":
            vals[i] = xs
        elif n.kind == "linear":
            vals[i] = g64[i].forward(vals[n.inputs[0]])
        else:
            vals[i] = apply_node(n, [vals[j] for j in n.inputs])
        lb, ub = ibp[i]
        assert bool((vals[i] >= lb - 1e-12).all() and (vals[i] <= ub + 1e-12).all()), (i, n.kind)


def test_layernorm_constant_is_attained_near_constant_inputs():
    """The global constant max|gamma|/sqrt(eps) is the Jacobian norm's limit at inputs of zero variance."""
    ln = nn.LayerNorm(8, eps=1e-3)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2.0)
    net = nn.Sequential(ln, nn.Identity())
    lm = lipverify.load(net.eval(), input_shape=(8,))
    consts = propagate(lm.graph, "2")  # no domain: the constant that holds everywhere
    L = consts[lm.graph.output].cumulative.value
    assert L == pytest.approx(float(ln.weight.abs().max()) / np.sqrt(1e-3), rel=1e-9)
    x = torch.full((1, 8), 0.3, dtype=torch.float64) + 1e-7 * torch.randn(1, 8, dtype=torch.float64)
    J = _jac_norm(lm.module_double(), x, "2")
    assert 0.5 * L <= J <= L


def test_products_need_a_domain_and_refusals_are_clean(tmp_path):
    net = GatedNet()
    lm = lipverify.load(net.eval(), input_shape=(3, 5, 5))
    with pytest.raises(UserInputError, match="no global Lipschitz constant"):
        propagate(lm.graph, "2")
    x = torch.rand(6, 3, 5, 5)
    x[0, 0, 0, 0] = 1.5  # outside the default domain [0, 1]
    res = lm.certify(x, lm.module(x).argmax(1), eps=[1e-9])
    assert res.inputs[0].certified is False and res.inputs[0].radius == 0.0
    assert any("input domain [0, 1]" in n for n in res.notes)
    path = tmp_path / "m.onnx"
    torch.onnx.export(net.eval(), x[:1], str(path), dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "b"}})
    data = tmp_path / "d.npz"
    np.savez(data, x=torch.rand(4, 3, 5, 5).numpy(), y=np.zeros(4, dtype=np.int64))
    from lipverify.cli import main

    r = CliRunner().invoke(main, ["certify", str(path), "--data", str(data), "--method", "local", "--eps", "0.01",
                                  "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    assert any("input domain [0, 1]" in n for n in json.loads(r.stdout)["notes"])
    r = CliRunner().invoke(main, ["bounds", str(path), "--clip", "0,0.5", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["domain"] == [0.0, 0.5]
    cmd = [sys.executable, "-m", "lipverify"]  # the refusal in its own process: exit 2, no traceback
    r = subprocess.run(cmd + ["finetune", str(path), "--data", str(data), "--eps", "0.1", "--out",
                              str(tmp_path / "ft"), "--epochs", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "input domain" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("p", ["2", "inf"])
def test_local_bounds_on_the_ball_inside_the_domain(p):
    """Local bounds of a gated, normalised net: below the global (domain) bound, above every difference
    quotient between points of the ball that lie in the domain, and local certificates never exceed
    the attack's radius."""
    from lipverify.attacks import min_norm_radius
    from lipverify.bounds.local import local_margin_constants

    net = GatedNet(seed=5)
    lm = lipverify.load(net.eval(), input_shape=(3, 5, 5))
    f64 = lm.module_double()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand((5, 3, 5, 5), generator=gen, dtype=torch.float64)
    x[0, 0, 0, 0] = 0.0  # on the edge of the domain: only the inside half of its ball counts
    eps = 0.02
    res = local_margin_constants(lm.graph, x, eps, p, domain=lm.effective_domain(), clamp_to_global=False)
    glob = lm.bounds(p).global_bound.value
    assert bool((res.lipschitz <= glob * (1 + 1e-9)).all())
    for b in range(len(x)):
        for _ in range(20):
            d = torch.rand(x[b].shape, generator=gen, dtype=torch.float64) * 2 - 1
            d = d * eps / (d.abs().max() if p == "inf" else d.norm())
            y, z = (x[b] + d).clamp(0, 1), (x[b] - 0.5 * d).clamp(0, 1)
            num = (f64(y[None]) - f64(z[None])).reshape(-1)
            den = (y - z).reshape(-1)
            q = float(num.norm() / den.norm()) if p == "2" else float(num.abs().max() / den.abs().max())
            assert q <= float(res.lipschitz[b]) * (1 + 1e-9)
    if p == "2":
        xs = torch.rand((6, 3, 5, 5), generator=gen).float()
        y = lm.module(xs).argmax(1)
        cert = lm.certify(xs, y, method="local")
        adv = min_norm_radius(lm.module, xs, y, norm="2", clip=(0.0, 1.0))
        for c, r in zip(cert.inputs, adv.radius.tolist()):
            assert c.radius <= r + 1e-9


class TinyViT(nn.Module):
    """Patch embedding, class token, positional embedding, one pre-norm encoder block, class-token head."""

    def __init__(self, seed=0, e=12, heads=3):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Conv2d(3, e, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, e) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, e) * 0.1)
        self.ln1, self.ln2 = nn.LayerNorm(e), nn.LayerNorm(e)
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(e, 2 * e), nn.GELU(), nn.Linear(2 * e, e))
        self.head = nn.Linear(e, 4)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        h = self.ln1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.mlp(self.ln2(t))
        return self.head(t[:, 0])


@pytest.mark.parametrize("p", ["2", "inf"])
def test_self_attention_bounded_on_the_domain(p, tmp_path):
    """nn.MultiheadAttention (module and state-dict imports): global bound on the domain and local
    bounds on balls inside it, both above every sampled Jacobian norm / difference quotient there."""
    from lipverify.bounds.local import local_margin_constants

    net = TinyViT().eval()
    lm = lipverify.load(net, input_shape=(3, 8, 8))
    assert "attention" in [n.kind for n in lm.graph.nodes]
    f64 = lm.module_double()
    gen = torch.Generator().manual_seed(4)
    for lo, hi in ((0.0, 1.0), (0.3, 0.5)):
        lm.set_domain(lo, hi)
        L = lm.bounds(p).global_bound.value
        for _ in range(5):
            x = lo + (hi - lo) * torch.rand((1, 3, 8, 8), generator=gen, dtype=torch.float64)
            assert _jac_norm(f64, x, p) <= L
    lm.set_domain(0.0, 1.0)
    x = torch.rand((3, 3, 8, 8), generator=gen, dtype=torch.float64)
    eps = 0.01
    res = local_margin_constants(lm.graph, x, eps, p, domain=lm.effective_domain(), clamp_to_global=False)
    assert bool((res.lipschitz <= lm.bounds(p).global_bound.value * (1 + 1e-9)).all())
    for b in range(len(x)):
        for _ in range(10):
            d = torch.rand(x[b].shape, generator=gen, dtype=torch.float64) * 2 - 1
            d = d * eps / (d.abs().max() if p == "inf" else d.norm())
            y, z = (x[b] + d).clamp(0, 1), (x[b] - d).clamp(0, 1)
            num = (f64(y[None]) - f64(z[None])).reshape(-1)
            den = (y - z).reshape(-1)
            q = float(num.norm() / den.norm()) if p == "2" else float(num.abs().max() / den.abs().max())
            assert q <= float(res.lipschitz[b]) * (1 + 1e-9)
    # the same network from a state dict and --arch
    sd = tmp_path / "vit.pth"
    torch.save(net.state_dict(), sd)
    arch = tmp_path / "arch.py"
    arch.write_text("import sys\nsys.path.insert(0, %r)\nfrom test_domain_bounds import TinyViT\n\n"
                    "def build():\n    return TinyViT()\n" % str(Path(__file__).parent))
    lm2 = lipverify.load(sd, arch=f"{arch}:build", input_shape=(3, 8, 8))
    assert lm2.bounds(p).global_bound.value == pytest.approx(lm.bounds(p).global_bound.value, rel=1e-9)


def test_attention_intervals_enclose_sampled_values():
    from lipverify.graph.domain import attention_interval

    net = TinyViT(seed=2).eval()
    att = next(n.op for n in lipverify.load(net, input_shape=(3, 8, 8)).graph.nodes if n.kind == "attention")
    gen = torch.Generator().manual_seed(0)
    c = torch.randn((1, 5, 12), generator=gen, dtype=torch.float64)
    lb, ub = c - 0.3, c + 0.3
    lo, hi = attention_interval(att, lb, ub)
    xs = lb + (ub - lb) * torch.rand((200, 5, 12), generator=gen, dtype=torch.float64)
    ys = att(xs)
    assert bool((ys >= lo - 1e-12).all() and (ys <= hi + 1e-12).all())
    ref = net.attn.double()(xs, xs, xs, need_weights=False)[0]
    assert torch.allclose(ys, ref, atol=1e-12)
