"""Every VNN-LIB output form: parsing (against a direct evaluator of the formula text), certificates
(against exact affine suprema and brute force on tiny nets) and the counterexample search, and on the
competition instances rewritten in the other forms: no `sat` instance is ever certified."""

from __future__ import annotations

import csv
import itertools
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import lipverify
from lipverify.attacks.property import property_attack
from lipverify.data import load_data
from lipverify.data.vnnlib import parse_vnnlib
from lipverify.importers.loader import load

# --------------------------------------------------------------------------------------------------
# a direct evaluator of the output formula (independent of the DNF translation)

_TOK = re.compile(r"\(|\)|[^\s()]+")


def _tree(text):
    stack = [[]]
    for t in _TOK.findall(re.sub(r";[^\n]*", " ", text)):
        if t == "(":
            stack.append([])
        elif t == ")":
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(t)
    return stack[0]


def _value(e, y):
    if isinstance(e, str):
        return y[int(e[2:])] if e.startswith("Y_") else float(e)
    args = [_value(a, y) for a in e[1:]]
    if e[0] == "+":
        return sum(args)
    if e[0] == "-":
        return -args[0] if len(args) == 1 else args[0] - sum(args[1:])
    if e[0] == "*":
        return float(np.prod(args))
    raise AssertionError(e)


def _truth(e, y):
    op = e[0]
    if op == "and":
        return all(_truth(a, y) for a in e[1:])
    if op == "or":
        return any(_truth(a, y) for a in e[1:])
    a, b = _value(e[1], y), _value(e[2], y)
    # strict comparisons read as non-strict (a certificate must exclude ties)
    return a >= b if op in (">=", ">") else a <= b


def _counterexample(text, y):
    """Whether outputs ``y`` satisfy every output assert of ``text`` (input bounds skipped)."""
    ok = True
    for form in _tree(text):
        if form[0] != "assert":
            continue
        items = form[1][1:] if form[1][0] == "and" else [form[1]]
        for item in items:
            if "X_" not in json.dumps(item):  # input bounds
                ok = ok and _truth(item, y)
    return ok


def _box_text(lb, ub, n_out=3):
    lines = [f"(declare-const X_{i} Real)" for i in range(len(lb))]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    for i, (a, b) in enumerate(zip(lb, ub)):
        lines.append(f"(assert (<= X_{i} {float(b)!r}))")
        lines.append(f"(assert (>= X_{i} {float(a)!r}))")
    return "\n".join(lines) + "\n"


