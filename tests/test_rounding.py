"""The float32 rounding-error bound (``lipverify.bounds.rounding``) against exact rational arithmetic and
float64, and certification with float32 logits against float64 certification.

Oracles: the Lipschitz graph evaluated with :class:`fractions.Fraction` (every weight and input taken
as the exact number it stores; operator matrices from impulse responses, whose entries are the weights
themselves), and float64 evaluation for nets too large for fractions.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lipverify
from lipverify.bounds.rounding import RoundedForward, UnsupportedRounding, pool_routes, trusted_kernels
from lipverify.bounds.running_error import RunningError
from lipverify.graph.linear_ops import Chain, Residual


def frac_matvec(M, v):
    return [sum((M[r][c] * v[c] for c in range(len(v)) if M[r][c] != 0 and v[c] != 0), Fraction(0))
            for r in range(len(M))]


def frac_linear(op, v):
    """``A v`` (no bias) for a linear op, exactly."""
    if isinstance(op, Chain):
        for o in op.ops:
            v = frac_linear(o, v)
        return v
    if isinstance(op, Residual):
        parts = [frac_linear(b, v) for b in op.branches]
        return [sum((Fraction(s) * p[k] for s, p in zip(op.signs, parts)), Fraction(0)) for k in range(len(parts[0]))]
    m = op.to_double_copy().matrix().tolist()
    return frac_matvec([[Fraction(e) for e in row] for row in m], v)


def pool_windows(pool, in_shape):
    """For each max-pooling output, the flat input indices of its window (padding excluded)."""
    n = math.prod(in_shape)
    idx = torch.arange(1, n + 1, dtype=torch.float64).reshape((1,) + tuple(in_shape))
    x = idx.unsqueeze(2) if pool.one_d else idx
    kh, kw = pool.kernel
    ph, pw = pool.padding if not pool.one_d else (0, pool.padding[1])
    out = pool(torch.zeros((1,) + tuple(in_shape), dtype=torch.float64))
    out = out.unsqueeze(2) if pool.one_d else out
    ho, wo = out.shape[-2:]
    xp = F.pad(x, (pw, pw + kw * 4, ph, ph + kh * 4))
    cols = F.unfold(xp, (kh, kw), dilation=pool.dilation, stride=pool.stride)
    lh = (xp.shape[-2] - pool.dilation[0] * (kh - 1) - 1) // pool.stride[0] + 1
    lw = (xp.shape[-1] - pool.dilation[1] * (kw - 1) - 1) // pool.stride[1] + 1
    c = x.shape[1]
    cols = cols.reshape(c, kh * kw, lh, lw)[:, :, :ho, :wo]
    return [[int(v) - 1 for v in cols[ch, :, a, b].tolist() if v > 0]
            for ch in range(c) for a in range(ho) for b in range(wo)]


def exact_logits(graph, x):
    """The graph in exact rational arithmetic for one input ``x`` (float tensor of the input shape)."""
    vals = [None] * len(graph.nodes)
    for i, n in enumerate(graph.nodes):
        if n.kind == "input":
            vals[i] = [Fraction(float(v)) for v in x.reshape(-1).tolist()]
            continue
        ins = [vals[j] for j in n.inputs]
        if n.kind == "linear":
            y = frac_linear(n.op, ins[0])
            if n.op.bias is not None:
                b = n.op.bias.detach().double().reshape(-1).tolist()
                y = [a + Fraction(c) for a, c in zip(y, b)]
        elif n.kind == "activation":
            if n.op.name == "relu":
                y = [max(v, Fraction(0)) for v in ins[0]]
            elif n.op.name.startswith("leaky_relu"):
                a = Fraction(float(n.op.lo))
                y = [v if v > 0 else a * v for v in ins[0]]
            else:
                raise AssertionError(n.op.name)
        elif n.kind == "maxpool":
            wins = pool_windows(n.op, graph.nodes[n.inputs[0]].out_shape)
            y = [max(ins[0][k] for k in w) for w in wins]
        elif n.kind == "add":
            y = [sum((Fraction(c) * t[k] for c, t in zip(n.op, ins)), Fraction(0)) for k in range(len(ins[0]))]
        elif n.kind == "concat":
            shapes = [graph.nodes[j].out_shape for j in n.inputs]
            ax = n.op
            pieces = [torch.arange(len(t)).reshape(s) for t, s in zip(ins, shapes)]
            offs = [0]
            for t in ins:
                offs.append(offs[-1] + len(t))
            order = torch.cat([p + o for p, o in zip(pieces, offs)], dim=ax).reshape(-1).tolist()
            flat = [v for t in ins for v in t]
            y = [flat[k] for k in order]
        else:
            raise AssertionError(n.kind)
        vals[i] = y
    return vals[graph.output]


def check_against_exact(lm, x, norm="2", running=False):
    """Every pair's computed margin is within the bound of the exact one; returns max error / bound.
    ``running``: the entry-wise running error bound instead of the sensitivity bound."""
    rf = RoundedForward(lm.graph, lm.node_constants(norm), norm, torch.float32)
    assert rf.supported, rf.reason
    logits, delta = (RunningError(rf) if running else rf)(x)
    worst = 0.0
    for b in range(len(x)):
        ex = exact_logits(lm.graph, x[b])
        j = int(logits[b].argmax())
        for i in range(logits.shape[1]):
            got = Fraction(float(logits[b, j])) - Fraction(float(logits[b, i]))
            err = abs(got - (ex[j] - ex[i]))
            assert err <= Fraction(float(delta[b, i])), (b, i, float(err), float(delta[b, i]))
            if delta[b, i] > 0:
                worst = max(worst, float(err) / float(delta[b, i]))
    return worst


def mlp(seed, scale=1.0, leaky=False):
    torch.manual_seed(seed)
    act = nn.LeakyReLU(0.1) if leaky else nn.ReLU()
    net = nn.Sequential(nn.Linear(7, 9), act, nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        net[0].weight.mul_(scale)
    return net


class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.fc = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(h + self.c2(h))
        return self.fc(self.pool(h).flatten(1))


@pytest.mark.parametrize("running", [False, True], ids=["sensitivity", "running"])
def test_bound_holds_against_exact_rationals_on_small_nets(running):
    torch.manual_seed(0)
    for seed, leaky in ((0, False), (1, True)):
        lm = lipverify.load(mlp(seed, leaky=leaky), input_shape=(7,))
        for norm in ("2", "inf"):
            check_against_exact(lm, torch.randn(6, 7), norm, running)
    net = Res().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.uniform_(0.5, 2)
    lm = lipverify.load(net, input_shape=(1, 5, 5))
    check_against_exact(lm, torch.rand(3, 1, 5, 5), running=running)


def test_bound_holds_with_adversarially_scaled_weights_and_cancellation():
    """Weights spanning 1e-6..1e6 and inputs chosen so the first layer's sums cancel: the float32 error is
    large (relative to the result), the bound still holds, and it is not vacuous (error / bound > 1e-6)."""
    torch.manual_seed(3)
    net = mlp(3)
    with torch.no_grad():
        w = net[0].weight
        w.copy_(w * torch.logspace(-6, 6, w.shape[1])[None, :])
        net[2].weight.mul_(1e3)
    lm = lipverify.load(net, input_shape=(7,))
    # inputs near the null space of the first layer's rows: big terms that cancel
    x = torch.randn(5, 7)
    x[:, -1] = -(x[:, :-1] * net[0].weight[0, :-1]).sum(1) / net[0].weight[0, -1]
    worst = check_against_exact(lm, x.float())
    assert worst > 1e-6
    assert check_against_exact(lm, x.float(), running=True) > 1e-6


def test_bound_holds_against_float64_on_deeper_nets():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=(1, 0), groups=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
                        nn.ConvTranspose2d(8, 4, 2, stride=2), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
                        nn.Flatten(), nn.Linear(4 * 8 * 7, 10)).eval()
    with torch.no_grad():
        net[3].running_var.uniform_(0.1, 3)
    lm = lipverify.load(net, input_shape=(3, 16, 16))
    x = torch.rand(64, 3, 16, 16)
    for norm in ("2", "inf"):
        l32, d32 = RoundedForward(lm.graph, lm.node_constants(norm), norm, torch.float32)(x)
        l64, d64 = RoundedForward(lm.graph, lm.node_constants(norm), norm, torch.float64)(x)
        pred = l32.argmax(1)
        e = l32.double() - l64
        err = (e.gather(1, pred[:, None]) - e).abs()
        assert bool((err <= d32 + d64.amax(1, keepdim=True) + 1e-300).all())
        assert float(d64.max()) < 1e-6 * float(d32.max())  # float64's own bound is ~2^29 times smaller
        lr, dr = RunningError(RoundedForward(lm.graph, lm.node_constants(norm), norm, torch.float32))(x)
        e = lr.double() - l64
        err = (e.gather(1, lr.argmax(1)[:, None]) - e).abs()
        assert bool((err <= dr + d64.amax(1, keepdim=True) + 1e-300).all())


def test_both_bounds_hold_through_minmax_clips_and_scales():
    """MinMax (GroupSort-2), ReLU6 clipping and a per-channel scale: float32 margins within each bound
    of the float64 ones."""
    from lipverify.models.layers import MinMax

    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), MinMax(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3),
                        nn.ReLU6(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()
    with torch.no_grad():
        net[2].running_var.uniform_(0.2, 3)
        net[2].weight.uniform_(-2, 2)
    lm = lipverify.load(net, input_shape=(2, 6, 6))
    x = torch.randn(32, 2, 6, 6)
    l64, d64 = lm.rounded_forward("2", torch.float64)(x)
    for evaluate in (lm.rounded_forward("2"), lm.running_error("2")):
        lg, d = evaluate(x)
        e = lg.double() - l64
        err = (e.gather(1, lg.argmax(1)[:, None]) - e).abs()
        assert bool((err <= d + d64.amax(1, keepdim=True)).all()) and bool((err > 0).any())


def running_nets():
    from lipverify.models.layers import MinMax

    torch.manual_seed(9)
    res = Res().eval()
    with torch.no_grad():
        res.bn.running_var.uniform_(0.5, 2)
    mm = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), MinMax(), nn.Conv2d(4, 4, 3), nn.ReLU6(),
                       nn.ConvTranspose2d(4, 2, 2, stride=2), nn.LeakyReLU(0.3), nn.MaxPool2d(2, padding=1),
                       nn.Flatten(), nn.Linear(2 * 5 * 5, 4)).eval()
    return [(res, (1, 6, 6)), (mm, (2, 6, 6)), (mlp(2, leaky=True), (7,))]


@pytest.mark.parametrize("scale", [1e-3, 2e-2])
@pytest.mark.parametrize("case", range(3))
def test_running_error_rules_bound_every_intermediate_tensor(case, scale):
    """Each step's rule, tested where it binds: with an input known only within ``E_0``, every tensor
    the float32 pass computes is within its error bound, entry by entry, of the float64 graph at
    vertices of the input box (signs at random).  A rule that drops a term (a ReLU whose input may
    change sign, a max over errors) fails at the first tensor it feeds: the narrow box tests the
    rounding terms, the wide one the rules where many ReLU inputs straddle 0."""
    net, shape = running_nets()[case]
    lm = lipverify.load(net, input_shape=shape)
    run = lm.running_error("2")
    rf = run.rf
    torch.manual_seed(case)
    x = torch.randn(8, *shape)
    e0 = scale * (x.abs() + 0.1)
    _, _, vals, errs = run(x, input_error=e0, trace=True)
    tight = 0.0
    for _ in range(20):
        ref = lm.graph.forward_all((x.double() + e0.double() * torch.randint(0, 2, x.shape).double().mul(2).sub(1)))
        for node, step in enumerate(rf.node_steps):
            got, bound = vals[step].double(), errs[step].double()
            diff = (ref[node].reshape(got.shape) - got).abs()
            tol = 1e-12 * (float(ref[node].abs().max()) + 1)
            assert bool((diff <= bound + tol).all()), (lm.graph.nodes[node].kind, float((diff - bound).max()))
            pos = bound > 0
            if bool(pos.any()):
                tight = max(tight, float((diff[pos] / bound[pos]).max()))
    assert tight > 0.3  # the box vertices come close to the bound somewhere: the check can fail


def test_leaky_relu_bound_covers_the_rounded_slope():
    """``F.leaky_relu(x, 0.3)`` rounds the slope to float32 and then the product: up to about ``2u``
    relative, which a one-rounding model (``u``) misses on negative inputs.  Checked on the activation's
    own output against the float64 graph, where no later layer's slack can hide it."""
    torch.manual_seed(0)
    for slope in (0.1, 0.3, 0.01):
        lm = lipverify.load(nn.Sequential(nn.LeakyReLU(slope), nn.Linear(4096, 2)).eval(), input_shape=(4096,))
        run = lm.running_error("2")
        x = -torch.rand(4, 4096) * 3
        _, _, vals, errs = run(x, trace=True)
        ref = lm.graph.forward_all(x.double())
        node = [i for i, n in enumerate(lm.graph.nodes) if n.kind == "activation"][0]
        step = run.rf.node_steps[node]
        diff = (ref[node] - vals[step].double()).abs()
        assert bool((diff <= errs[step].double()).all())
        assert float((diff / errs[step].double()).max()) > 0.5  # the u-only bound would be exceeded
        assert run.rf.steps[step].rel >= 2 * run.rf.u  # the sensitivity bound uses the same model


