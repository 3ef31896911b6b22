"""What real exporters write, and the ops that have a sound bound.

Oracles: onnxruntime on the original file (fidelity), autograd slopes on a dense grid (activation
slope ranges), exact SVD of operator matrices built from impulse responses, and the published
definitions of each activation.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

import lipverify
from lipverify.cli import main
from lipverify.graph import make_activation
from lipverify.importers.onnx import normalise_onnx


def _export(net, shape, path, dynamic=True):
    x = torch.rand((1,) + tuple(shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "b"}} if dynamic else None)


def _load(net, shape, fmt, tmp_path):
    """The model as a module, or through its standard ONNX export."""
    if fmt == "module":
        return lipverify.load(net, input_shape=shape)
    path = tmp_path / "m.onnx"
    _export(net, shape, path)
    return lipverify.load(path)


def _operator_matrix(net, shape):
    """The matrix of the linear part of ``net`` from impulse responses (float64): an independent oracle."""
    import copy

    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(shape))
    net64 = copy.deepcopy(net).double()  # the model under test stays as it was
    with torch.no_grad():
        zero = net64(torch.zeros((1,) + tuple(shape), dtype=torch.float64))
        return (net64(eye) - zero).reshape(n, -1).T


def _exact_l2(lm):
    """The exact l2 Lipschitz constant of an affine-then-ReLU-free model: SVD of its Jacobian."""
    x = torch.rand((1,) + lm.input_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: lm.module_double()(z).reshape(-1), x)
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), ord=2))


# --------------------------------------------------------------------------------------------------
# activations: slope ranges against autograd on a dense grid


@pytest.mark.parametrize("name,kw,ref", [
    ("hardswish", {}, F.hardswish),
    ("hardsigmoid", {}, F.hardsigmoid),
    ("selu", {}, F.selu),
    ("celu", {"alpha": 0.7}, lambda x: F.celu(x, 0.7)),
    ("mish", {}, F.mish),
    ("softsign", {}, F.softsign),
    ("silu", {}, F.silu),
    ("gelu", {}, F.gelu),
    ("gelu", {"approximate": "tanh"}, lambda x: F.gelu(x, approximate="tanh")),
    ("elu", {"alpha": 2.5}, lambda x: F.elu(x, 2.5)),
    ("prelu", {"weight": torch.tensor([0.25, -0.5, 1.5])}, None),
])
def test_activation_slope_ranges_contain_every_slope(name, kw, ref):
    act = make_activation(name, **kw)
    if name == "prelu":
        x = torch.linspace(-5, 5, 2001, dtype=torch.float64).repeat(3, 1).T.contiguous().requires_grad_(True)
        y = act.fn(x)
        assert torch.allclose(y, F.prelu(x, kw["weight"].double()))
    else:
        x = torch.linspace(-12, 12, 240001, dtype=torch.float64, requires_grad=True)
        y = act.fn(x)
        assert torch.allclose(y, ref(x), atol=1e-12)
    (g,) = torch.autograd.grad(y.sum(), x)
    # (autograd's own rounding is about 1e-8)
    assert float(g.min()) >= act.lo - 1e-7 and float(g.max()) <= act.hi + 1e-7, (g.min(), g.max(), act)
    # and the range is not loose by more than the rounding of the table where the extreme is attained
    assert act.hi - float(g.max()) < 2e-3
    if name in ("hardswish", "silu", "mish", "prelu", "hardsigmoid"):
        assert float(g.min()) - act.lo < 2e-3


# --------------------------------------------------------------------------------------------------
# ONNX normalisation


class _TwoHeads(nn.Module):
    """Two convolutions with identical biases: the exporter aliases them through Identity nodes."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        with torch.no_grad():
            self.a.bias.zero_()
            self.b.bias.zero_()
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.b(F.relu(self.a(x)))), 1))


def _with_identity_alias(path):
    """An ONNX file in which one initializer reaches a node only through an Identity node."""
    m = onnx.load(str(path))
    g = m.graph
    conv = next(n for n in g.node if n.op_type == "Conv")
    w = conv.input[1]
    conv.input[1] = w + "_alias"
    g.node.insert(0, onnx.helper.make_node("Identity", [w], [w + "_alias"], name="alias_node"))
    onnx.save(m, str(path))