FORMS = {
    "untargeted": ("(assert (or (and (>= Y_1 Y_0)) (and (>= Y_2 Y_0))))", "untargeted", 0),
    "targeted": ("(assert (<= Y_2 Y_1))", "targeted", 2),
    "targeted_conjunction": ("(assert (>= Y_2 Y_0))\n(assert (>= Y_2 Y_1))", "targeted conjunction", None),
    "conjunction_in_one_assert": ("(assert (and (>= Y_1 Y_0) (>= Y_1 Y_2)))", "targeted conjunction", None),
    "dnf": ("(assert (or (and (>= Y_1 Y_0) (>= Y_1 Y_2)) (and (>= Y_2 Y_0) (> Y_2 0.3))))", "linear", None),
    "linear_constants": ("(assert (>= (+ (* 2 Y_0) (- Y_1) 0.25) (* 0.5 (- Y_2 1))))", "linear", None),
    "negative_literal": ("(assert (<= (- Y_0 Y_1) (- 0.125)))", "linear", None),
    "distributed": ("(assert (or (>= Y_0 0.1) (>= Y_1 0.2)))\n(assert (or (<= Y_2 0.0) (>= Y_2 Y_0)))", "linear",
                    None),
    "input_bounds_in_top_and": ("(assert (and (>= Y_1 Y_0) (<= X_0 0.9)))", "targeted", 0),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_output_form_means_what_it_says(tmp_path, form):
    text, kind, label = FORMS[form]
    lb, ub = np.full(4, 0.1), np.full(4, 0.9)
    full = _box_text(lb, ub) + text + "\n"
    path = tmp_path / f"{form}.vnnlib"
    path.write_text(full)
    spec = parse_vnnlib(path, full)
    prop = spec.prop
    assert prop.kind == kind and prop.label == label
    rng = np.random.default_rng(0)
    ys = np.concatenate([rng.normal(size=(300, 3)), rng.integers(-1, 2, size=(100, 3)).astype(float) * 0.5])
    mine = prop.is_counterexample(torch.from_numpy(ys)).tolist()
    oracle = [_counterexample(text, y) for y in ys]
    assert mine == oracle
    ds = load_data(path, (4,))
    assert ds.y.tolist() == [-1 if label is None else label] and ds.labelled == (label is not None)
    assert ds.properties[0].kind == kind


# --------------------------------------------------------------------------------------------------
# certificates: exact for an affine model, sound on tiny nets


def _lm(module, shape):
    return load(module.eval(), input_shape=shape)


def test_affine_property_radius_is_exact():
    torch.manual_seed(1)
    lin = nn.Linear(6, 4).double()
    lm = _lm(nn.Sequential(lin).float(), (6,))
    W = lin.weight.detach().numpy()
    b = lin.bias.detach().numpy()
    from lipverify.data.properties import OutputProperty

    rng = np.random.default_rng(3)
    for trial in range(20):
        x = rng.uniform(0.2, 0.8, size=6).astype(np.float32)
        h = rng.uniform(0.0, 0.2, size=6)
        lo, hi = x - h, x + h * rng.uniform(0.3, 1.0, size=6)  # an asymmetric (clipped) box
        c = rng.normal(size=4)
        f = W.astype(np.float32).astype(np.float64) @ x.astype(np.float64) + b.astype(np.float32)
        g = c @ W.astype(np.float32).astype(np.float64)
        r = np.max(np.maximum(x - lo, hi - x))
        sup = c @ f + np.abs(g).sum() * r  # exact sup of c.f over the l-inf ball of radius r
        d = sup + (0.01 if trial % 2 else -0.01)  # certified exactly for the odd trials
        prop = OutputProperty.from_dnf([[(c, d)]])
        res = lm.certify_properties(torch.from_numpy(x)[None], [prop], torch.from_numpy(lo)[None],
                                    torch.from_numpy(hi)[None], norm="inf")
        assert res.inputs[0].certified == bool(trial % 2)
        exact_radius = (d - c @ f) / np.abs(g).sum()
        assert res.inputs[0].radius <= exact_radius * (1 + 1e-9) + 1e-12
        assert res.inputs[0].radius >= exact_radius * (1 - 1e-5)


def _tiny_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


@pytest.mark.parametrize("seed", range(4))
def test_tiny_nets_never_certify_what_a_grid_breaks_and_the_attack_finds_what_it_breaks(seed):
    from lipverify.data.properties import OutputProperty

    net = _tiny_net(seed)
    lm = _lm(net, (2,))
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.linspace(0, 1, 81), np.linspace(0, 1, 81)), -1).reshape(-1, 2)
    props, xs, los, his, truth = [], [], [], [], []
    for k in range(24):
        x = rng.uniform(0.2, 0.8, size=2).astype(np.float32)
        h = rng.choice([0.01, 0.05, 0.2])
        lo, hi = np.clip(x - h, 0, 1), np.clip(x + h, 0, 1)
        # random DNF of linear constraints
        dnf = []
        for _ in range(rng.integers(1, 4)):
            dnf.append([(rng.normal(size=3), float(rng.normal(scale=0.3))) for _ in range(rng.integers(1, 3))])
        prop = OutputProperty.from_dnf(dnf)
        pts = lo + grid * (hi - lo)
        with torch.no_grad():
            out = net.double()(torch.from_numpy(pts)).double()
        net.float()
        slack = prop.slack(out)
        props.append(prop), xs.append(x), los.append(lo), his.append(hi), truth.append(float(slack.min()))
    x, lo, hi = (torch.from_numpy(np.stack(v)) for v in (xs, los, his))
    res = lm.certify_properties(x, props, lo, hi, norm="inf")
    for c, t in zip(res.inputs, truth):
        if c.certified:
            assert t > 0  # no grid point violates a certified property
    att = property_attack(lm.module, x, lo.float(), hi.float(), props, steps=60, restarts=2,
                          forward64=lm.module_double())
    for k, t in enumerate(truth):
        if t < -1e-3:
            assert bool(att.found[k]), (k, t, float(att.slack[k]))
        if bool(att.found[k]):
            assert not res.inputs[k].certified
            z = att.z[k]
            assert bool((z >= lo[k].float()).all() and (z <= hi[k].float()).all())
            with torch.no_grad():
                assert bool(props[k].is_counterexample(lm.module_double()(z[None].double())))


