"""Real third-party models (skipped with a reason when the data folder is absent).

Oracles: onnxruntime (fidelity), the published clean accuracies in ground_truth/model_accuracy.csv,
the per-layer spectral norms of spectral_NOR_MLP_B published with the data (1.195, 0.954, 0.861), the
ONNX twin of cifar_base_kw.pth, and optimised difference quotients that must stay below the bounds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lipverify

pytestmark = [pytest.mark.realdata, pytest.mark.slow]
ARCH = str(Path(__file__).resolve().parent.parent / "examples" / "architectures.py")

ONNX = {
    # file: (data file, normalisation outside the model, published accuracy, n images)
    "mnist-net_256x2.onnx": ("mnist_test_1000.npz", None, 0.978, 1000),
    "Convnet_maxpool.onnx": ("mnist_test_1000.npz", None, 0.976, 1000),
    "cifar_base_kw.onnx": ("cifar10_test_100.npz", ("0.485,0.456,0.406", "0.225"), 0.73, 100),
    "resnet_2b.onnx": ("cifar10_test_100.npz", ("0.4914,0.4822,0.4465", "0.2471,0.2435,0.2616"), 0.77, 100),
}


def _data(realdata, name):
    d = np.load(realdata / "data" / name)
    return torch.from_numpy(d["x"]), torch.from_numpy(d["y"])


@pytest.mark.parametrize("fname", sorted(ONNX))
def test_onnx_models_load_faithfully_and_get_sound_bounds(realdata, fname):
    data, norm, acc, n = ONNX[fname]
    x, y = _data(realdata, data)
    mean, std = norm if norm else (None, None)
    lm = lipverify.load(realdata / "models" / "onnx" / fname, mean=mean, std=std)
    assert lm.fidelity.passed and lm.fidelity.max_rel_diff < 1e-5
    with torch.no_grad():
        pred = lm(x.reshape((len(x),) + lm.input_shape)).argmax(1)
    assert int((pred == y).sum()) == round(acc * n)
    for p in ("2", "inf"):
        rep = lm.bounds(p)
        assert rep.global_bound.sound and rep.margin.sound
        assert all(r.sound for r in rep.layers)
        assert np.isfinite(rep.global_bound.value) and rep.global_bound.value > 0
    # power iteration approaches from below
    assert lm.bounds("2", "power").global_bound.value <= lm.bounds("2").global_bound.value * (1 + 1e-6)


@pytest.mark.parametrize("fname", sorted(ONNX))
def test_real_model_ratios_below_margin_constants(realdata, fname):
    lm = lipverify.load(realdata / "models" / "onnx" / fname)
    K = lm.margin_constants("2").K
    data, _, _, _ = ONNX[fname]
    x, _ = _data(realdata, data)
    x = x[:32].reshape((32,) + lm.input_shape).double()
    model = lm.module.double()
    a = x.clone().requires_grad_(True)
    b = (x + 0.01 * torch.randn_like(x)).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=0.01)
    best = torch.zeros(())
    for _ in range(40):
        fa, fb = model(a).reshape(32, -1), model(b).reshape(32, -1)
        j = fa.argmax(1)
        i = (fa - 1e9 * torch.nn.functional.one_hot(j, fa.shape[1])).argmax(1)
        num = (fa.gather(1, j[:, None]) - fa.gather(1, i[:, None]) - fb.gather(1, j[:, None]) + fb.gather(1, i[:, None]))[:, 0]
        ratio = num.abs() / (a - b).flatten(1).norm(dim=1)
        kji = K[j, i]
        assert torch.all(ratio.detach() <= kji * (1 + 1e-9))
        best = torch.maximum(best, (ratio.detach() / kji).max())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    model.float()
    assert 0 < float(best) <= 1


def test_spectral_nor_mlp_b_layer_norms(realdata):
    lm = lipverify.load(realdata / "models" / "pytorch" / "spectral_NOR_MLP_B.pth",
                        arch=f"{ARCH}:spectral_nor_mlp_b", input_shape=(1, 28, 28))
    rows = [r for r in lm.bounds("2").layers if r.kind == "linear"]
    assert [round(r.lipschitz, 3) for r in rows] == [1.195, 0.954, 0.861]
    assert all(r.sound for r in rows)
    g = lm.bounds("2").global_bound.value
    assert g == pytest.approx(1.195 * 0.954 * 0.861, rel=2e-3)
    # folded outside normalisation: 1/std in pixel space
    lp = lipverify.load(realdata / "models" / "pytorch" / "spectral_NOR_MLP_B.pth",
                        arch=f"{ARCH}:spectral_nor_mlp_b", input_shape=(1, 28, 28), mean="0.1307", std="0.3081")
    assert lp.bounds("2").global_bound.value == pytest.approx(g / 0.3081, rel=1e-5)
    x, y = _data(realdata, "mnist_test_1000.npz")
    with torch.no_grad():
        acc = float((lp(x).argmax(1) == y).float().mean())
    assert acc > 0.95


def test_state_dicts_load_and_match_onnx_twin(realdata):
    kw = lipverify.load(realdata / "models" / "pytorch" / "kw_mnist.pth", arch=f"{ARCH}:kw_mnist",
                        input_shape="1,28,28")
    x, y = _data(realdata, "mnist_test_1000.npz")
    with torch.no_grad():
        assert float((kw(x).argmax(1) == y).float().mean()) > 0.97
    assert kw.bounds("2").global_bound.sound
    sd = lipverify.load(realdata / "models" / "pytorch" / "cifar_base_kw.pth", arch=f"{ARCH}:cifar_base_kw",
                        input_shape=(3, 32, 32))
    ox = lipverify.load(realdata / "models" / "onnx" / "cifar_base_kw.onnx")
    xc, _ = _data(realdata, "cifar10_test_100.npz")
    with torch.no_grad():
        assert float((sd(xc) - ox(xc)).abs().max()) < 1e-5
    for p in ("2", "inf"):
        assert sd.bounds(p).global_bound.value == pytest.approx(ox.bounds(p).global_bound.value, rel=1e-6)
