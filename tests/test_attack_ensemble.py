"""The stronger attacks and the float64 judge, against oracles that do not use lipverify's attack code.

Oracles:
* affine classifiers: the exact minimum adversarial radius from the weights (closed form);
* APGD's checkpoints: the published sequence of Croce and Hein (2020) for 100 iterations;
* the hyperplane-in-a-box projection: cvxpy's solution of the same convex program;
* every returned point is re-checked here with an independent float64 copy of the model.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from lipverify.attacks import ensemble_attack, min_norm_radius
from lipverify.attacks.apgd import apgd_checkpoints
from lipverify.attacks.fab import project_hyperplane_box
from lipverify.attacks.minnorm import box_search
from lipverify.attacks.verify import Judge


def _affine(n=12, m=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n, m).eval()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, generator=g))
        lin.bias.copy_(torch.randn(m, generator=g))
    return lin.to(dtype)


def _exact_affine_radius(lin, x, y, norm):
    W, b = lin.weight.double(), lin.bias.double()
    f = x.double() @ W.T + b
    diff = W[y][:, None, :] - W[None, :, :]
    q = diff.norm(dim=2) if norm == "2" else diff.abs().sum(dim=2)
    r = (f.gather(1, y[:, None]) - f) / q
    r[torch.arange(len(y)), y] = math.inf
    return r.min(dim=1).values


def _f64(model):
    return copy.deepcopy(model).double().eval()


def _strictly_adv64(model64, z, y):
    with torch.no_grad():
        lg = model64(z.double()).double()
    fy = lg.gather(1, y[:, None]).squeeze(1)
    return lg.scatter(1, y[:, None], -math.inf).amax(1) > fy


def _norm64(z, x, norm):
    d = (z.double() - x.double()).flatten(1)
    return d.norm(dim=1) if norm == "2" else d.abs().amax(dim=1)


def _tiny_cnn(seed=11):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 5)).eval()


# --------------------------------------------------------------------------------------------------


def test_apgd_checkpoints_match_the_published_schedule():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06): 0, .22, .41, .57, .70, .80, .87, .93, .99
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_hyperplane_box_projection_matches_cvxpy(norm):
    cp = pytest.importorskip("cvxpy")
    g = torch.Generator().manual_seed(5)
    n = 7
    for trial in range(6):
        w = torch.randn(1, n, generator=g, dtype=torch.float64)
        x = torch.rand(1, n, generator=g, dtype=torch.float64)
        lo, hi = -x, 1 - x  # the box [0, 1] seen from x
        c = torch.tensor([0.3 * (1 if trial % 2 else -1)], dtype=torch.float64)
        d = project_hyperplane_box(w, c, lo, hi, norm)
        var = cp.Variable(n)
        obj = cp.norm(var, 2) if norm == "2" else cp.norm(var, "inf")
        prob = cp.Problem(cp.Minimize(obj), [w.numpy()[0] @ var == float(c), var >= lo.numpy()[0],
                                             var <= hi.numpy()[0]])
        prob.solve()
        if prob.status not in ("optimal", "optimal_inaccurate"):
            # the box does not reach the hyperplane: ours saturates towards it
            assert float((w * d).sum() * torch.sign(c)) <= abs(float(c)) + 1e-12
            continue
        ours = float(d.norm() if norm == "2" else d.abs().max())
        assert abs(float((w * d).sum()) - float(c)) < 1e-8
        assert bool((d >= lo - 1e-12).all() and (d <= hi + 1e-12).all())
        assert ours == pytest.approx(prob.value, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("norm,method", [("2", "fab"), ("inf", "fab"), ("2", "ddn")])
def test_single_min_norm_attacks_find_exact_affine_radius(norm, method):
    lin = _affine(seed=2)
    x = torch.randn(10, 12, generator=torch.Generator().manual_seed(3))
    y = lin(x).argmax(1)
    exact = _exact_affine_radius(lin, x, y, norm)
    res = min_norm_radius(lin, x, y, norm=norm, method=method)
    assert bool((res.radius >= exact * (1 - 1e-6)).all())
    # FAB's linearisation is exact on an affine model; DDN follows the cross-entropy, not the nearest
    # boundary's normal, and only gets close
    assert bool((res.radius <= exact * (1.02 if method == "fab" else 1.15)).all()), res.radius / exact
    assert bool(_strictly_adv64(_f64(lin), res.x_adv, y).all())


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_every_min_norm_point_is_genuine_in_float64(norm):
    """Inside the box, strictly misclassified by an independent float64 copy, radius = float64 norm."""
    net = _tiny_cnn()
    g = torch.Generator().manual_seed(4)
    x = torch.rand(16, 1, 6, 6, generator=g)
    y = net(x).argmax(1)
    res = min_norm_radius(net, x, y, norm=norm, clip=(0.0, 1.0), strength="fast", generator=g)
    assert bool(torch.isfinite(res.radius).all())
    assert bool((res.x_adv >= 0).all() and (res.x_adv <= 1).all())
    assert bool(_strictly_adv64(_f64(net), res.x_adv, y).all())
    assert torch.equal(res.radius, _norm64(res.x_adv, x, norm))
    assert res.precision == "float64" and res.tried and set(res.found_by) <= {"fmn", "fab-t", "ddn",
                                                                               "pgd-bisection", "box-search"}


def test_float32_tie_is_pushed_out_until_genuine():
    """A point exactly on the float64 boundary is not adversarial; the judge moves it just outside."""
    lin = _affine(n=6, m=2, seed=7, dtype=torch.float64)
    W, b = lin.weight.detach(), lin.bias.detach()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y = lin(x).argmax(1)
    w = W[1] - W[0]
    s = torch.where(y == 0, 1.0, -1.0).double()
    # boundary point along the normal of the separating hyperplane
    marg = (x @ w + (b[1] - b[0]))
    z = x - (marg / (w @ w))[:, None] * w[None, :]
    judge = Judge(lin, x)
    assert not bool(judge.genuine(x, y, z, "2").any())  # on the boundary: a tie, never counted
    z2, ok = judge.push_out(x, y, z, "2")
    assert bool(ok.all())
    assert bool(_strictly_adv64(lin, z2, y).all())
    ratio = _norm64(z2, x, "2") / _norm64(z, x, "2")
    assert bool((ratio > 1).all() and (ratio <= 1 + 1.1e-3).all()), ratio
    del s


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_snap_into_ball_repairs_float32_rounding(norm):
    x = torch.rand(8, 20, generator=torch.Generator().manual_seed(1))
    eps = torch.full((8,), 0.1, dtype=torch.float64)  # 0.1 is not a float32 number
    if norm == "inf":
        z = x + torch.tensor(0.1, dtype=torch.float32)  # may exceed 0.1 in float64
    else:
        d = torch.randn(8, 20, generator=torch.Generator().manual_seed(2))
        z = x + (0.1 * d / d.norm(dim=1, keepdim=True)).float() * 1.0000001
    lin = _affine(n=20)
    judge = Judge(lin, x)
    z2 = judge.snap_into_ball(x, z, eps, norm)
    assert bool((_norm64(z2, x, norm) <= 0.1).all())
    assert bool((_norm64(z2, x, norm) >= 0.1 * (1 - 1e-5)).all())  # moved by a rounding error only


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_ensemble_breaks_exactly_the_inputs_whose_exact_radius_is_below_eps(norm):
    lin = _affine(seed=4)
    x = torch.randn(24, 12, generator=torch.Generator().manual_seed(5))
    y = lin(x).argmax(1)
    exact = _exact_affine_radius(lin, x, y, norm)
    eps = torch.where(torch.arange(24) % 2 == 0, exact * 1.03, exact * 0.97)
    res = ensemble_attack(lin, x, y, eps, norm=norm, strength="fast", generator=torch.Generator().manual_seed(0))
    expect = torch.arange(24) % 2 == 0
    assert torch.equal(res.broken, expect), (res.broken, expect)
    b = res.broken
    assert bool((_norm64(res.x_adv[b], x[b], norm) <= eps[b]).all())
    assert bool(_strictly_adv64(_f64(lin), res.x_adv[b], y[b]).all())
    assert all(f != "none" for f, k in zip(res.found_by, b.tolist()) if k)


def test_ensemble_stays_in_box_and_ball_and_names_attacks():
    net = _tiny_cnn(seed=3)
    g = torch.Generator().manual_seed(6)
    x = torch.rand(20, 1, 6, 6, generator=g)
    x[:, :, :2] = 0.0
    y = net(x).argmax(1)
    y[:3] = (y[:3] + 1) % 5  # misclassified inputs count as broken by "clean"
    eps = 0.05
    res = ensemble_attack(net, x, y, eps, norm="inf", clip=(0.0, 1.0), strength="fast", generator=g)
    assert res.found_by[:3] == ["clean"] * 3 and bool(res.broken[:3].all())
    b = res.broken.clone()
    b[:3] = False
    assert bool((res.x_adv >= 0).all() and (res.x_adv <= 1).all())
    assert bool((_norm64(res.x_adv, x, "inf") <= eps).all())
    assert bool(_strictly_adv64(_f64(net), res.x_adv[b], y[b]).all())
    assert set(res.found_by) <= {"clean", "apgd-ce", "apgd-t", "fab-t", "pgd", "none"}
    # an unbroken input has no point at all
    assert torch.equal(res.x_adv[~res.broken], x[~res.broken])


class _Threshold(nn.Module):
    """Class 1 wins iff some pixel exceeds 0.97: zero gradient everywhere, so gradient attacks stall."""

    def forward(self, z):
        z = z.flatten(1)
        hit = (z.max(dim=1).values > 0.97).to(z.dtype)
        return torch.stack([torch.zeros_like(hit) + 0.5, hit], dim=1)


def test_box_search_finds_what_gradients_cannot():
    x = torch.rand(3, 36, generator=torch.Generator().manual_seed(2)) * 0.9
    y = torch.zeros(3, dtype=torch.long)
    model = _Threshold()
    res = min_norm_radius(model, x, y, norm="2", clip=(0.0, 1.0), strength="fast",
                          generator=torch.Generator().manual_seed(0))
    # only random points can find it: PGD's random restarts or the box search
    assert set(res.found_by) <= {"pgd-bisection", "box-search"}
    assert bool(_strictly_adv64(model, res.x_adv, y).all())
    # the exact radius: raise the largest pixel to 0.97 (just above); the search finds a point not much farther
    exact = 0.97 - x.max(dim=1).values.double()
    assert bool((res.radius >= exact).all())
    # the box search on its own
    r2, z2 = box_search(Judge(model, x, (0.0, 1.0)), x, y, "2", (0.0, 1.0), samples=32,
                        generator=torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(r2).all()) and bool(_strictly_adv64(model, z2, y).all())
    assert bool((r2 >= exact).all())
    # below max_eps nothing exists: inf, with what was tried reported
    capped = min_norm_radius(model, x, y, norm="2", clip=(0.0, 1.0), strength="fast", max_eps=float(exact.min()) / 2)
    assert bool(torch.isinf(capped.radius).all()) and capped.found_by == ["none"] * 3
    assert any("box search" in t for t in capped.tried)


def test_results_do_not_depend_on_batch_composition():
    """The same input gives the same verdict alone and in a batch (no float32 tie decides it)."""
    net = _tiny_cnn(seed=5)
    x = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(9))
    y = net(x).argmax(1)
    full = min_norm_radius(net, x, y, norm="2", clip=(0.0, 1.0), strength="fast",
                           generator=torch.Generator().manual_seed(0))
    model64 = _f64(net)
    for i in range(6):
        assert bool(_strictly_adv64(model64, full.x_adv[i:i + 1], y[i:i + 1]).all())
        # and in float32, alone and batched: clearly misclassified, not a tie
        with torch.no_grad():
            lg = net(full.x_adv[i:i + 1])
        assert float(lg[0].max() - lg[0, y[i]]) > 0 or int(lg[0].argmax()) != int(y[i])
    np.testing.assert_array_equal(np.isfinite(full.radius.numpy()), True)


def test_torchrun_two_processes_attack_like_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m lipverify attack``: whole batches per rank, each seeded by its
    first index, so the JSON equals one process's (one thread per process in both runs)."""
    import json
    import os
    import shutil
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from lipverify.models.zoo import default_samples

    x, y = default_samples()
    data = tmp_path / "d.npz"
    np.savez(data, x=x[:21].numpy(), y=y[:21].numpy())
    base = ["attack", "--data", str(data), "--eps", "0.5,1.0", "--strength", "fast", "--batch-size", "8", "--json",
            "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "lipverify"] + base, capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "lipverify"] + base
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    for k in set(a) - {"time_s", "total_time_s", "time_label", "notes"}:
        assert a[k] == b[k], k
    assert len(b["inputs"]) == 21 and any("2 processes" in n for n in b["notes"])