def test_identity_aliased_initializers_load_and_pass_fidelity(tmp_path):
    torch.manual_seed(0)
    net = _TwoHeads()
    path = tmp_path / "m.onnx"
    _export(net, (3, 8, 8), path)
    _with_identity_alias(path)
    assert any(n.op_type == "Identity" for n in onnx.load(str(path)).graph.node)
    lm = lipverify.load(path)
    assert lm.fidelity.passed and lm.fidelity.max_rel_diff < 1e-5
    assert any("aliased initializer" in n for n in lm.notes)
    # the normalised graph has no Identity left and computes the same (onnxruntime on both)
    import onnxruntime as ort

    norm, _ = normalise_onnx(onnx.load(str(path)))
    assert not any(n.op_type == "Identity" for n in norm.graph.node)
    x = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    a = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(norm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(a, b, rtol=0, atol=0)


def test_a_broken_graph_names_the_node_not_a_keyerror(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    _export(_TwoHeads(), (3, 8, 8), path)
    m = onnx.load(str(path))
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    conv.input[1] = "nowhere"
    onnx.save(m, str(path), )
    res = CliRunner().invoke(main, ["bounds", str(path), "--no-fidelity-check"])
    assert res.exit_code == 2
    assert "KeyError" not in res.stderr and "Traceback" not in res.stderr
    assert "Conv" in res.stderr and "nowhere" in res.stderr


class _Batch1(nn.Module):
    """A competition-style network whose Reshape hard-codes the batch size 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).reshape(1, -1))


def test_batch_one_reshape_works_in_every_command(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "b1.onnx"
    _export(_Batch1(), (1, 8, 8), path, dynamic=False)
    g0 = onnx.load(str(path)).graph
    tensors = list(g0.initializer) + [n.attribute[0].t for n in g0.node if n.op_type == "Constant"]
    shapes = [[int(v) for v in onnx.numpy_helper.to_array(t).reshape(-1)] for t in tensors if list(t.dims) == [2]]
    assert [1, -1] in shapes  # the batch size really is fixed in the file
    lm = lipverify.load(path)
    assert lm.fidelity.passed
    assert any("Reshape" in n and "batch" in n for n in lm.notes)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(7, 1, 8, 8, generator=g)
    assert lm(x).shape == (7, 10)
    y = lm(x).argmax(1)
    data = tmp_path / "d.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    for cmd in (["bounds"], ["certify", "--data", data, "--eps", "0.01"], ["attack", "--data", data, "--eps", "0.5",
                                                                           "--strength", "fast"],
                ["audit", "--data", data, "--eps", "0.01", "--out", tmp_path / "audit", "--strength", "fast"]):
        res = CliRunner().invoke(main, [cmd[0], str(path)] + [str(c) for c in cmd[1:]] + ["--quiet"]
                                 if cmd[0] != "bounds" else [cmd[0], str(path)])
        assert res.exit_code == 0, (cmd, res.output)


# --------------------------------------------------------------------------------------------------
# ops


class _Ops(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 if kind in ("mean", "sum") else 6 * 8 * 8, 5)
        self.prelu = nn.PReLU(6, init=0.3)

    def forward(self, x):
        h = self.conv(x)
        if self.kind == "mean":
            h = h.mean(dim=(2, 3))
        elif self.kind == "sum":
            h = h.sum(dim=(2, 3))
        elif self.kind == "silu":
            h = torch.flatten(h * torch.sigmoid(h), 1)
        elif self.kind == "hardswish":
            h = torch.flatten(F.hardsigmoid(F.hardswish(h)), 1)
        elif self.kind == "concat1":
            h = torch.flatten(torch.cat([h], dim=1), 1)
        elif self.kind == "prelu":
            h = torch.flatten(self.prelu(h), 1)
        elif self.kind == "split":
            a, b = torch.chunk(h, 2, dim=1)
            h = torch.flatten(torch.cat([b, a], dim=1), 1)
        return self.fc(h)


@pytest.mark.parametrize("kind", ["mean", "sum", "silu", "hardswish", "concat1", "prelu", "split"])
@pytest.mark.parametrize("fmt", ["onnx", "module", "pt2"])
def test_op_coverage_bound_is_sound(kind, fmt, tmp_path):
    torch.manual_seed(0)
    net = _Ops(kind).eval()
    if fmt == "onnx":
        path = tmp_path / "m.onnx"
        _export(net, (3, 8, 8), path)
        lm = lipverify.load(path)
    elif fmt == "pt2":
        ep = torch.export.export(net, (torch.rand(2, 3, 8, 8),),
                                 dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=64)}})
        path = tmp_path / "m.pt2"
        torch.export.save(ep, str(path))
        lm = lipverify.load(path)
    else:
        lm = lipverify.load(net, input_shape=(3, 8, 8))
    rep = lm.bounds("2")
    assert rep.global_bound.sound
    # a Jacobian at a sampled point never exceeds the bound; for the linear kinds it is the exact value
    x = torch.rand((4,) + lm.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda z: lm.module_double()(z).reshape(-1), x[i:i + 1])
        s = float(torch.linalg.matrix_norm(jac.reshape(-1, x[0].numel()), ord=2))
        assert s <= rep.global_bound.value * (1 + 1e-6)
    if kind in ("mean", "sum", "concat1"):
        exact = _exact_l2(lm)
        assert rep.global_bound.value <= exact * 1.05, (rep.global_bound.value, exact)


def test_reduce_mean_norm_is_exact():
    """mean over H x W of C channels: the operator's l2 norm is 1/sqrt(HW) (rows are disjoint averages)."""
    class M(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    lm = lipverify.load(M(), input_shape=(3, 4, 5))
    rep = lm.bounds("2")
    assert rep.global_bound.value == pytest.approx(1 / math.sqrt(20), rel=1e-5)
    assert lm.bounds("inf").global_bound.value == pytest.approx(1.0, rel=1e-5)


def test_gelu_as_onnx_writes_it(tmp_path):
    """torch's GELU exported to ONNX becomes Div, Erf, Add, Mul, Mul: recognised as 2 GELU times 0.5."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).eval()
    path = tmp_path / "g.onnx"
    _export(net, (6,), path)
    assert any(n.op_type == "Erf" for n in onnx.load(str(path)).graph.node)
    lm = lipverify.load(path)
    rep = lm.bounds("2")
    acts = [r for r in rep.layers if r.kind == "activation"]
    assert len(acts) == 1 and "gelu" in acts[0].op
    # the bound equals the product of the exact layer norms and the GELU slope (1.129, after the 0.5 x 2)
    w1, w2 = net[0].weight.detach().double(), net[2].weight.detach().double()
    expect = float(torch.linalg.matrix_norm(w1, 2) * torch.linalg.matrix_norm(w2, 2)) * 1.1290
    assert rep.global_bound.value == pytest.approx(expect, rel=1e-4)


class _Bilinear(nn.Module):
    def __init__(self, align):
        super().__init__()
        self.align = align
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 10 * 14, 4)

    def forward(self, x):
        h = F.interpolate(self.conv(x), size=(10, 14), mode="bilinear", align_corners=self.align)
        return self.fc(torch.flatten(h, 1))


@pytest.mark.parametrize("fmt", ["module", "onnx", "pt2"])
@pytest.mark.parametrize("align", [False, True])
def test_bilinear_resize_is_a_separable_linear_map(fmt, align, tmp_path):
    """Bilinear upsampling is linear: the network conv -> resize -> dense is linear, so its exact l2
    constant is the norm of its (constant) Jacobian, which the bound must match."""
    torch.manual_seed(0)
    net = _Bilinear(align).eval()
    if fmt == "onnx":
        path = tmp_path / "r.onnx"
        _export(net, (2, 5, 6), path)
        assert any(n.op_type == "Resize" for n in onnx.load(str(path)).graph.node)
        lm = lipverify.load(path)
    elif fmt == "pt2":
        ep = torch.export.export(net, (torch.rand(2, 2, 5, 6),),
                                 dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},))
        path = tmp_path / "r.pt2"
        torch.export.save(ep, str(path))
        lm = lipverify.load(path)
    else:
        lm = lipverify.load(net, input_shape=(2, 5, 6))
    exact = _exact_l2(lm)
    bound = lm.bounds("2").global_bound.value
    assert exact <= bound <= exact * (1 + 1e-4), (bound, exact)


@pytest.mark.parametrize("fmt", ["module", "onnx", "pt2"])
def test_tanh_gelu_in_every_format(fmt, tmp_path):
    """GELU(approximate='tanh'): a module / aten op, and in ONNX the polynomial x + 0.044715 x^3 inside a
    Tanh, + 1, times x (recognised as 2 GELU, never as products): the exact layer norms times 1.1291."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 3)).eval()
    if fmt == "onnx":
        path = tmp_path / "g.onnx"
        _export(net, (6,), path)
        assert any(n.op_type == "Tanh" for n in onnx.load(str(path)).graph.node)
        lm = lipverify.load(path)
    elif fmt == "pt2":
        ep = torch.export.export(net, (torch.rand(2, 6),), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},))
        path = tmp_path / "g.pt2"
        torch.export.save(ep, str(path))
        lm = lipverify.load(path)
    else:
        lm = lipverify.load(net, input_shape=(6,))
    rep = lm.bounds("2")
    assert rep.domain is None and not lm.graph.domain_nodes()
    acts = [r for r in rep.layers if r.kind == "activation"]
    assert len(acts) == 1 and "gelu(tanh)" in acts[0].op
    w1, w2 = net[0].weight.detach().double(), net[2].weight.detach().double()
    expect = float(torch.linalg.matrix_norm(w1, 2) * torch.linalg.matrix_norm(w2, 2)) * 1.1291
    assert rep.global_bound.value == pytest.approx(expect, rel=1e-4)


@pytest.mark.parametrize("fmt", ["module", "onnx"])
@pytest.mark.parametrize("pool", [dict(kernel_size=2, stride=2, ceil_mode=True, count_include_pad=False),
                                  dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
                                  dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)])
