"""BatchNorm folding before certified fine-tuning (lipverify.train.convert): the function is preserved,
BatchNorms that cannot be folded are left alone and listed, the bound does not grow, and ``finetune``
reports the conversion and still writes a state dict that loads into the ``--arch`` network."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from click.testing import CliRunner

import lipverify
from lipverify.cli import main
from lipverify.models.zoo import default_samples
from lipverify.train.convert import fold_batchnorm


def _randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial eval statistics, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_var.copy_(torch.rand(n, generator=g) * 3.9 + 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return net.eval()


class SmallBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1, bias=True)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise
        self.b3 = nn.BatchNorm2d(8)
        self.res = nn.Conv2d(8, 8, 3, padding=1)
        self.b4 = nn.BatchNorm2d(8)  # after a residual add: not foldable
        self.fc = nn.Linear(8 * 7 * 7, 16)
        self.b5 = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.dw(x)))
        x = self.b4(x + self.res(x))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.b5(self.fc(x.flatten(1))))
        return self.out(x)


def _check_same(ref: nn.Module, gm: nn.Module, shape, n=16, rtol=1e-5):
    x = torch.randn((n,) + tuple(shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = ref(x), gm(x)
    diff = float((want - got).abs().max())
    assert diff <= rtol * max(1.0, float(want.abs().max())), diff


def test_fold_small_net_preserves_function_and_keeps_residual_bn():
    torch.manual_seed(0)
    ref = _randomize(SmallBN())
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    gm = fx.symbolic_trace(copy.deepcopy(ref))  # symbolic_trace shares the modules: fold a copy
    conv = fold_batchnorm(gm, torch.rand(8, 1, 28, 28))
    assert {f["batchnorm"] for f in conv["folded"]} == {"b1", "b2", "b3", "b5"}
    assert {f["kind"] for f in conv["folded"] if f["batchnorm"] == "b5"} == {"dense"}
    assert [k["batchnorm"] for k in conv["kept"]] == ["b4"]
    assert conv["relative_change"] < 1e-4 and any("folded 4 BatchNorm" in n for n in conv["notes"])
    _check_same(ref, gm, (1, 28, 28))
    gm2 = gm
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert set(gm2.state_dict()) == set(ref.state_dict())
    # the folded BatchNorms have unit scale: their scale moved into the layers
    for name in ("b1", "b2", "b3", "b5"):
        bn = gm2.get_submodule(name)
        assert torch.allclose(bn.weight / torch.sqrt(bn.running_var + bn.eps), torch.ones(bn.num_features))
    bn4 = gm2.get_submodule("b4")
    assert not torch.allclose(bn4.weight / torch.sqrt(bn4.running_var + bn4.eps), torch.ones(8))


def test_fold_shared_conv_output_is_left_alone():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3, padding=1)
            self.b = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.c(x)
            return (self.b(y) + y).flatten(1)

    ref = _randomize(Two())
    gm = fx.symbolic_trace(copy.deepcopy(ref))
    conv = fold_batchnorm(gm, torch.rand(4, 1, 6, 6))
    assert not conv["folded"] and "other users" in conv["kept"][0]["reason"]
    _check_same(ref, gm, (1, 6, 6), rtol=0)


def test_fold_torchvision_resnet18_and_bound_does_not_grow():
    tv = pytest.importorskip("torchvision")
    from lipverify.importers.normalize import PixelSpaceModel
    from lipverify.train.trainable import GloroBound, build_trainable_graph

    torch.manual_seed(0)
    ref = tv.models.resnet18(num_classes=10)
    ref.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    ref = _randomize(ref)
    gm = fx.symbolic_trace(copy.deepcopy(ref))
    shape = (1, 28, 28)

    def estimate(m):
        b = GloroBound(PixelSpaceModel(m, None), build_trainable_graph(m, shape), power_iters=2, init_iters=100)
        return b.global_estimate()

    e0 = estimate(gm)
    conv = fold_batchnorm(gm, torch.rand(8, *shape))
    assert len(conv["folded"]) == 20 and not conv["kept"]
    _check_same(ref, gm, shape)
    e1 = estimate(gm)
    assert e1 <= e0 * (1 + 1e-3), (e0, e1)


def test_fold_pt2_functional_batchnorm(tmp_path):
    """A .pt2 program keeps BatchNorm as a function on constant tensors (get_attr nodes)."""
    from lipverify.train.finetune import _training_module

    torch.manual_seed(0)
    net = _randomize(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.Flatten(), nn.Linear(4 * 8 * 8, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)))
    x = torch.rand(2, 1, 8, 8)
    dim = torch.export.Dim("batch", min=1, max=1024)
    p = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: dim},)), p)
    lm = lipverify.load(str(p), input_shape=(1, 8, 8))
    gm = _training_module(lm)
    conv = fold_batchnorm(gm, torch.rand(4, 1, 8, 8))
    assert len(conv["folded"]) == 2, conv
    _check_same(net, gm, (1, 8, 8))
    # the loaded model itself is untouched
    _check_same(net, lm.module.model if not hasattr(lm.module.model, "wrapped") else lm.module.model.wrapped,
                (1, 8, 8))


ARCH = '''
import torch.nn as nn

def bn_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 7 * 7, 10))
'''


def test_finetune_state_dict_with_batchnorm_reports_conversion(tmp_path):
    x, y = default_samples()
    data = tmp_path / "samples.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    (tmp_path / "bnarch.py").write_text(ARCH)
    ns: dict = {}
    exec(ARCH, ns)
    torch.manual_seed(0)
    net = _randomize(ns["bn_net"]())
    src = tmp_path / "bn.pth"
    torch.save(net.state_dict(), src)
    out = tmp_path / "ft"
    res = CliRunner().invoke(main, [str(a) for a in [
        "finetune", src, "--arch", f"{tmp_path / 'bnarch.py'}:bn_net", "--input-shape", "1,28,28", "--data", data,
        "--eps", "0.3", "--epochs", "1", "--batch-size", "16", "--out", out, "--quiet"]], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    conv = rep["conversion"]
    assert len(conv["folded"]) == 2 and conv["relative_change"] < 1e-4
    assert any("folded 2 BatchNorm" in n for n in rep["notes"])
    chk = rep["outputs"]["state_dict_check"]
    assert chk["checked"] and chk["passed"], chk
    fresh = ns["bn_net"]()
    fresh.load_state_dict(torch.load(out / "model.pt", map_location="cpu", weights_only=True), strict=True)
    fresh.eval()
    lm = lipverify.load(str(out / "model.onnx"))
    with torch.no_grad():
        a, b = fresh(x[:8]), lm.module(x[:8])
    assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(a.abs().max()))


def test_steep_activations_counted_with_their_published_slopes():
    """Hardswish's largest slope is 1.5 (at x -> 3-), GELU's 1.1289 and SiLU's 1.0998 (the maxima of
    their derivatives, found here by brute force on a fine grid); ReLU and Tanh (slope <= 1) are not
    counted."""
    from lipverify.train.convert import steep_activations

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Hardswish(), torch.nn.Linear(8, 8), torch.nn.GELU(),
                              torch.nn.Linear(8, 8), torch.nn.SiLU(), torch.nn.Linear(8, 8), torch.nn.Hardswish(),
                              torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()
    lm = lipverify.load(net, input_shape=(4,))
    found, notes = steep_activations(lm.graph)
    grid = torch.linspace(-8, 8, 2_000_001, dtype=torch.float64, requires_grad=True)
    oracle = {}
    for name, fn in (("hardswish", torch.nn.functional.hardswish), ("gelu", torch.nn.functional.gelu),
                     ("silu", torch.nn.functional.silu)):
        (g,) = torch.autograd.grad(fn(grid).sum(), grid)
        oracle[name] = float(g.max())
    assert set(found) == {"hardswish", "gelu", "silu"}, found
    assert found["hardswish"]["count"] == 2 and found["gelu"]["count"] == 1 and found["silu"]["count"] == 1
    for name, slope in oracle.items():
        # the bound's slope is sound (never below the true maximum) and tight (within 1e-3)
        assert slope - 1e-9 <= found[name]["slope"] <= slope + 1e-3, (name, found[name], slope)
    assert abs(found["hardswish"]["factor"] - found["hardswish"]["slope"] ** 2) < 1e-12
    assert len(notes) == 3 and all("slope" in n for n in notes)
