"""Certification: the strict GloRo rule, ties, batch independence, monotonicity, and the soundness
invariant ``certified radius <= adversarial radius`` against an independent attack (forward pass only).
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import lipverify
from lipverify.attacks.minnorm import min_norm_radius
from lipverify.attacks.pgd import pgd_attack
from lipverify.certify import parse_eps
from lipverify.cli import main


def linear_model(seed=0, d=6, m=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, m)).eval()


def test_parse_eps():
    assert parse_eps("36/255,72/255") == pytest.approx([36 / 255, 72 / 255])
    assert parse_eps("0.3") == [0.3]
    with pytest.raises(lipverify.UserInputError):
        parse_eps("abc")
    with pytest.raises(lipverify.UserInputError):
        parse_eps("-1")


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("norm", ["2", "inf"])
def test_linear_model_radius_is_exact_distance_to_boundary(norm, precision):
    net = linear_model()
    lm = lipverify.load(net, input_shape=(6,))
    x = torch.randn(50, 6)
    with torch.no_grad():
        f = net.double()(x.double())
    net.float()
    y = f.argmax(1)
    res = lm.certify(x, y, norm=norm, precision=precision)
    # float32 logits: the radius is lower by at most 2 delta / K (delta: the proven rounding bound)
    rel = 2e-6 if precision == "float64" else 1e-3
    W = net[0].weight.double()
    q = 2 if norm == "2" else 1  # dual norm
    for k, c in enumerate(res.inputs):
        j = int(y[k])
        exact = min(float((f[k, j] - f[k, i]) / (W[j] - W[i]).norm(p=q)) for i in range(4) if i != j)
        # the bound is exact for an affine map, up to the 1e-6 soundness factor
        assert c.radius <= exact * (1 + 1e-9)
        assert c.radius == pytest.approx(exact, rel=rel)


def test_ties_are_never_certified():
    net = nn.Sequential(nn.Linear(3, 3)).eval()
    with torch.no_grad():
        net[0].weight[:] = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
        net[0].bias.zero_()
    lm = lipverify.load(net, input_shape=(3,))
    x = torch.tensor([[2.0, 0.0, -1.0], [3.0, 1.0, 0.0]])
    res = lm.certify(x, torch.tensor([0, 1]), eps=[0.0, 0.1])
    for c in res.inputs:
        assert c.radius == 0.0 and not c.certified
        assert not any(c.certified_at.values())  # not even at eps = 0


def random_conv():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 5)).eval()


@pytest.mark.parametrize("precision", ["float64", "auto"])
def test_batch_size_independence_and_monotonicity(precision):
    lm = lipverify.load(random_conv(), input_shape=(1, 8, 8))
    x = torch.rand(37, 1, 8, 8)
    with torch.no_grad():
        y = lm(x).argmax(1)
    eps = [0.0001, 0.001, 0.01, 0.1]
    a = lm.certify(x, y, eps=eps, batch_size=1, precision=precision)
    b = lm.certify(x, y, eps=eps, batch_size=256, precision=precision)
    # kernels may round differently per batch size: radii equal to ~1 ulp in float64 (float32: within the
    # rounding bound), decisions identical (inputs near a decision are recomputed in float64)
    rel = 1e-12 if precision == "float64" else 1e-3
    assert [c.radius for c in a.inputs] == pytest.approx([c.radius for c in b.inputs], rel=rel)
    assert [c.certified_at for c in a.inputs] == [c.certified_at for c in b.inputs]
    for c in a.inputs:
        flags = [c.certified_at[e] for e in sorted(eps)]
        assert flags == sorted(flags, reverse=True)  # certified at eps => certified at smaller eps
        for e in eps:
            assert c.certified_at[e] == (c.radius > e) or math.isclose(c.radius, e, rel_tol=1e-9)
    assert [a.vra[e] for e in sorted(eps)] == sorted([a.vra[e] for e in eps], reverse=True)


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_certified_radius_below_attack_radius_random_model(norm):
    lm = lipverify.load(random_conv(), input_shape=(1, 8, 8))
    x = torch.rand(40, 1, 8, 8)
    with torch.no_grad():
        y = lm(x).argmax(1)
    res = lm.certify(x, y, norm=norm)
    r_cert = torch.tensor([c.radius for c in res.inputs])
    adv = min_norm_radius(lm.module, x, y, norm=norm, method="fmn", generator=torch.Generator().manual_seed(0))
    assert torch.all(r_cert <= adv.radius.cpu() + 1e-9)
    # sampled points inside a certified ball keep the prediction
    g = torch.Generator().manual_seed(1)
    for k in range(len(x)):
        r = float(r_cert[k])
        if r <= 0:
            continue
        d = torch.randn((200, 1, 8, 8), generator=g)
        if norm == "2":
            d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * r * 0.999
        else:
            d = torch.sign(d) * r * 0.999
        with torch.no_grad():
            assert torch.all(lm.module_double()((x[k] + d).double()).argmax(1) == y[k])
    # PGD at the certified radius never succeeds on certified points
    cert = r_cert > 0
    atk = pgd_attack(lm.module, x[cert], y[cert], r_cert[cert].float() * 0.999, norm=norm, steps=50, restarts=2)
    assert not atk.success.any()


def test_default_model_soundness_against_attack():
    lm = lipverify.load()
    from lipverify.models.zoo import default_samples

    x, y = default_samples()
    res = lm.certify(x, y, eps=[0.3])
    r_cert = torch.tensor([c.radius for c in res.inputs])
    adv = min_norm_radius(lm.module, x, y, norm="2", clip=(0.0, 1.0), method="fmn")
    assert torch.all(r_cert <= adv.radius + 1e-9)
    assert res.vra[0.3] > 0.5  # the shipped model is trained to have meaningful certificates


@pytest.mark.realdata
def test_competition_sat_instances_never_certified(realdata):
    """Ground truth: no instance with verdict `sat` may be certified (l-inf, at its eps), any method."""
    rows = list(csv.DictReader(open(realdata / "ground_truth" / "instances.csv")))
    from lipverify.data import load_data

    n_sat = 0
    for model_file in sorted({r["model_file"] for r in rows}):
        lm = lipverify.load(realdata / model_file)
        for r in [r for r in rows if r["model_file"] == model_file]:
            ds = load_data(realdata / r["vnnlib_file"], lm.input_shape, n_classes=lm.n_classes)
            sat = r["verdict"].startswith("sat")
            for method in ("global", "local") if sat else ("global",):
                # the decision at the spec's eps is what matters here: no radius bisection needed
                res = lm.certify(ds.x, ds.y, eps=ds.eps, norm="inf", method=method,
                                 local_options={"bisection_steps": 0})
                c = res.inputs[0]
                # the path `lipverify certify --data spec.vnnlib` takes: the spec's own property on its box
                p = lm.certify_properties(ds.x, ds.properties, *ds.box(), norm="inf", method=method,
                                          local_options={"bisection_steps": 0}).inputs[0]
                if sat:
                    n_sat += 1
                    assert not c.certified, (r["vnnlib_file"], method)
                    assert c.radius < float(ds.eps[0]) or c.pred != c.label
                    assert not p.certified, (r["vnnlib_file"], method)
                if c.certified:  # certifying against all classes implies the spec's own targets
                    assert p.certified
    assert n_sat > 0


# ------------------------------------------------------------------------------------------------
# CLI


def _run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def test_cli_certify_outputs(tmp_path):
    from lipverify.models.zoo import default_samples

    x, y = default_samples()
    data = tmp_path / "d.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    res = _run("certify", "--data", data, "--eps", "0.1,36/255", "--json", "--out", tmp_path / "r.csv",
               "--plot", tmp_path / "r.png")
    assert res.exit_code == 0, res.stderr
    d = json.loads(res.stdout)
    for k in ("n", "norm", "clean_accuracy", "vra", "inputs"):
        assert k in d
    assert d["n"] == len(x) and set(d["vra"]) == {"0.1", "0.1411764705882353"}
    assert {"index", "label", "pred", "margin", "radius", "certified", "method", "sound"} <= set(d["inputs"][0])
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == len(x) and float(rows[0]["radius"]) == pytest.approx(d["inputs"][0]["radius"], rel=1e-6)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    human = _run("certify", "--data", data, "--eps", "0.3")
    assert human.exit_code == 0 and "clean accuracy" in human.stdout
    # outputs never overwrite inputs
    r = _run("certify", "--data", data, "--eps", "0.3", "--out", data)
    assert r.exit_code == 2 and "overwrite" in r.stderr


def test_cli_certify_bad_data(tmp_path):
    def bad(name, **arrays):
        p = tmp_path / name
        np.savez(p, **arrays)
        return p

    x = np.random.rand(4, 1, 28, 28).astype(np.float32)
    cases = [
        (bad("shape.npz", x=np.random.rand(4, 3, 5).astype(np.float32), y=np.zeros(4, int)), "shape.npz"),
        (bad("nan.npz", x=np.where(x > 0.5, np.nan, x), y=np.zeros(4, int)), "nan.npz"),
        (bad("label.npz", x=x, y=np.array([0, 1, 2, 10])), "label.npz"),
        (bad("empty.npz", x=x[:0], y=np.zeros(0, int)), "empty.npz"),
    ]
    empty = tmp_path / "zero.npz"
    empty.write_bytes(b"")
    cases.append((empty, "zero.npz"))
    spec = tmp_path / "broken.vnnlib"
    spec.write_text("(declare-const X_0 Real)\n(assert (<= X_0 0.5)\n")
    cases.append((spec, "broken.vnnlib"))
    for path, needle in cases:
        res = _run("certify", "--data", path, "--eps", "0.1")
        assert res.exit_code == 2, (needle, res.output, res.stderr)
        assert needle in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# local certification


def dead_relu_net():
    """Most first-layer ReLUs are off near the data: local masks delete them."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 3)).eval()
    with torch.no_grad():
        net[0].bias[:] = -3.0
        net[0].bias[:6] = 0.5
    return net