def test_average_pooling_with_varying_divisors(pool, fmt, tmp_path):
    """timm's ResNet-D downsampling (ceil_mode, count_include_pad=False): exact operator norm as oracle."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.AvgPool2d(**pool), nn.Flatten()).eval()
    shape = (2, 7, 7)
    lm = _load(net, shape, fmt, tmp_path)
    mat = _operator_matrix(net, shape)
    exact = float(torch.linalg.matrix_norm(mat, ord=2))
    got = lm.bounds("2").global_bound.value
    assert exact <= got <= exact * 1.5, (exact, got)
    assert lm.bounds("inf").global_bound.value >= float(mat.abs().sum(dim=1).max()) * (1 - 1e-9)


@pytest.mark.parametrize("out", [(7, 7), (3, 5), (1, 1)])
def test_adaptive_average_pooling_any_sizes(out):
    """Windows of varying size (VGG's 2x2 -> 7x7): exact operator norm from impulse responses as oracle."""
    net = nn.Sequential(nn.AdaptiveAvgPool2d(out), nn.Flatten()).eval()
    shape = (2, 4, 6)
    lm = lipverify.load(net, input_shape=shape)
    mat = _operator_matrix(net, shape)
    exact = float(torch.linalg.matrix_norm(mat, ord=2))
    got = lm.bounds("2").global_bound.value
    assert exact <= got <= exact * 1.5, (exact, got)


@pytest.mark.parametrize("fmt", ["module", "onnx"])
def test_nearest_resize_is_a_selection(fmt, tmp_path):
    """Nearest up-sampling by 2 repeats every pixel 4 times: l2 norm exactly 2 (the multiplicity's root)."""
    net = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Flatten()).eval()
    shape = (2, 3, 3)
    lm = _load(net, shape, fmt, tmp_path)
    assert lm.bounds("2").global_bound.value == pytest.approx(2.0, rel=1e-5)
    # bilinear and bicubic are linear too (separable interpolation, not selections): the exact norm
    for mode in ("bilinear", "bicubic"):
        lin = nn.Sequential(nn.Upsample(scale_factor=2, mode=mode), nn.Flatten()).eval()
        lm = _load(lin, shape, fmt, tmp_path)
        exact = _exact_l2(lm)
        assert exact <= lm.bounds("2").global_bound.value <= exact * (1 + 1e-4)