def test_pool_routes_is_the_sum_pooling_adjoint():
    torch.manual_seed(5)
    for kw in (dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
               dict(kernel_size=2, stride=1, dilation=2)):
        net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.MaxPool2d(**kw), nn.Flatten())
        lm = lipverify.load(net.eval(), input_shape=(1, 7, 7))
        node = [n for n in lm.graph.nodes if n.kind == "maxpool"][0]
        in_shape = lm.graph.nodes[node.inputs[0]].out_shape
        wins = pool_windows(node.op, in_shape)
        h = torch.rand((3,) + tuple(node.out_shape), dtype=torch.float64)
        got = pool_routes(node.op, h, in_shape).reshape(3, -1)
        want = torch.zeros(3, math.prod(in_shape), dtype=torch.float64)
        for o, w in enumerate(wins):
            for k in w:
                want[:, k] += h.reshape(3, -1)[:, o]
        assert torch.allclose(got, want)


def near_tie_model():
    """Two output rows equal up to 1e-7: float32 cannot tell the top two logits apart for most inputs."""
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        net[2].weight[1] = net[2].weight[0] * (1 + 1e-7)
        net[2].bias[1] = net[2].bias[0]
        net[2].bias[0] += 5.0
        net[2].bias[1] += 5.0
    return net


