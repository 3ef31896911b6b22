"""Constant subgraphs folded before conversion (``lipverify.importers.onnx_fold``), and bounds that
overflow float64 said plainly.

Oracles: the spectral norm of the model's Jacobian at sampled points (autograd and an exact SVD, not
lipverify) under every bound; the same network saved three ways (ONNX, ``torch.export``, state dict
with ``--arch``) gives the same bound; onnxruntime on the original file (the fidelity check); for the
overflow, a network whose layer constants are known in closed form (``1e35`` per layer).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

import lipverify
from lipverify.cli import main
from lipverify.errors import UserInputError
from nets import jacobian_spectral_lower_bound


class StdConv2d(nn.Conv2d):
    """Weight-standardised convolution written the way timm's ``ScaledStdConv2d`` (NF-ResNets, NFNets)
    writes it: ``batch_norm`` in training mode over the weight tensor."""

    def __init__(self, cin, cout, k, stride=1, padding=0, eps=1e-6):
        super().__init__(cin, cout, k, stride=stride, padding=padding)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1) * 1.3)
        self.scale = (cin * k * k) ** -0.5
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class NFNet(nn.Module):
    """An NF-ResNet-style network: standardised convolutions, scaled residual branch, no BatchNorm."""

    def __init__(self):
        super().__init__()
        self.stem = StdConv2d(3, 8, 3, stride=2, padding=1)
        self.c1 = StdConv2d(8, 8, 3, padding=1)
        self.c2 = StdConv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.stem(x)
        h = h + 0.2 * self.c2(F.relu(self.c1(F.relu(h) * 1.1)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(h), 1).flatten(1))


class WNNet(nn.Module):
    """Weight normalisation and a spectral-norm parametrisation (torch.nn.utils.parametrizations)."""

    def __init__(self):
        super().__init__()
        p = nn.utils.parametrizations
        self.c1 = p.weight_norm(nn.Conv2d(3, 8, 3, stride=2, padding=1))
        self.fc1 = nn.utils.spectral_norm(nn.Linear(8 * 8 * 8, 32))  # the hook-based one exports to ONNX
        self.fc2 = p.weight_norm(nn.Linear(32, 10))

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.relu(self.c1(x)).flatten(1))))


ARCH = '''
import sys
sys.path.insert(0, {here!r})
from test_onnx_fold import NFNet, WNNet
'''


def _jacobian_lower_bound(net, shape, n=3):
    m64 = type(net)()
    m64.load_state_dict(net.state_dict())  # a fresh copy (parametrised weights are not deep-copyable)
    return jacobian_spectral_lower_bound(m64.double().eval(), shape, n)


def _save_three_ways(net, tmp_path, name):
    torch.manual_seed(1)
    for _ in range(3):  # the spectral-norm parametrisation settles its power iteration in training mode
        net.train()(torch.rand(4, 3, 16, 16))
    net.eval()
    x = torch.rand(2, 3, 16, 16)
    onnx_path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x[:1],), str(onnx_path), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "b"}})
        ep = torch.export.export(net, (x,), dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=1024)}})
    pt2 = tmp_path / f"{name}.pt2"
    torch.export.save(ep, str(pt2))
    sd = tmp_path / f"{name}.pth"
    torch.save(net.state_dict(), sd)
    arch = tmp_path / "arch_fold.py"
    arch.write_text(ARCH.format(here=str(Path(__file__).resolve().parent)))
    return onnx_path, pt2, sd, arch


@pytest.mark.parametrize("cls", [NFNet, WNNet], ids=lambda c: c.__name__)
def test_weight_computing_networks_load_and_bound_soundly_in_every_format(cls, tmp_path):
    torch.manual_seed(0)
    net = cls()
    onnx_path, pt2, sd, arch = _save_three_ways(net, tmp_path, cls.__name__)
    lower = _jacobian_lower_bound(net, (3, 16, 16))
    values = []
    for what, load in [("onnx", lambda: lipverify.load(onnx_path)), ("pt2", lambda: lipverify.load(pt2)),
                       ("pth", lambda: lipverify.load(sd, arch=f"{arch}:{cls.__name__}", input_shape=(3, 16, 16)))]:
        lm = load()
        if lm.fidelity is not None:
            assert lm.fidelity.passed, what
        rep = lm.bounds("2")
        assert rep.global_bound.sound and rep.overflow_at is None
        assert rep.global_bound.value >= lower * (1 - 1e-6), (what, rep.global_bound.value, lower)
        kinds = {n.kind for n in lm.graph.nodes}
        assert kinds <= {"input", "linear", "activation", "add"}, (what, kinds)  # no product of weights left
        values.append(rep.global_bound.value)
        if what == "onnx" and cls is NFNet:
            assert any("BatchNormalization" in n and "folded" in n for n in lm.notes), lm.notes
    # the same weights whichever way they were saved (ONNX folds in float32 like the exporter)
    assert values[0] == pytest.approx(values[1], rel=1e-5) and values[1] == pytest.approx(values[2], rel=1e-9)


def test_cli_bounds_an_nf_network_and_names_the_folding(tmp_path):
    torch.manual_seed(0)
    onnx_path, *_ = _save_three_ways(NFNet(), tmp_path, "nf")
    res = CliRunner().invoke(main, ["bounds", str(onnx_path)])
    assert res.exit_code == 0, res.output
    assert "folded" in res.output


def _graph_with_constant(const_nodes, out_const):
    """input x (1, 4) + a constant computed by ``const_nodes`` (output ``out_const``), then a MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(4, 3, dtype=np.float32), "w")
    nodes = list(const_nodes) + [helper.make_node("Add", ["x", out_const], ["h"], name="add"),
                                 helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], initializer=[w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _save(model, tmp_path, name):
    import onnx

    p = tmp_path / f"{name}.onnx"
    onnx.save(model, str(p))
    return p


@pytest.mark.parametrize("rows,named", [(75_000_000, True), (10 ** 10, False)])
def test_a_huge_declared_constant_is_refused_before_it_is_allocated(tmp_path, rows, named):
    """A ``ConstantOfShape`` declaring 3e8 entries (1.2 GB) passes the whole-model memory estimate and is
    refused by the folding, naming the node; one declaring 4e10 is refused by the memory estimate
    first.  Neither is allocated."""
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([rows, 4], dtype=np.int64), "shape")
    node = helper.make_node("ConstantOfShape", ["shape"], ["big"], name="huge_fill",
                            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    m = _graph_with_constant([node], "big")
    m.graph.initializer.append(shape)
    p = _save(m, tmp_path, "huge")
    with pytest.raises(UserInputError) as exc:
        lipverify.load(p)
    msg = str(exc.value)
    assert "\n" not in msg and ("huge_fill" in msg and "ConstantOfShape" in msg if named else "would need" in msg)
    res = CliRunner().invoke(main, ["bounds", str(p)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert ("huge_fill" in res.output) == named


def test_a_constant_that_computes_nan_is_refused(tmp_path):
    from onnx import helper, numpy_helper

    z = numpy_helper.from_array(np.zeros(4, dtype=np.float32), "z")
    node = helper.make_node("Div", ["z", "z"], ["nan"], name="zero_over_zero")
    m = _graph_with_constant([node], "nan")
    m.graph.initializer.append(z)
    p = _save(m, tmp_path, "nan")
    res = CliRunner().invoke(main, ["bounds", str(p)])
    assert res.exit_code == 2 and "zero_over_zero" in res.output and "non-finite" in res.output


def test_folded_chain_matches_onnxruntime(tmp_path):
    """Transpose / Mul / Sqrt / ReduceMean of initializers (a whole constant subgraph) folded: the
    converted module agrees with onnxruntime on the original file, and the bound is the exact norm."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    v = rng.standard_normal((3, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(v, "v"), numpy_helper.from_array(np.float32(2.0), "two")]
    nodes = [helper.make_node("Mul", ["v", "v"], ["vv"], name="sq"),
             helper.make_node("ReduceMean", ["vv"], ["ms"], name="ms", axes=[1], keepdims=1),
             helper.make_node("Sqrt", ["ms"], ["rms"], name="rms"),
             helper.make_node("Div", ["v", "rms"], ["vn"], name="norm"),
             helper.make_node("Mul", ["vn", "two"], ["w2"], name="gain"),
             helper.make_node("Transpose", ["w2"], ["wt"], name="tr", perm=[1, 0])]
    from onnx import TensorProto

    g = helper.make_graph(nodes + [helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    p = _save(m, tmp_path, "chain")
    lm = lipverify.load(p)
    assert any("6 node(s)" in n and "folded" in n for n in lm.notes), lm.notes
    x = rng.random((5, 4)).astype(np.float32)
    want = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = lm(torch.from_numpy(x)).detach().numpy()
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
    W = (2.0 * v / np.sqrt((v.astype(np.float64) ** 2).mean(1, keepdims=True)))
    assert lm.bounds("2").global_bound.value == pytest.approx(np.linalg.norm(W, 2), rel=1e-5)


def _overflowing_net():
    """Ten linear layers of constant 1e35 each (closed form) separated by ReLUs; the products of the
    matrices cancel, so the logits stay finite while the product bound passes 1.8e308 at the ninth."""
    layers = []
    for k in range(10):
        lin = nn.Linear(4, 4)
        with torch.no_grad():
            lin.weight.zero_()
            lin.weight[1, 0] = 1e35  # rank one, ||W|| = 1e35; reads unit 0, writes unit 1: W_{k+1} W_k = 0
            lin.bias.fill_(0.5)
        layers += [lin, nn.ReLU()] if k < 9 else [lin]
    return nn.Sequential(*layers).eval()


def test_a_bound_past_float64_reports_where_it_overflowed(tmp_path):
    net = _overflowing_net()
    lm = lipverify.load(net, input_shape=(4,))
    rep = lm.bounds("2")
    names = [r.name for r in rep.layers if r.kind == "linear"]
    # running product: 1e35^k passes 1.8e308 at the ninth linear layer (1e315)
    assert rep.overflow_at == names[8], (rep.overflow_at, names)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["global"]["value"] is None and d["global"]["infinite"] is True
    assert d["overflow"]["layer"] == names[8] and d["layers"][d["overflow"]["index"]]["name"] == names[8]
    assert d["margin"]["infinite"] is True
    flags = [r["overflow"] for r in d["layers"]]
    assert not any(flags[:d["overflow"]["index"]]) and flags[d["overflow"]["index"]]
    from lipverify.report.files import layer_rows

    rows, _ = layer_rows(d)  # the audit report's running product: inf from the overflow on, not "-"
    k = d["overflow"]["index"]
    assert rows[k]["running"] == float("inf") and rows[k - 1]["running"] == pytest.approx(1e35 ** 8, rel=1e-4)
    lm_path = tmp_path / "ovf.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(1, 4),), str(lm_path), dynamo=False, opset_version=17)
    res = CliRunner().invoke(main, ["bounds", str(lm_path)])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "inf (overflow at layer" in flat and "overflows float64" in flat
    res = CliRunner().invoke(main, ["bounds", str(lm_path), "--json"])
    d = json.loads(res.stdout)
    assert d["global"]["infinite"] and d["overflow"] is not None


def test_a_training_mode_batchnorm_on_activations_is_named(tmp_path):
    """A BatchNormalization with batch statistics on input-dependent values cannot be folded: refused
    with the node named and the reason, exit 2."""
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    p = tmp_path / "bn_train.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(2, 4),), str(p), dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    res = CliRunner().invoke(main, ["bounds", str(p)])
    assert res.exit_code == 2, res.output
    assert "BatchNormalization" in res.output and "training mode" in res.output and "Traceback" not in res.output