def test_local_certifies_at_least_global_and_strictly_more_with_dead_relus():
    net = dead_relu_net()
    lm = lipverify.load(net, input_shape=(6,))
    x = torch.randn(24, 6) * 0.3
    with torch.no_grad():
        y = lm(x).argmax(1)
    eps = [0.05, 0.1, 0.2]
    g = lm.certify(x, y, eps=eps)
    loc = lm.certify(x, y, eps=eps, method="local")
    more = 0
    for a, b in zip(g.inputs, loc.inputs):
        assert b.radius >= a.radius
        for e in eps:
            assert b.certified_at[e] or not a.certified_at[e]
            more += int(b.certified_at[e] and not a.certified_at[e])
    assert more > 0
    assert all(loc.vra[e] >= g.vra[e] for e in eps)
    # local certificates here come from exact (small) masked operators: sound
    assert any(c.method == "local" and c.sound for c in loc.inputs)
    # soundness: the local radius never exceeds the attack radius
    r_loc = torch.tensor([c.radius for c in loc.inputs])
    adv = min_norm_radius(net, x, y, norm="2", method="fmn")
    assert torch.all(r_loc <= adv.radius + 1e-9)


def test_results_are_tensors_and_records_are_built_on_demand():
    """Certifying builds no per-input Python records; the tensors agree with the records built from them,
    with the JSON output and with the global rule recomputed here."""
    import lipverify
    from lipverify.certify.rules import METHODS

    lm = lipverify.load()
    from lipverify.models.zoo import default_samples

    x, y = default_samples()
    x, y = x[:40], y[:40]
    res = lm.certify(x, y, eps=[0.1, 0.3])
    assert res.records is None  # nothing per input yet
    K = lm.margin_constants("2").K
    with torch.no_grad():
        z = lm.module_double()(x.double()).reshape(len(x), -1)
    pred = z.argmax(1)
    d = z.gather(1, pred[:, None]) - z
    others = torch.arange(z.shape[1])[None] != pred[:, None]
    for e in (0.1, 0.3):
        want = ((d > e * K[pred]) | ~others).all(1)
        assert torch.equal(res.certified_at[e], want)
    assert torch.equal(res.pred, pred) and torch.equal(res.certified, res.certified_at[0.3])
    recs = res.inputs
    assert res.records is recs and len(recs) == len(x)
    for i, c in enumerate(recs):
        assert c.pred == int(res.pred[i]) and c.label == int(res.label[i]) and c.radius == float(res.radius[i])
        assert c.method == METHODS[int(res.method_code[i])] and c.sound == bool(res.sound[i])
        assert c.certified_at == {0.1: bool(res.certified_at[0.1][i]), 0.3: bool(res.certified_at[0.3][i])}
    js = res.to_dict()
    assert [r["certified"] for r in js["inputs"]] == res.certified.tolist()
    by = js["certified_by"]
    assert set(by) <= {METHODS[0], METHODS[3]}
    assert sum(by.values()) == int(res.certified.sum())