def test_general_properties_through_the_cli(tmp_path):
    """certify and attack read a targeted conjunction; the attack writes a witness re-checked here."""
    net = _tiny_net(7)
    model = tmp_path / "net.pt"
    torch.save(net, model)
    x = np.array([0.5, 0.5])
    with torch.no_grad():
        out = net(torch.tensor(x, dtype=torch.float32)[None])[0]
    t = int(out.argmin())  # the weakest class: make it win somewhere in a wide box
    text = _box_text(np.full(2, 0.0), np.full(2, 1.0)) + "".join(
        f"(assert (>= Y_{t} Y_{j}))\n" for j in range(3) if j != t)
    spec = tmp_path / "s.vnnlib"
    spec.write_text(text)
    with torch.no_grad():
        grid = torch.rand(20000, 2)
        win = (net(grid).argmax(1) == t).any()
    cmd = [sys.executable, "-m", "lipverify"]
    r = subprocess.run(cmd + ["certify", str(model), "--trust-pickle", "--input-shape", "2", "--data", str(spec),
                              "--norm", "inf", "--json", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["inputs"][0]["label"] == -1
    if win:
        assert not d["inputs"][0]["certified"]
    r = subprocess.run(cmd + ["attack", str(model), "--trust-pickle", "--input-shape", "2", "--data", str(spec),
                              "--json", "--quiet", "--save", str(tmp_path / "adv.npz")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["counterexamples_found"] == int(bool(win))
    if win:
        f = tmp_path / "adv_counterexamples" / "s.counterexample"
        vals = dict(re.findall(r"\((X_\d+|Y_\d+) ([-+0-9.eE]+)\)", f.read_text()))
        z = torch.tensor([float(vals["X_0"]), float(vals["X_1"])])
        with torch.no_grad():
            o = net.double()(z.double()[None])[0]
        assert all(o[t] >= o[j] for j in range(3))
    r = subprocess.run(cmd + ["certify", str(model), "--trust-pickle", "--input-shape", "2", "--data", str(spec),
                              "--eps", "0.1", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2 and "no single label" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------------
# competition instances rewritten in the other forms


def _rewrite(realdata, tmp_path):
    rows = list(csv.DictReader(open(realdata / "ground_truth" / "instances.csv")))
    out = []
    for k, r in enumerate(rows):
        text = (realdata / r["vnnlib_file"]).read_text()
        head = text[:text.rindex("(assert (or")]
        label = int(r["label"])
        n_out = len(re.findall(r"declare-const Y_\d+", text))
        others = [j for j in range(n_out) if j != label]
        linear = "(assert (or\n" + "".join(f"  (and (<= (+ Y_{label} (* -1 Y_{j})) 0))\n" for j in others) + "))\n"
        p = tmp_path / f"{k}_linear.vnnlib"
        p.write_text(head + linear)
        out.append((r, p, "linear"))
        if r["counterexample_file"]:
            vals = dict(re.findall(r"\((Y_\d+) ([-+0-9.eE]+)\)", (realdata / r["counterexample_file"]).read_text()))
            ys = [float(vals[f"Y_{j}"]) for j in range(n_out)] if vals else None
            if ys:
                t = int(np.argmax(ys))
                conj = "".join(f"(assert (>= Y_{t} Y_{j}))\n" for j in range(n_out) if j != t)
                p = tmp_path / f"{k}_conj.vnnlib"
                p.write_text(head + conj)
                out.append((r, p, "conj-sat"))
    return out


@pytest.mark.realdata
@pytest.mark.slow
def test_rewritten_competition_specs_same_certificates_and_no_sat_certified(realdata, tmp_path):
    models: dict = {}
    for r, path, kind in _rewrite(realdata, tmp_path):
        lm = models.setdefault(r["model_file"], lipverify.load(realdata / r["model_file"]))
        orig = load_data(realdata / r["vnnlib_file"], lm.input_shape, n_classes=lm.n_classes)
        new = load_data(path, lm.input_shape, n_classes=lm.n_classes)
        assert torch.equal(orig.lower, new.lower) and torch.equal(orig.upper, new.upper)
        for method in ("global", "local"):
            a = lm.certify_properties(new.x, new.properties, *new.box(), norm="inf", method=method)
            if kind == "linear":
                b = lm.certify_properties(orig.x, orig.properties, *orig.box(), norm="inf", method=method)
                assert a.inputs[0].certified == b.inputs[0].certified
                assert a.inputs[0].radius == pytest.approx(b.inputs[0].radius, rel=1e-9)
            if r["verdict"].startswith("sat") or kind == "conj-sat":
                assert not a.inputs[0].certified, (r["vnnlib_file"], kind, method)


@pytest.mark.realdata
@pytest.mark.slow
def test_attack_finds_the_rewritten_sat_instances(realdata, tmp_path):
    from lipverify.data.counterexamples import check_witnesses

    models: dict = {}
    for r, path, kind in _rewrite(realdata, tmp_path):
        if not (r["verdict"].startswith("sat") or kind == "conj-sat"):
            continue
        lm = models.setdefault(r["model_file"], lipverify.load(realdata / r["model_file"]))
        ds = load_data(path, lm.input_shape, n_classes=lm.n_classes)
        from lipverify.data.counterexamples import float32_box

        lo, hi = float32_box(*ds.box())
        att = property_attack(lm.module, ds.x, lo, hi, ds.properties, steps=100, restarts=2,
                              forward64=lm.module_double())
        found = check_witnesses(lm, ds, {0: att.z[0]} if bool(att.found[0]) else {})
        assert 0 in found, (r["vnnlib_file"], kind, float(att.slack[0]))


def test_box_radius_covers_the_box_from_the_float32_point():
    from lipverify.certify import box_radius

    lo = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    hi = torch.tensor([[0.3, 0.25, 0.31]], dtype=torch.float64)
    x = ((lo + hi) / 2).float()
    r = box_radius(x, lo, hi, "inf")
    corners = torch.tensor(list(itertools.product(*zip(lo[0].tolist(), hi[0].tolist()))), dtype=torch.float64)
    assert float((corners - x.double()).abs().amax()) <= float(r)
    r2 = box_radius(x, lo, hi, "2")
    assert float((corners - x.double()).norm(dim=1).max()) <= float(r2)