@pytest.mark.parametrize("fmt", ["module", "onnx"])
@pytest.mark.parametrize("kw", [dict(stride=2, padding=1, output_padding=1), dict(stride=1, padding=0),
                                dict(stride=2, padding=0, groups=2)])
def test_transposed_convolution_bound_against_exact_norm(kw, fmt, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, **kw), nn.Flatten()).eval()
    shape = (4, 5, 5)
    lm = _load(net, shape, fmt, tmp_path)
    mat = _operator_matrix(net, shape)
    exact2 = float(torch.linalg.matrix_norm(mat, ord=2))
    exact_inf = float(mat.abs().sum(dim=1).max())
    got2, got_inf = lm.bounds("2").global_bound.value, lm.bounds("inf").global_bound.value
    assert exact2 <= got2 <= exact2 * 1.6, (exact2, got2)
    assert exact_inf * (1 - 1e-9) <= got_inf


@pytest.mark.parametrize("fmt", ["module", "onnx"])
@pytest.mark.parametrize("pad", [nn.ReflectionPad2d(1), nn.ReplicationPad2d(1), nn.ZeroPad2d((1, 2, 0, 1))])
def test_padding_modes_are_selections(pad, fmt, tmp_path):
    """Reflect / edge / constant padding copy input pixels: the exact norm is sqrt(max copies)."""
    net = nn.Sequential(pad, nn.Flatten()).eval()
    shape = (2, 4, 4)
    lm = _load(net, shape, fmt, tmp_path)
    exact = float(torch.linalg.matrix_norm(_operator_matrix(net, shape), ord=2))
    assert lm.bounds("2").global_bound.value == pytest.approx(exact, rel=1e-5)
