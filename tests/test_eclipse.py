"""Compositional l2 bounds of dense chains (``lipverify.bounds.eclipse``).

Oracles: brute force over every activation pattern of tiny ReLU nets (the bound must be at least the
largest ``||W_L D ... D W_0||`` with ``D`` 0/1 diagonal, which is at least the true constant), sampled
difference quotients of the real network, the SDP optimum of LipSDP (``eclipse`` can only approach it
from above), the product of spectral norms (never exceeded), and LipSDP's published value on the
authors' ``random_weights.mat``.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from lipverify.bounds.eclipse import eclipse, eclipse_fast
from lipverify.bounds.lipsdp import lipsdp, product_bound


def _weights(sizes, seed):
    g = np.random.default_rng(seed)
    return [g.standard_normal((b, a)) / np.sqrt(a) for a, b in zip(sizes[:-1], sizes[1:])]


def _pattern_max(ws):
    hidden = [w.shape[0] for w in ws[:-1]]
    best = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=sum(hidden)):
        d = np.array(bits)
        M = ws[0]
        k = 0
        for w, h in zip(ws[1:], hidden):
            M = w @ (d[k:k + h, None] * M)
            k += h
        best = max(best, np.linalg.norm(M, 2))
    return best


@pytest.mark.parametrize("sizes,seed", [((3, 5, 4, 2), 0), ((4, 3, 3, 3, 2), 1), ((2, 6, 3), 2)])
def test_between_the_activation_pattern_maximum_and_the_product(sizes, seed):
    ws = _weights(sizes, seed)
    pat = _pattern_max(ws)
    fast = eclipse_fast(ws)
    pol = eclipse(ws, time_limit=5)
    prod = product_bound(ws)
    assert fast.sound and pol.sound
    assert pat * (1 - 1e-9) <= pol.value <= fast.value * (1 + 1e-12) <= prod * (1 + 1e-9)
    sdp = lipsdp(ws, form="neuron")
    assert pol.value >= sdp.value * (1 - 1e-4)  # no certificate beats the SDP optimum
    # the real ReLU network: difference quotients never exceed the bound
    net = nn.Sequential(*[m for w in ws for m in (nn.Linear(w.shape[1], w.shape[0], bias=True), nn.ReLU())][:-1]).double()
    with torch.no_grad():
        for lin, w in zip([m for m in net if isinstance(m, nn.Linear)], ws):
            lin.weight.copy_(torch.from_numpy(w))
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2000, sizes[0], generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(2000, sizes[0], generator=g, dtype=torch.float64)
    with torch.no_grad():
        q = (net(a) - net(b)).norm(dim=1) / (a - b).norm(dim=1)
    assert float(q.max()) <= pol.value * (1 + 1e-9)


def test_slope_ranges_other_than_relu():
    ws = _weights((4, 6, 5, 3), 3)
    r1 = eclipse_fast(ws, 0.0, 1.0).value
    r4 = eclipse_fast(ws, 0.0, 0.25).value  # sigmoid: every constant scales by beta per hidden layer
    assert r4 == pytest.approx(r1 * 0.25 ** 2, rel=1e-6)
    assert eclipse_fast(ws, 0.01, 1.0).value == pytest.approx(r1, rel=1e-9)  # uses [0, beta]
    from lipverify.errors import UserInputError

    with pytest.raises(UserInputError, match="slopes >= 0"):
        eclipse_fast(ws, -0.17, 1.13)


@pytest.mark.realdata
def test_reproduces_lipsdp_published_value(realdata):
    import scipy.io as sio

    w = [np.asarray(x, dtype=np.float64) for x in sio.loadmat(realdata / "lipsdp" / "random_weights.mat")["weights"].ravel()]
    pol = eclipse(w, time_limit=10)
    fast = eclipse_fast(w)
    assert 36.482 * (1 - 1e-4) <= pol.value <= 36.482 * (1 + 1e-3)  # LipSDP-Neuron (published)
    assert 39.839 * (1 - 1e-4) <= fast.value <= product_bound(w)  # at least LipSDP-Layer's optimum


def test_cli_bounds_eclipse_and_refusals(tmp_path):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    p = tmp_path / "mlp.onnx"
    torch.onnx.export(dense, (torch.zeros(1, 6),), str(p), dynamo=False, opset_version=17)
    out = {}
    from lipverify.cli import main

    for m in ("sound", "eclipse-fast", "eclipse"):  # in this process; the refusal below in its own
        r = CliRunner().invoke(main, ["bounds", str(p), "--method", m, "--json"])
        assert r.exit_code == 0, r.output
        out[m] = json.loads(r.stdout)["global"]
    assert out["eclipse"]["sound"] and "verified a posteriori" in out["eclipse"]["method"]
    assert out["eclipse"]["value"] <= out["eclipse-fast"]["value"] <= out["sound"]["value"] * (1 + 1e-9)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    q = tmp_path / "conv.onnx"
    torch.onnx.export(conv, (torch.zeros(1, 1, 10, 10),), str(q), dynamo=False, opset_version=17)
    r = subprocess.run([sys.executable, "-m", "lipverify", "bounds", str(q), "--method", "eclipse"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "eclipse needs a chain" in r.stderr and "Traceback" not in r.stderr