def test_float32_certificates_are_float64_decisions_and_never_wrong():
    for net, shape, tie in ((near_tie_model(), (5,), True), (mlp(7), (7,), False)):
        lm = lipverify.load(net, input_shape=shape)
        x = torch.randn(200, *shape)
        y = torch.randint(0, 3, (200,))
        eps = [1e-6, 1e-3, 0.05, 0.2]
        a = lm.certify(x, y, eps=eps, precision="float64")
        b = lm.certify(x, y, eps=eps)
        assert torch.equal(a.pred, b.pred)
        for e in eps:
            assert torch.equal(a.certified_at[e], b.certified_at[e])
        assert bool((b.radius <= a.radius * (1 + 1e-12)).all())
        K = lm.margin_constants("2").K
        logits = lm.graph.forward(x.double()).reshape(len(x), -1)
        f32 = b.method_code == 3
        # near ties: float32 cannot order the top two logits, those inputs are decided in float64
        assert bool(f32.any()) != tie
        for k in f32.nonzero().flatten().tolist():  # float32-decided certificates hold in float64
            j = int(b.pred[k])
            for i in range(logits.shape[1]):
                if i != j:
                    assert float(logits[k, j] - logits[k, i]) > float(b.radius[k]) * float(K[j, i]) * (1 - 1e-12)
        assert any("recomputed in float64" in n for n in b.notes)