def _free_port() -> int:
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


@pytest.mark.parametrize("precision", ["float64", "auto"])
def test_torchrun_two_processes_give_the_one_process_result(tmp_path, precision):
    """``torchrun --nproc_per_node 2 -m lipverify certify``: each rank certifies its shard, rank 0 prints
    one result over all inputs, equal to the single-process JSON (times and notes aside).  The ranks
    run whole batches of the one-process run (4 batches of 4: shards of 8 and 7 inputs), one thread
    each like the reference here.  float64: the same numbers; float32 logits (auto): each rank probes
    and recomputes its own inputs, so radii agree within the rounding bound and every decision is
    identical."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from lipverify.models.zoo import default_samples

    x, y = default_samples()
    data = tmp_path / "d.npz"
    np.savez(data, x=x[:15].numpy(), y=y[:15].numpy())  # odd: unequal shards
    base = ["certify", "--data", str(data), "--eps", "0.5,1.0", "--method", "local", "--json", "--quiet",
            "--precision", precision, "--batch-size", "4"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun's ranks run one thread each
    try:
        one = _run(*base)  # the one-process run in this process
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.output
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m",
        "lipverify"] + base
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    tol = 0.0 if precision == "float64" else 1e-5
    for k in set(a) - {"time_s", "total_time_s", "time_label", "notes", "inputs", "median_radius"}:
        assert a[k] == b[k], k
    assert a["median_radius"] == pytest.approx(b["median_radius"], rel=tol, abs=tol)
    assert len(b["inputs"]) == 15
    assert any(r["method"].startswith("local") for r in b["inputs"])  # the local stage ran on the shards too
    for ra, rb in zip(a["inputs"], b["inputs"]):
        assert ra["index"] == rb["index"] and ra["pred"] == rb["pred"] and ra["certified_at"] == rb["certified_at"]
        assert ra["method"] == rb["method"] and ra["sound"] == rb["sound"]
        assert abs(ra["radius"] - rb["radius"]) <= tol * max(1.0, abs(ra["radius"]))
    assert any("2 processes" in n for n in b["notes"])


@pytest.mark.parametrize("n,world,batch", [(15, 2, 4), (2000, 2, 1024), (3, 2, 256), (0, 3, 8), (100, 3, 7),
                                            (64, 4, 16)])
def test_shards_are_whole_batches_of_one_process(n, world, batch):
    """Every rank's slice is a run of the one-process batches ``[k b, (k + 1) b)``: together they cover
    ``0..n`` once, in rank order, and no batch is split (a rank may get none)."""
    from lipverify.certify.sharded import shard

    one = [(s, min(s + batch, n)) for s in range(0, n, batch)]
    rows, got = [], []
    for r in range(world):
        sl = shard(n, r, world, batch)
        rows += list(range(n))[sl]
        got += [(s, min(s + batch, sl.stop)) for s in range(sl.start, sl.stop, batch)]
    assert rows == list(range(n)) and got == one
    with pytest.raises(ValueError):
        shard(n, 0, world, 0)


def test_sharded_batch_is_the_one_process_batch_unless_a_rank_would_idle():
    from lipverify.certify.sharded import batch_size_for, shard

    assert batch_size_for(2000, 2, 1024) == 1024 and batch_size_for(15, 2, 4) == 4
    for n, world, auto in [(203, 2, 203), (5, 4, 256), (1, 2, 16)]:
        b = batch_size_for(n, world, auto)
        sizes = [len(range(n)[shard(n, r, world, b)]) for r in range(world)]
        assert sum(sizes) == n and max(sizes) <= 2 * -(-n // world)
        assert min(sizes) >= 1 or n < world  # every rank works when there are as many inputs as ranks


def test_auto_batch_size_and_streamed_batches():
    from lipverify.certify.batching import CPU_CAP, CPU_WORKING_SET, auto_batch_size, free_memory, stream

    lm = lipverify.load(random_conv(), input_shape=(1, 8, 8))
    b = auto_batch_size(lm.graph, "cpu", 10_000)
    assert 16 <= b <= CPU_CAP and auto_batch_size(lm.graph, "cpu", 5) == 5 and free_memory("cpu") > 0
    # large activations: the batch keeps one batch's float32 activations within the CPU working set
    big = lipverify.load(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                       nn.ReLU(), nn.Flatten(), nn.Linear(8 * 32 * 32, 10)).eval(),
                         input_shape=(3, 32, 32))
    entries = 3 * 32 * 32 + 4 * 8 * 32 * 32 + 10  # input, two convolutions, two ReLUs, logits
    nb = auto_batch_size(big.graph, "cpu", 10_000)
    assert 16 <= nb < CPU_CAP and nb * 4 * entries <= CPU_WORKING_SET < (nb + 1) * 4 * entries, (nb, entries)
    x = torch.rand(37, 1, 8, 8)
    parts = list(stream(x, 10, "cpu"))
    assert [s for s, _ in parts] == [0, 10, 20, 30] and torch.equal(torch.cat([p for _, p in parts]), x)
    with torch.no_grad():
        y = lm(x).argmax(1)
    a = lm.certify(x, y, eps=[0.01, 0.1], precision="float64")  # batch from free memory
    c = lm.certify(x, y, eps=[0.01, 0.1], precision="float64", batch_size=7)
    assert a.radius.tolist() == pytest.approx(c.radius.tolist(), rel=1e-12)
    assert all(torch.equal(a.certified_at[e], c.certified_at[e]) for e in (0.01, 0.1))
