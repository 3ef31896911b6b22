"""The trainable GloRo view: live parameters, power-iteration estimates against the sound bound,
gradients, surgery (MinMax, clipped ReLU, last-layer normalisation) and ONNX round trips."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import lipverify
from lipverify.graph.linear_ops import Dense
from lipverify.importers.fx import build_graph
from lipverify.importers.normalize import PixelSpaceModel
from lipverify.importers.onnx import export_to_onnx
from lipverify.models.layers import MinMax
from lipverify.train import surgery
from lipverify.train.trainable import (
    GloroBound,
    build_trainable_graph,
    check_graph,
    select_trainable,
)


def _view(lm, **kw):
    gm = copy.deepcopy(lm.module.model)
    net = PixelSpaceModel(gm, lm.module.normalize)
    graph = build_trainable_graph(gm, lm.input_shape, lm.module.normalize)
    b = GloroBound(net, graph, **kw)
    check_graph(net, graph, lm.input_shape, "cpu")
    return gm, net, graph, b


def test_keep_params_is_opt_in():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    gm = torch.fx.symbolic_trace(net)
    frozen = build_graph(gm, (4,))
    live = build_graph(gm, (4,), keep_params=True)
    w_frozen = [n.op.weight for n in frozen.nodes if n.kind == "linear" and isinstance(n.op, Dense)]
    w_live = [n.op.weight for n in live.nodes if n.kind == "linear" and isinstance(n.op, Dense)]
    assert all(not isinstance(w, nn.Parameter) and not w.requires_grad for w in w_frozen)
    assert w_live[0] is net[1].weight and w_live[1] is net[3].weight


def test_estimate_tracks_sound_bound_default_model():
    lm = lipverify.load()
    _, net, graph, b = _view(lm)
    K_est = b.margin_constants().detach().double()
    K_sound = lm.margin_constants().K
    off = ~torch.eye(10, dtype=torch.bool)
    ratio = K_est[off] / K_sound[off]
    assert float(ratio.max()) <= 1.0 + 1e-5  # estimates approach the sound bound from below
    assert float(ratio.min()) >= 0.85
    g = b.global_estimate()
    assert g <= lm.bounds().global_bound.value * (1 + 1e-5)


def test_bound_is_differentiable_and_trainable_set():
    lm = lipverify.load()
    _, net, graph, b = _view(lm)
    train, frozen = select_trainable(net, graph)
    assert frozen == []
    K = b.margin_constants()
    K.sum().backward()
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    assert weights and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in weights)


def test_power_step_converges_to_exact_dense_norm():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(20, 15), nn.ReLU(), nn.Linear(15, 15), nn.ReLU(), nn.Linear(15, 4))
    lm = lipverify.load(net, input_shape=(20,))
    _, _, graph, b = _view(lm, init_iters=1)
    for _ in range(300):
        b.power_step(2)
    for i in b.live:
        op = graph.nodes[i].op
        w = [o for o in ([op] if isinstance(op, Dense) else op.ops) if isinstance(o, Dense)][0].weight
        exact = torch.linalg.svdvals(w.detach().double())[0].item()
        assert b.sigma(i).item() == pytest.approx(exact, rel=1e-4)


class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.mp = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c0(x)))
        h = torch.relu(h + self.c1(h))
        h = self.mp(self.pool(h))
        return self.fc(h.flatten(1))


def test_residual_batchnorm_pooling_model():
    torch.manual_seed(0)
    net = _Res().eval()
    with torch.no_grad():
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
    lm = lipverify.load(net, input_shape=(1, 8, 8))
    _, tnet, graph, b = _view(lm)
    train, frozen = select_trainable(tnet, graph)
    assert frozen == []  # the BN scale is re-read from the module: trainable
    assert b.batchnorms == [tnet.model.bn]
    K_est = b.margin_constants().detach().double()
    K_sound = lm.margin_constants().K
    off = ~torch.eye(3, dtype=torch.bool)
    assert float((K_est[off] / K_sound[off]).max()) <= 1.0 + 1e-5
    b.margin_constants().sum().backward()
    assert tnet.model.c1.weight.grad is not None and float(tnet.model.c1.weight.grad.abs().sum()) > 0
    assert tnet.model.bn.weight.grad is not None and float(tnet.model.bn.weight.grad.abs().sum()) > 0
    # the bound follows the BatchNorm scale: doubling gamma doubles the first block's constant
    i0 = b.live[0]
    s0 = float(b.sigma(i0))
    with torch.no_grad():
        tnet.model.bn.weight.mul_(2.0)
    b.converge()
    assert float(b.sigma(i0)) == pytest.approx(2 * s0, rel=1e-3)


def test_normalizer_outside_is_folded():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))
    lm = lipverify.load(net, input_shape=(3, 4, 4), mean="0.5,0.4,0.3", std="0.2,0.25,0.5")
    _, _, graph, b = _view(lm)
    ratio = b.margin_constants().detach().double()[0, 1] / lm.margin_constants().K[0, 1]
    assert 0.9 <= float(ratio) <= 1.0 + 1e-5


def _roundtrip(gm, shape, tmp_path):
    data = export_to_onnx(gm.eval(), shape, None)
    p = tmp_path / "m.onnx"
    p.write_bytes(data)
    return lipverify.load(str(p))


def test_minmax_surgery_exports_and_reimports(tmp_path):
    lm = lipverify.load()
    gm = copy.deepcopy(lm.module.model)
    x = torch.rand(4, 1, 28, 28)
    plan = surgery.swap_relu(gm, "minmax", x)
    assert len(plan) == 3 and all(p["kind"] == "minmax" for p in plan)
    assert sum(isinstance(m, MinMax) for m in gm.modules()) == 3
    back = _roundtrip(gm, (1, 28, 28), tmp_path)
    assert sum(n.kind == "minmax" for n in back.graph.nodes) == 3
    with torch.no_grad():
        assert torch.allclose(back(x), gm(x), atol=1e-5)
    # the trainable view of the swapped network agrees with the re-imported sound bound
    net = PixelSpaceModel(gm, None)
    graph = build_trainable_graph(gm, (1, 28, 28))
    b = GloroBound(net, graph)
    K = b.margin_constants().detach().double()
    off = ~torch.eye(10, dtype=torch.bool)
    r = K[off] / back.margin_constants().K[off]
    assert float(r.max()) <= 1 + 1e-5 and float(r.min()) > 0.85


def test_clip_surgery_and_lln_export_and_reimport(tmp_path):
    lm = lipverify.load()
    gm = copy.deepcopy(lm.module.model)
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        before = gm(x)
    plan = surgery.swap_relu(gm, "clip", x)
    with torch.no_grad():
        assert torch.allclose(gm(x), before, atol=1e-5)  # thresholds start above every activation seen
    path = surgery.normalize_last_layer(gm)
    lin = gm.get_submodule(path)
    assert torch.allclose(lin.weight.norm(dim=1), torch.ones(10), atol=1e-5)
    net = PixelSpaceModel(gm, None)
    graph = build_trainable_graph(gm, (1, 28, 28))
    b = GloroBound(net, graph)
    check_graph(net, graph, (1, 28, 28), "cpu")
    train, frozen = select_trainable(net, graph)
    assert frozen == []
    thetas = [m.theta for m in gm.modules() if isinstance(m, surgery.ClippedReLU)]
    assert len(thetas) == len(plan) == 3
    b.margin_constants().sum().backward()
    assert lin.parametrizations.weight.original.grad is not None
    surgery.bake(gm)
    assert not hasattr(gm.get_submodule(path), "parametrizations")
    back = _roundtrip(gm, (1, 28, 28), tmp_path)
    kinds = [n.op.name for n in back.graph.nodes if n.kind == "activation"]
    assert kinds.count("min(x, const)") == 3
    with torch.no_grad():
        assert torch.allclose(back(x), gm(x), atol=1e-5)
    res = back.certify(x, back(x).argmax(1), eps=0.05, method="local")
    assert res.n == 16


def test_minmax_odd_channels_refused():
    from lipverify.errors import UserInputError

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    lm = lipverify.load(net, input_shape=(4,))
    gm = copy.deepcopy(lm.module.model)
    with pytest.raises(UserInputError, match="even number of channels"):
        surgery.swap_relu(gm, "minmax", torch.rand(2, 4))


def test_apply_plan_rebuilds_arch():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    lm = lipverify.load(net, input_shape=(1, 8, 8))
    gm = copy.deepcopy(lm.module.model)
    plan = surgery.swap_relu(gm, "clip", torch.rand(3, 1, 8, 8))
    fresh = surgery.apply_plan(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)), plan)
    fresh.load_state_dict(gm.state_dict(), strict=True)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fresh(x), gm(x), atol=1e-6)


@pytest.mark.parametrize("name,norm", [
    ("mnist-net_256x2.onnx", {}),
    ("Convnet_maxpool.onnx", {}),
    ("cifar_base_kw.onnx", {"mean": "0.485,0.456,0.406", "std": "0.225"}),
    ("resnet_2b.onnx", {"mean": "0.4914,0.4822,0.4465", "std": "0.2471,0.2435,0.2616"}),
])
def test_third_party_onnx_models(realdata, name, norm):
    """Trainable views of real third-party ONNX models (dense, max pooling, outside normalisation,
    residual blocks with a 1x1 shortcut): the graph reproduces the model, every weight is live, and the
    training estimate of K stays below (and close to) the sound K."""
    lm = lipverify.load(str(realdata / "models" / "onnx" / name), **norm)
    _, net, graph, b = _view(lm)
    train, frozen = select_trainable(net, graph)
    assert train and frozen == []
    K = b.margin_constants().detach().double()
    Ks = lm.margin_constants().K
    off = ~torch.eye(K.shape[0], dtype=torch.bool)
    r = K[off] / Ks[off]
    assert float(r.max()) <= 1 + 1e-5 and float(r.min()) >= 0.85