def test_fused_products_equal_the_separate_ones(monkeypatch):
    """A dense layer's GEMM computing the next bound's product ``|v| @ w`` too gives the same bound as the
    separate product (up to float32 rounding of both), and the fused path is taken."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 5)).eval()
    lm = lipverify.load(net, input_shape=(30,))
    x = torch.rand(64, 30)
    fused = RoundedForward(lm.graph, lm.node_constants("2"), "2", torch.float32)
    assert fused.fused, "no dense layer computed a bound product"
    monkeypatch.setattr(RoundedForward, "fuse_dense", lambda self: None)
    plain = RoundedForward(lm.graph, lm.node_constants("2"), "2", torch.float32)
    assert not plain.fused
    (l1, d1), (l2, d2) = fused(x), plain(x)
    assert torch.equal(l1.argmax(1), l2.argmax(1))
    assert torch.allclose(d1, d2, rtol=1e-5, atol=0)
    assert bool((d1 > 0).all())


def test_rule_blocks_and_the_probe_switch_change_no_decision(monkeypatch):
    """The rule decided in many small blocks gives the result of one block; a model whose bound exceeds
    most margins switches to float64 after the probe, with the same decisions."""
    import lipverify.certify.rules as rules

    lm = lipverify.load(mlp(11), input_shape=(7,))
    x, y = torch.randn(300, 7), torch.randint(0, 4, (300,))
    one = lm.certify(x, y, eps=[0.01, 0.1], batch_size=32)
    monkeypatch.setattr(rules, "RULE_BLOCK_ENTRIES", 40)
    many = lm.certify(x, y, eps=[0.01, 0.1], batch_size=32)
    for a in ("pred", "margin", "radius", "method_code", "certified"):
        assert torch.equal(getattr(one, a), getattr(many, a)), a
    tie = lipverify.load(near_tie_model(), input_shape=(5,))
    xt = torch.randn(100, 5)
    res = tie.certify(xt, torch.zeros(100, dtype=torch.long), eps=[0.01], batch_size=64)
    ref = tie.certify(xt, torch.zeros(100, dtype=torch.long), eps=[0.01], batch_size=64, precision="float64")
    assert any("ran in float64" in n for n in res.notes), res.notes
    assert torch.equal(res.pred, ref.pred) and torch.equal(res.certified_at[0.01], ref.certified_at[0.01])
    assert int((res.method_code[8:] == 3).sum()) == 0  # 100 inputs: a probe of 8


def test_running_bound_as_second_stage_gives_the_float64_decisions(monkeypatch):
    """Where float64 is dear (accelerators), the inputs the sensitivity bound leaves open go through the
    running bound before float64: a deep net with many ReLUs off by a margin (the sensitivity bound
    counts every one as passing error, the running bound none) takes that path, and every decision is
    the float64 one."""
    import lipverify.certify.rules as rules

    monkeypatch.setattr(rules, "FLOAT64_COST", {"cpu": 100.0, "other": 100.0})
    torch.manual_seed(0)
    layers, d = [], 16
    for _ in range(6):
        layers += [nn.Linear(d, 64), nn.ReLU()]
        d = 64
    net = nn.Sequential(*layers, nn.Linear(64, 10)).eval()
    with torch.no_grad():
        for m in list(net)[:-1]:
            if isinstance(m, nn.Linear):
                m.weight.mul_(3.0)
                m.bias.fill_(-0.5)
    lm = lipverify.load(net, input_shape=(16,))
    x, y = torch.randn(600, 16), torch.randint(0, 10, (600,))
    eps = [0.001 * k for k in range(1, 50, 4)]
    res = lm.certify(x, y, eps=eps, batch_size=64)
    ref = lm.certify(x, y, eps=eps, batch_size=64, precision="float64")
    note = [t for t in res.notes if "bounded again" in t]
    assert note, res.notes
    second = int(note[0].split("; ")[1].split(" ")[0])
    redone = int((res.method_code == 0).sum())
    assert 0 < redone < second  # the second stage decided some of the inputs it saw
    assert torch.equal(res.pred, ref.pred)
    for e in eps:
        assert torch.equal(res.certified_at[e], ref.certified_at[e]), e
    assert bool((res.radius <= ref.radius * (1 + 1e-12)).all())
    # per-example radii (VNN-LIB specifications) through the same path
    torch.manual_seed(1)
    per = torch.tensor(eps, dtype=torch.float64)[torch.randint(0, len(eps), (600,))]
    res = lm.certify(x, y, eps=per, batch_size=64)
    ref = lm.certify(x, y, eps=per, batch_size=64, precision="float64")
    assert any("bounded again" in t for t in res.notes), res.notes
    assert torch.equal(res.pred, ref.pred) and torch.equal(res.certified, ref.certified)


def test_inputs_float32_cannot_represent_are_decided_in_float64():
    """Certificates speak of the input as given: a float64 input with more digits than float32 holds gets
    no float32 bound (its float32 logits are those of another point); float32-exact rows keep theirs."""
    lm = lipverify.load(mlp(5), input_shape=(7,))
    rf = lm.rounded_forward("2")
    x = torch.rand(6, 7, dtype=torch.float64)
    x[:3] = x[:3].float().double()  # exactly representable
    _, delta = rf(x)
    assert bool(torch.isinf(delta[3:]).all()) and bool(torch.isfinite(delta[:3]).all())
    y = torch.zeros(6, dtype=torch.long)
    res = lm.certify(x, y, eps=[0.01])
    ref = lm.certify(x, y, eps=[0.01], precision="float64")
    assert set(res.method_code[3:].tolist()) == {0}
    assert torch.equal(res.certified_at[0.01], ref.certified_at[0.01]) and torch.equal(res.pred, ref.pred)


def test_graphs_without_a_rounding_model_fall_back_or_refuse():
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    lm = lipverify.load(net, input_shape=(4,))
    assert not lm.rounded_forward("2").supported and "tanh" in lm.rounded_forward("2").reason
    x = torch.randn(10, 4)
    res = lm.certify(x, torch.zeros(10, dtype=torch.long), eps=[0.1])
    assert set(res.method_code.tolist()) == {0} and any("taken as exact" in n for n in res.notes)
    with pytest.raises(lipverify.UserInputError, match="float32"):
        lm.certify(x, torch.zeros(10, dtype=torch.long), eps=[0.1], precision="float32")


def test_trusted_kernels_restore_settings_and_refuse_lowered_onednn(monkeypatch):
    nnpack = torch._C._get_nnpack_enabled
    before = (torch.backends.cudnn.enabled, nnpack(), torch.backends.cuda.matmul.allow_tf32)
    with trusted_kernels():
        assert not torch.backends.cudnn.enabled and not nnpack()
        assert not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.enabled, nnpack(), torch.backends.cuda.matmul.allow_tf32) == before
    monkeypatch.setenv("ONEDNN_DEFAULT_FPMATH_MODE", "BF16")
    lm = lipverify.load(mlp(8), input_shape=(7,))
    rf = RoundedForward(lm.graph, lm.node_constants("2"), "2", torch.float32)
    assert not rf.supported and "ONEDNN" in rf.reason
    with pytest.raises(UnsupportedRounding):
        rf(torch.zeros(1, 7))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "densenet121", "shufflenet_v2_x0_5"])
def test_bound_holds_on_torchvision_architectures(arch):
    """Architectures nobody here wrote (batch norm folded, residual sums, ReLU6 clips, concatenations,
    channel shuffles as selections): the float32 margins are within the bound of the float64 ones."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(num_classes=10).eval()
    lm = lipverify.load(net, input_shape=(3, 32, 32))
    x = torch.rand(4, 3, 32, 32)
    l32, d32 = lm.rounded_forward("2")(x)
    l64, d64 = lm.rounded_forward("2", torch.float64)(x)
    pred = l32.argmax(1)
    e = l32.double() - l64
    err = (e.gather(1, pred[:, None]) - e).abs()
    assert bool((err <= d32 + d64.amax(1, keepdim=True)).all())
    assert bool((err > 0).any())  # the float32 pass does round
    lr, dr = lm.running_error("2")(x)
    e = lr.double() - l64
    err = (e.gather(1, lr.argmax(1)[:, None]) - e).abs()
    assert bool((err <= dr + d64.amax(1, keepdim=True)).all()) and bool((err > 0).any())
    # the bound over the input box [0, 1] (every step kind of these graphs has an interval rule)
    from lipverify.bounds.domain import DomainForward

    ld, dd = DomainForward(lm.rounded_forward("2"), 0.0, 1.0)(x)
    e = ld.double() - l64
    err = (e.gather(1, ld.argmax(1)[:, None]) - e).abs()
    assert bool((err <= dd + d64.amax(1, keepdim=True)).all()) and bool((dd >= d32 * (1 - 1e-9)).all())
    # the bounds of random deep nets are loose enough to hide a wrong value: the float32 logits of every
    # pass (buffers reused) are also close to float64 ones and to the network's own float32 output
    with torch.no_grad():
        own = net(x).double()
    scale = float(l64.abs().max())
    for lg in (l32, lr, ld):
        assert float((lg.double() - l64).abs().max()) <= 1e-4 * scale
        assert float((lg.double() - own).abs().max()) <= 1e-4 * scale


