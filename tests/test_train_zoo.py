"""``lipverify train``: each certifiable architecture trains for a short epoch on CPU, comes back as an
ONNX file that re-imports with the same bound, certifies (never above the attack's radius), and the
LiResNet block constant is the exact norm of its fused convolution."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import lipverify
from lipverify.attacks import min_norm_radius
from lipverify.train.train import build_architecture

CMD = [sys.executable, "-m", "lipverify"]


def _data(tmp_path, shape, n=48, classes=4, seed=0):
    """Separable synthetic images: each class brightens its own quadrant."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = g.uniform(0, 0.3, size=(n, *shape)).astype(np.float32)
    h, w = shape[1] // 2, shape[2] // 2
    for k in range(n):
        r, c = divmod(int(y[k]), 2)
        x[k, :, r * h:(r + 1) * h, c * w:(c + 1) * w] += 0.6
    path = tmp_path / f"d{shape[0]}_{shape[1]}.npz"
    np.savez(path, x=np.clip(x, 0, 1), y=y.astype(np.int64))
    return path


@pytest.mark.parametrize("arch,shape", [("2c2f", None), ("4c3f-minmax", None), ("6c2f", None),
                                        ("liresnet-l2w8", None), ("8c2f-minmax", (3, 16, 16))])
def test_every_architecture_trains_certifies_and_reimports(arch, shape, tmp_path):
    _, family, default_shape = build_architecture(arch, None)
    shape = shape or default_shape
    data = _data(tmp_path, shape)
    out = tmp_path / "out"
    args = ["train", "--arch", arch, "--data", str(data), "--eps", "0.1", "--epochs", "1", "--batch-size", "24",
            "--eval-limit", "16", "--out", str(out), "--quiet", "--json"]
    if shape != default_shape:
        args += ["--input-shape", ",".join(map(str, shape))]
    r = subprocess.run(CMD + args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["architecture"]["name"] == arch and rep["architecture"]["classes"] == 4
    assert rep["config"]["loss"] == ("emma" if family == "liresnet" else "gloro")
    # the output re-imports with the bound the report states (re-verified by the job itself)
    lm = lipverify.load(out / "model.onnx")
    assert lm.input_shape == tuple(shape)
    rep_bound = rep["after"]["global_bound"] if "global_bound" in rep["after"] else None
    if rep_bound is not None:
        assert lm.bounds("2").global_bound.value == pytest.approx(rep_bound, rel=1e-6)
    d = np.load(data)
    x, y = torch.from_numpy(d["x"][:8]), torch.from_numpy(d["y"][:8])
    cert = lm.certify(x, y, eps=[0.1])
    adv = min_norm_radius(lm.module, x[:4], y[:4], norm="2", clip=(0.0, 1.0), method="fmn")  # one per class
    for c, ra in zip(cert.inputs, adv.radius.tolist()):
        if c.pred == c.label:  # (a misclassified input has adversarial radius 0 for its label)
            assert c.radius <= ra + 1e-9
    if arch != "2c2f":
        return
    # certify accepts the trained model directly
    r = subprocess.run(CMD + ["certify", str(out / "model.onnx"), "--data", str(data), "--eps", "0.1", "--quiet",
                              "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_liresnet_block_constant_is_the_fused_kernel_norm():
    """The block x + s beta * conv(x) is one convolution; lipverify's bound of the imported block equals
    the exact operator norm (impulse responses + SVD), and an identity block (beta = 0) gives 1."""
    from lipverify.models.zoo import ScaledResidualConv

    torch.manual_seed(0)
    blk = ScaledResidualConv(4, 1 / math.sqrt(6))
    with torch.no_grad():
        blk.beta.uniform_(0.5, 1.5)
    net = torch.nn.Sequential(blk, torch.nn.Flatten()).eval()
    lm = lipverify.load(net, input_shape=(4, 6, 6))
    eye = torch.eye(4 * 36, dtype=torch.float64).reshape(-1, 4, 6, 6)
    with torch.no_grad():
        M = net.double()(eye).reshape(4 * 36, -1).T
    exact = float(torch.linalg.matrix_norm(M, 2))
    bound = lm.bounds("2").global_bound.value
    assert exact <= bound <= exact * (1 + 1e-4)
    naive = 1 + float(torch.linalg.matrix_norm(M - torch.eye(4 * 36, dtype=torch.float64), 2))  # 1 + ||s beta K||
    assert bound < naive
    with torch.no_grad():
        blk.beta.zero_()
    lm = lipverify.load(torch.nn.Sequential(blk, torch.nn.Flatten()).eval().float(), input_shape=(4, 6, 6))
    assert lm.bounds("2").global_bound.value == pytest.approx(1.0, rel=1e-5)


def test_liresnet_blocks_share_one_batched_power_iteration():
    """In training the L blocks of a LiResNet are iterated as one grouped convolution; the vectors equal
    those of separate iterations, and each converges to the block's exact top singular value."""
    import copy

    from lipverify.importers.fx import trace_module
    from lipverify.importers.normalize import PixelSpaceModel
    from lipverify.models.zoo import ScaledResidualConv
    from lipverify.train.trainable import GloroBound, build_trainable_graph

    torch.manual_seed(0)
    mod, _, shape = build_architecture("liresnet-l4w8", (1, 12, 12))
    with torch.no_grad():
        for m in mod.modules():
            if isinstance(m, ScaledResidualConv):
                m.beta.uniform_(0.5, 2.0)
    gm = trace_module(copy.deepcopy(mod))
    graph = build_trainable_graph(gm, shape, None, torch.device("cpu"))
    bound = GloroBound(PixelSpaceModel(gm, None), graph, power_iters=3, seed=0, init_iters=1)
    groups = bound._power_groups()
    assert sorted(len(g) for g in groups)[-1] == 4  # the four blocks in one group
    start = {i: bound._u(i).clone() for i in bound.live}
    bound.power_step(7)
    batched = {i: bound._u(i).clone() for i in bound.live}
    for i in bound.live:
        bound._u(i).copy_(start[i])
    for i in bound.live:  # the same iterations, one operator at a time
        op = graph.nodes[i].op
        u = start[i]
        for _ in range(7):
            u = op.adjoint(op.apply(u))
            u = u / u.norm()
        assert torch.allclose(batched[i], u, atol=1e-5)
    bound.power_step(300)
    block = max(groups, key=len)
    for i in block:
        op = graph.nodes[i].op
        n = int(math.prod(op.in_shape))
        eye = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(op.in_shape))
        with torch.no_grad():
            M = op.apply(eye.float()).double().reshape(n, -1)
        exact = float(torch.linalg.matrix_norm(M, 2))
        assert float(bound.sigma(i).detach()) == pytest.approx(exact, rel=1e-3)


def test_train_refuses_unknown_architectures_and_lists_them(tmp_path):
    r = subprocess.run(CMD + ["train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for name in ("2c2f", "4c3f", "6c2f", "8c2f", "-minmax", "liresnet-l<L>w<W>"):
        assert name in r.stdout
    data = _data(tmp_path, (1, 28, 28), n=8)
    r = subprocess.run(CMD + ["train", "--arch", "resnet9000", "--data", str(data), "--eps", "0.1", "--out",
                              str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown architecture" in r.stderr and "Traceback" not in r.stderr


def test_train_resumes_its_own_run(tmp_path):
    data = _data(tmp_path, (1, 28, 28), n=64)
    out = tmp_path / "o"
    base = CMD + ["train", "--arch", "2c2f", "--data", str(data), "--eps", "0.1", "--epochs", "2", "--batch-size",
                  "32", "--out", str(out), "--quiet", "--json"]
    r = subprocess.run(base + ["--stop-after-epochs", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(base + ["--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed = json.loads(r.stdout)
    full = tmp_path / "full"
    r = subprocess.run([a if a != str(out) else str(full) for a in base], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    straight = json.loads(r.stdout)
    drop = ("time_s",)
    assert {k: v for k, v in resumed["after"].items() if k not in drop} == \
        {k: v for k, v in straight["after"].items() if k not in drop}


def test_linf_distance_net_trains_certifies_and_reloads(tmp_path):
    """linf-dist-DxW through lipverify train: the lp schedule ends at p = inf, the state dict and arch.py
    load back into the same certificates, certification refuses l2, and r_cert <= r_adv (l-inf)."""
    data = _data(tmp_path, (1, 8, 8), n=64)
    out = tmp_path / "o"
    r = subprocess.run(CMD + ["train", "--arch", "linf-dist-3x32", "--data", str(data), "--eps", "0.05", "--epochs",
                              "3", "--batch-size", "32", "--out", str(out), "--quiet", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["architecture"]["family"] == "linf-dist" and rep["norm"] == "inf"
    assert rep["history"][0]["p_end"] == 8.0  # the relaxation starts at p = 8 ...
    lm = lipverify.load(out / "model.pt", arch=f"{out / 'arch.py'}:build", input_shape=(1, 8, 8))
    assert all(n.op.p == float("inf") for n in lm.graph.nodes if n.kind == "linf_dist")  # ... and ends at inf
    assert lm.bounds("inf").global_bound.value == pytest.approx(1.0)
    d = np.load(data)
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    res = lm.certify(x, y, eps=[0.05], norm="inf")
    assert res.vra[0.05] == pytest.approx(rep["after"]["vra"]["0.05"])
    adv = min_norm_radius(lm.module, x[:16], y[:16], norm="inf", method="fmn")
    for c, ra in zip(res.inputs[:16], adv.radius.tolist()):
        if c.pred == c.label:
            assert c.radius <= ra + 1e-9
    r = subprocess.run(CMD + ["certify", str(out / "model.pt"), "--arch", f"{out / 'arch.py'}:build", "--input-shape",
                              "1,8,8", "--data", str(data), "--eps", "0.05", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2 and "l-inf norm only" in r.stderr