@pytest.mark.slow
def test_real_convnet_takes_the_bound_over_the_input_range(realdata):
    """Convnet_maxpool (a third-party MNIST net): its bound over the pixel range [0, 1] is far below its
    margins, so the probe runs the plain float32 pass for every input, and every decision is the float64
    one."""
    import numpy as np

    lm = lipverify.load(realdata / "models/onnx/Convnet_maxpool.onnx")
    mn = np.load(realdata / "data/mnist_test_1000.npz")
    x, y = torch.from_numpy(mn["x"])[:400], torch.from_numpy(mn["y"])[:400]
    certify_like_float64(lm, x, y, [0.1, 0.3, 1.0], 100, "whole input range [0, 1]", 0.9)


@pytest.mark.slow
def test_real_resnet_gets_the_running_bound_and_float64_decisions(realdata):
    """resnet_2b (a normally trained CIFAR ResNet nobody here wrote): the sensitivity bound exceeds most
    margins, the probe picks the running bound, most inputs are decided in float32 and every decision
    is the float64 one; the float32 radii never exceed the float64 ones."""
    import numpy as np

    lm = lipverify.load(realdata / "models/onnx/resnet_2b.onnx", mean="0.4914,0.4822,0.4465",
                        std="0.2471,0.2435,0.2616")
    cf = np.load(realdata / "data/cifar10_test_100.npz")
    x, y = torch.from_numpy(cf["x"]), torch.from_numpy(cf["y"])
    certify_like_float64(lm, x, y, [0.01, 0.05], 50, "running error", 0.6)


def certify_like_float64(lm, x, y, eps, batch, path, share):
    """Certify by default and in float64: the notes name ``path``, more than ``share`` of the inputs are
    decided in float32, every decision is the float64 one and no radius exceeds the float64 one."""
    a = lm.certify(x, y, eps=eps, batch_size=batch)
    b = lm.certify(x, y, eps=eps, precision="float64")
    assert any(path in n for n in a.notes), a.notes
    assert float((a.method_code == 3).double().mean()) > share
    assert torch.equal(a.pred, b.pred)
    for e in eps:
        assert torch.equal(a.certified_at[e], b.certified_at[e])
    assert bool((a.radius <= b.radius * (1 + 1e-12)).all())


class TwoBranch(nn.Module):
    """Residual additions whose fresh input is the first, the second or neither, ReLUs on sums, on convs,
    on a bias-less conv read twice and on the input (which a conv reads too)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 1, bias=False)
        self.skip = nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        g = self.c3(h)
        h = torch.relu(self.c2(h) + h)  # the fresh input first
        h = torch.relu(g + torch.relu(g) + h)  # g read twice: its buffer is never reused
        h = torch.relu(self.skip(torch.relu(x)) + h)  # the ReLU of the input itself: never in place
        return self.fc(F.max_pool2d(h, 2, ceil_mode=True).flatten(1))


def test_buffer_reuse_changes_no_value_and_no_input():
    """The passes compute ReLUs and residual additions into buffers read once (the same operations):
    the logits and bounds equal those of the passes with new tensors everywhere, bit for bit, the bounds
    hold against exact rationals, and the caller's input is never written to."""
    torch.manual_seed(11)
    net = TwoBranch().eval()
    lm = lipverify.load(net, input_shape=(2, 5, 5))
    x = torch.randn(6, 2, 5, 5)
    keep = x.clone()
    rf = RoundedForward(lm.graph, lm.node_constants("2"), "2", torch.float32)
    assert any(i is not None for i in rf.into)  # the net has steps that reuse buffers
    run = RunningError(rf)
    assert any(i is not None for i in run.into) and run.zero_input_ok is False  # a ReLU reads the input
    got = [rf(x), run(x)]
    from lipverify.bounds.domain import DomainForward

    dom = DomainForward(rf, float(x.min()), float(x.max()))
    got.append(dom(x))
    assert torch.equal(x, keep)
    saved = rf.into
    rf.into = [None] * len(saved)
    ref = [rf(x), run(x, trace=True)[:2], dom(x)]  # trace: no reuse in the running pass either
    rf.into = saved
    for (l1, d1), (l2, d2) in zip(got, ref):
        assert torch.equal(l1, l2) and torch.equal(d1, d2)
    for running in (False, True):
        check_against_exact(lm, x, running=running)
    # a ReLU net whose input only linear steps read: the running pass skips the zero input error
    lm2 = lipverify.load(mlp(5), input_shape=(7,))
    run2 = lm2.running_error("2")
    assert run2.zero_input_ok
    x2 = torch.randn(5, 7)
    keep2 = x2.clone()
    l_a, d_a = run2(x2)
    l_b, d_b = run2(x2, input_error=torch.zeros_like(x2))
    # skipping the zero input error is never looser, up to the float32 rounding of the bound's own
    # arithmetic (the skip path sums |A| |x| gamma in another kernel: the two differ by an ulp or two)
    assert torch.equal(x2, keep2) and torch.equal(l_a, l_b) and bool((d_a <= d_b * (1 + 4 * 2.0 ** -24)).all())
    check_against_exact(lm2, x2, running=True)
    # an input read by a ReLU alone: its buffer is the caller's, never reused
    torch.manual_seed(12)
    lm3 = lipverify.load(nn.Sequential(nn.ReLU(), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 3)).eval(),
                         input_shape=(7,))
    x3 = torch.randn(9, 7)
    keep3 = x3.clone()
    lm3.rounded_forward("2")(x3), lm3.running_error("2")(x3)
    lm3.certify(x3, torch.zeros(9, dtype=torch.long), eps=0.01, precision="float32")
    assert torch.equal(x3, keep3)


def test_norm_bound_and_nonzero_count_against_exact_arithmetic():
    """The per-example norms the sensitivity bound multiplies (one reduction each, no temporary) are at
    least the exact norms of the float32 tensors, computed with fractions, on rows of many terms, wide
    dynamic range, subnormals, signed zeros and sums of huge and tiny squares; within the worst-case ``gamma_m`` of them
    (not vacuous); a NaN gives inf, squares that overflow still a bound.  The non-zero counts are exact."""
    from lipverify.bounds.rounding import count_nonzero

    torch.manual_seed(13)
    lm = lipverify.load(mlp(0), input_shape=(7,))
    rows = [torch.rand(5000), torch.randn(3000) * torch.logspace(-30, 18, 3000),
            torch.full((4000,), 1e-42), torch.tensor([0.0, -0.0, 3e-39, -1e18, 7.0] * 50)]
    width = max(len(r) for r in rows)
    t = torch.zeros(len(rows), width)
    for k, r in enumerate(rows):
        t[k, :len(r)] = r
    for p in ("2", "inf"):
        rf = RoundedForward(lm.graph, lm.node_constants(p), p, torch.float32)
        bound = rf.norm_upper(t)
        for k in range(len(rows)):
            vals = [Fraction(float(v)) for v in t[k].tolist()]
            b = Fraction(float(bound[k]))
            if p == "2":
                exact_sq = sum((v * v for v in vals), Fraction(0))
                assert b * b >= exact_sq
                if exact_sq > Fraction(2.0 ** -90):  # (where the underflow allowance is not all of it)
                    assert float(b * b / exact_sq) < 1 + 3 * width * 2.0 ** -24  # gamma_m: not vacuous
            else:
                top = max(abs(v) for v in vals)
                assert top <= b and float(b - top) <= 2.0 ** -126
        bad = torch.tensor([[1.0, float("nan")], [3e30, 3e30]])  # squares beyond the float32 range
        nb = rf.norm_upper(bad)
        assert bool(torch.isinf(nb[0])) and float(nb[1]) >= float(bad[1, 0]) * (math.sqrt(2) if p == "2" else 1)
    nnz = count_nonzero(t.abs())
    assert nnz.tolist() == [float(sum(1 for v in t[k].tolist() if v != 0)) for k in range(len(rows))]
