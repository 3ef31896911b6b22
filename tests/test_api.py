"""The Python API and the command line agree: same defaults (input box, norm spellings, eps), same numbers.

Every CLI-vs-API test runs the command (``--json``) and the ``LipModel`` method with its default
arguments on the same data and compares the numbers exactly.  The other checks: NumPy and torch inputs
give identical results, eps keys are floats (JSON: round-trip strings), reprs are one short line, bad
inputs are refused with a clear message, and the "certified by" counts agree with the VRA.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import lipverify
from lipverify.arguments import default_box, eps_key, parse_eps, parse_norm, resolve_box
from lipverify.cli import main
from lipverify.models.zoo import default_samples


@pytest.fixture(scope="module")
def builtin():
    return lipverify.load()


@pytest.fixture(scope="module")
def samples():
    return default_samples()


def linear(seed=0, d=6, m=4):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, m)).eval()
    return lipverify.load(net, input_shape=(d,))


def run_json(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, (res.output, res.stderr)
    return json.loads(res.stdout)


def write_npz(tmp_path, x, y):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.asarray(x), y=np.asarray(y))
    return p


# -- norms --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", [2, 2.0, "2", "l2", "L2", " l_2 "])
def test_two_norm_spellings(spelling):
    assert parse_norm(spelling) == "2"


@pytest.mark.parametrize("spelling", [math.inf, float("inf"), np.inf, "inf", "linf", "Linf", "l_inf", "LINF"])
def test_inf_norm_spellings(spelling):
    assert parse_norm(spelling) == "inf"


@pytest.mark.parametrize("bad", [1, "l1", True, "", None, "2inf"])
def test_bad_norm_names_the_spellings(bad):
    with pytest.raises(lipverify.UserInputError) as e:
        parse_norm(bad)
    assert "l2" in str(e.value) and "linf" in str(e.value) and "l_inf" in str(e.value)


def test_every_method_takes_every_spelling(builtin, samples):
    x, y = samples
    ref = builtin.bounds(norm="inf").global_bound.value
    assert builtin.bounds(norm="Linf").global_bound.value == ref
    assert builtin.bounds(norm=float("inf")).global_bound.value == ref
    a = builtin.certify(x[:4], y[:4], eps=0.01, norm="l_inf")
    b = builtin.certify(x[:4], y[:4], eps=0.01, norm=math.inf)
    assert a.norm == b.norm == "inf" and torch.equal(a.radius, b.radius)
    with pytest.raises(lipverify.UserInputError, match="linf"):
        builtin.certify(x[:4], y[:4], norm="l1")
    lm = linear()
    rep = lm.attack(torch.rand(3, 6), torch.tensor([0, 1, 2]), eps=[0.1], norm="L2", strength="fast")
    assert rep.norm == "2"


def test_cli_norm_spellings(tmp_path):
    r = CliRunner().invoke(main, ["bounds", "--norm", "Linf", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["norm"] == "inf"
    r = CliRunner().invoke(main, ["bounds", "--norm", "l1"])
    assert r.exit_code == 2 and "l_inf" in r.output + r.stderr
    assert "l_inf" in CliRunner().invoke(main, ["certify", "--help"]).output


# -- eps ----------------------------------------------------------------------------------------------

def test_eps_parsing_and_keys():
    want = [8 / 255, 0.1]
    for given in ("8/255,0.1", ["8/255", 0.1], (8 / 255, "0.1"), np.array(want),
                  torch.tensor(want, dtype=torch.float64)):
        assert parse_eps(given) == want, given
    assert parse_eps(0.5) == [0.5] and parse_eps(None) == []
    for bad in ("-1", "abc", [float("nan")], "1/0"):
        with pytest.raises(lipverify.UserInputError):
            parse_eps(bad)
    for e in (0.5, 3.0, 8 / 255, 1e-7, 0.1 + 0.2, 36 / 255):
        k = eps_key(e)
        assert float(k) == e and isinstance(k, str)
    assert eps_key(3.0) == "3" and eps_key(0.5) == "0.5"
    assert eps_key(36 / 255) != eps_key(36 / 255 + 1e-9)  # no rounding: different radii, different keys


# -- the CLI and the API agree ------------------------------------------------------------------------

def test_certify_cli_equals_api(builtin, samples, tmp_path):
    x, y = samples
    x, y = x[:16], y[:16]
    data = write_npz(tmp_path, x.numpy(), y.numpy())
    d = run_json("certify", "--data", data, "--eps", "0.5,36/255", "--json")
    res = builtin.certify(x, y, eps=[0.5, 36 / 255])
    assert set(res.vra) == {0.5, 36 / 255} and all(type(k) is float for k in res.vra)
    assert {float(k): v for k, v in d["vra"].items()} == res.vra
    assert [r["radius"] for r in d["inputs"]] == res.radius.tolist()
    assert [r["certified"] for r in d["inputs"]] == res.certified.tolist()
    assert d["clean_accuracy"] == res.clean_accuracy and d["median_radius"] == res.median_radius
    assert d["certified_by"] == res.counts
    # times: the analysis and the whole command, labelled
    assert 0 <= d["time_s"] <= d["total_time_s"]
    assert d["time_label"].startswith("time ") and "(load " in d["time_label"] and "certify " in d["time_label"]


def test_attack_cli_equals_api(builtin, samples, tmp_path):
    x, y = samples
    x, y = x[:2], y[:2]
    data = write_npz(tmp_path, x.numpy(), y.numpy())
    # radii beyond the minimum-norm radii: the ensemble stage has nothing left to do (a fast test)
    d = run_json("attack", "--data", data, "--eps", "3,5", "--strength", "fast", "--json")
    rep = builtin.attack(x.numpy(), y.numpy(), eps="3,5", strength="fast")
    assert rep.clip == (0.0, 1.0) and d["clip"] == [0.0, 1.0]  # the same default box, [0, 1]
    assert set(rep.robust_accuracy) == {3.0, 5.0} and all(type(k) is float for k in rep.robust_accuracy)
    assert {float(k): v for k, v in d["robust_accuracy"].items()} == rep.robust_accuracy
    assert [float(r["r_adv"]) for r in d["inputs"]] == rep.radius.tolist()
    assert d["median_adversarial_radius"] == rep.median_radius
    assert set(d["inputs"][0]["broken"]) == {"3", "5"}
    assert 0 <= d["time_s"] <= d["total_time_s"] and "attack " in d["time_label"]
    # every adversarial point of the default run stays in [0, 1]
    assert float(rep.x_adv.min()) >= 0.0 and float(rep.x_adv.max()) <= 1.0


def test_default_box_rule():
    assert default_box(torch.rand(4, 3)) == (0.0, 1.0)
    assert default_box(torch.rand(4, 3) * 1.4 - 0.2) is None
    x = torch.rand(2, 3)
    assert resolve_box("auto", x) == (0.0, 1.0)
    assert resolve_box(None, x) is None and resolve_box("none", x) is None
    assert resolve_box("0,2", x) == (0.0, 2.0) and resolve_box((-1, 1), x) == (-1.0, 1.0)
    with pytest.raises(lipverify.UserInputError):
        resolve_box("2,0", x)


def test_attack_box_default_and_opt_out():
    lm = linear()
    x, y = torch.rand(3, 6), torch.tensor([0, 1, 2])
    assert lm.attack(x, y, strength="fast").clip == (0.0, 1.0)
    assert lm.attack(x, y, strength="fast", clip=None).clip is None
    assert lm.attack(x, y, strength="fast", clip="none").clip is None
    assert lm.attack(x * 3 - 1, y, strength="fast").clip is None  # data outside [0, 1]: no box


# -- inputs -------------------------------------------------------------------------------------------

def test_numpy_and_torch_inputs_give_identical_results(builtin, samples):
    x, y = samples
    x, y = x[:8], y[:8]
    a = builtin.certify(x, y, eps=[0.5])
    for yy in (y.numpy(), y.numpy().astype(np.int32), y.to(torch.int16), y.numpy().astype(np.uint8)):
        b = builtin.certify(x.numpy(), yy, eps=[0.5])
        assert torch.equal(a.radius, b.radius) and a.vra == b.vra and torch.equal(a.label, b.label)
    lm = linear()
    xl = torch.rand(5, 6)
    yl = torch.tensor([0, 1, 2, 3, 0])
    ra = lm.attack(xl, yl, eps=[0.05], strength="fast")
    rb = lm.attack(xl.numpy(), yl.numpy(), eps=[0.05], strength="fast")
    assert torch.equal(ra.radius, rb.radius) and ra.robust_accuracy == rb.robust_accuracy
    assert torch.equal(builtin(x.numpy()), builtin(x))


def test_bad_inputs_are_refused_clearly(builtin, samples):
    x, y = samples
    x8 = (x[:4] * 255).to(torch.uint8)
    for call in (builtin.certify, builtin.attack):
        with pytest.raises(lipverify.UserInputError, match="1/255"):
            call(x8, y[:4])
        with pytest.raises(lipverify.UserInputError, match="1/255"):
            call(x8.numpy(), y[:4].numpy())
    with pytest.raises(lipverify.UserInputError, match="integer"):
        builtin.certify(x[:4], y[:4].float())
    with pytest.raises(lipverify.UserInputError, match=r"shape \(N, 1, 28, 28\)"):
        builtin.certify(x[:4, 0], y[:4])
    with pytest.raises(lipverify.UserInputError, match="x\\[None\\]"):
        builtin.certify(x[0], y[:1])
    with pytest.raises(lipverify.UserInputError, match="one label per input"):
        builtin.certify(x[:4], y[:3])
    with pytest.raises(lipverify.UserInputError, match="labels must lie"):
        builtin.certify(x[:4], torch.tensor([0, 1, 2, 10]))


# -- results ------------------------------------------------------------------------------------------

def test_reprs_are_short_even_for_many_inputs(builtin):
    from lipverify.results import RobustnessReport

    lm = linear()
    n = 1000
    x, y = torch.rand(n, 6), torch.randint(0, 4, (n,))
    res = lm.certify(x, y, eps=[k / 255 for k in range(1, 11)])
    assert len(repr(res)) < 300 and "\n" not in repr(res) and "tensor" not in repr(res)
    r64 = torch.rand(n, dtype=torch.float64)
    rep = RobustnessReport(n=n, norm="2", clip=(0.0, 1.0), strength="fast", eps=[k / 255 for k in range(1, 11)],
                           labels=y, pred=y, radius=r64, x_adv=x, margin=r64,
                           found_by=["fmn"] * n, tried=["fmn"], precision="float64", time_s=1.0)
    assert len(repr(rep)) < 300 and "tensor" not in repr(rep)
    b = builtin.bounds()
    assert len(repr(b)) < 300 and "\n" not in repr(b)


def test_result_classes_live_where_the_docs_say():
    from lipverify.attacks.evaluate import RobustnessReport as R0
    from lipverify.certify import CertifyResult as C0
    from lipverify.certify.rules import CertifyResult as C1
    from lipverify.results import CertifyResult, InputCertificate, RobustnessReport

    assert CertifyResult is C0 is C1 and RobustnessReport is R0 and InputCertificate.__name__ == "InputCertificate"


def test_bounds_lipsdp_says_where_it_lives(builtin):
    with pytest.raises(lipverify.UserInputError, match="lipverify.bounds.lipsdp_graph.lipsdp_report"):
        builtin.bounds(method="lipsdp")


def test_layer_rows_carry_the_cumulative_bound(builtin):
    rep = builtin.bounds()
    out = rep.layers[-1]
    assert out.cumulative == rep.global_bound.value
    d = rep.to_dict()["layers"]
    assert all("cumulative" in r and "lipschitz" in r for r in d)
    # each cumulative bound is at most the product of the own constants up to it (a chain: no branches)
    prod = 1.0
    for r in rep.layers:
        prod *= r.lipschitz
        assert r.cumulative <= prod * (1 + 1e-9)


def test_certified_by_counts_correct_inputs_only(builtin, samples):
    x, y = samples
    x = x[:20]
    y = y[:20].clone()
    y[:6] = (y[:6] + 1) % 10  # six wrong labels: their predictions may be certified, but never count
    res = builtin.certify(x, y, eps=[0.1, 0.5])
    pred, cert = res.pred, res.certified_at[0.5]
    correct = pred == y
    assert sum(res.counts.values()) == int((cert & correct).sum()) == round(res.vra[0.5] * res.n)
    assert res.stable_misclassified == int((cert & ~correct).sum()) > 0
    d = res.to_dict()
    assert sum(d["certified_by"].values()) == round(d["vra"]["0.5"] * d["n"])


def test_progress_reaches_its_total_at_the_end():
    from lipverify.certify.rules import progress_total

    lm = linear()
    n = 12
    x, y = torch.rand(n, 6), torch.randint(0, 4, (n,))
    ticks = []
    lm.certify(x, y, eps=[0.5], method="local", progress=ticks.append)
    assert sum(ticks) == progress_total(n, "local") == 2 * n
    assert len(ticks) > 2 and all(t > 0 for t in ticks)
    ticks = []
    lm.attack(x, y, eps=[0.05, 0.1], strength="fast", progress=ticks.append, batch_size=5)
    assert sum(ticks) == n * 3 and len(ticks) >= 9


def test_each_command_prints_one_labelled_time_line(samples, tmp_path):
    """The terminal summary ends with one time line that includes loading: ``time T s (load L s, <cmd> A s)``."""
    x, y = samples
    data = write_npz(tmp_path, x[:2].numpy(), y[:2].numpy())
    for args in (["bounds"], ["certify", "--data", data, "--eps", "0.5", "--quiet"],
                 ["attack", "--data", data, "--eps", "3", "--strength", "fast", "--quiet"]):
        res = CliRunner().invoke(main, [str(a) for a in args])
        assert res.exit_code == 0, res.stdout + res.stderr
        times = [ln for ln in res.stdout.splitlines() if ln.startswith("time ")]
        assert len(times) == 1 and f"{args[0]} " in times[0] and "(load " in times[0], res.stdout
        total, load, part = (float(v) for v in re.findall(r"([\d.e+-]+) s", times[0])[:3])
        assert load <= total and part <= total * (1 + 1e-2) + 1e-3


def test_float64_inputs_give_float64_logits(builtin, samples):
    x, _ = samples
    x64 = x[:4].double().numpy()
    out = builtin(x64)
    assert out.dtype == torch.float64
    want = builtin.module_double()(torch.from_numpy(x64))
    assert torch.equal(out, want.reshape(4, -1))
    assert torch.allclose(builtin(x[:4]).double(), out, atol=1e-4)  # float32 inputs: the float32 module


def test_local_constants_api_and_certify_option_agree(samples, tmp_path):
    """``LipModel.local_constants`` (linear relaxation where it applies) is sound at sampled points,
    tighter than the interval bound on this network, and ``certify --local-jacobian linear`` gives
    certificates no weaker than the interval ones (the CLI and the API take the same path)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 12), nn.ReLU(),
                        nn.Linear(12, 4)).eval()
    lm = lipverify.load(net, input_shape=(1, 14, 14))
    x = torch.rand(6, 1, 14, 14)
    pred = lm(x).argmax(1)
    lin = lm.local_constants(x, 0.03, "inf", rows=pred)
    itv = lm.local_constants(x, 0.03, "inf", jacobian="interval", rows=pred)
    assert "Shi et al." in lin.method and "Shi et al." not in itv.method
    b = torch.arange(6)
    assert bool(torch.all(lin.K[b, pred] <= itv.K[b, pred] * (1 + 1e-12)))
    assert float((lin.K[b, pred] / itv.K[b, pred]).nan_to_num(1.0).min()) < 0.9
    net64 = lm.module_double()
    z = (x.double() + 0.03 * torch.sign(torch.randn(6, 1, 14, 14, dtype=torch.float64))).clamp(0, 1)
    z.requires_grad_(True)
    out = net64(z)
    for j in range(4):
        gr, = torch.autograd.grad((out[b, pred] - out[:, j]).sum(), z, retain_graph=True)
        assert bool(torch.all(gr.flatten(1).abs().sum(1) <= lin.K[b, pred, j] * (1 + 1e-9) + 1e-12))
    with pytest.raises(lipverify.UserInputError):
        lm.local_constants(x, -1.0)
    y = pred.numpy()
    data = write_npz(tmp_path, x.numpy(), y)
    onnx_path = tmp_path / "small.onnx"
    torch.onnx.export(net, torch.rand(1, 1, 14, 14), str(onnx_path), dynamo=False, opset_version=17)
    lo = lipverify.load(str(onnx_path))
    api_i = lo.certify(x, y, eps=0.01, norm="inf", method="local")
    api_l = lo.certify(x, y, eps=0.01, norm="inf", method="local", local_options={"jacobian": "linear"})
    assert all(a >= b_ * (1 - 1e-9) for a, b_ in zip(api_l.radius.tolist(), api_i.radius.tolist()))
    assert any("Shi et al." in n for n in api_l.notes) and not any("Shi et al." in n for n in api_i.notes)
    d = run_json("certify", onnx_path, "--data", data, "--eps", "0.01", "--norm", "inf", "--method", "local",
                 "--local-jacobian", "linear", "--json")
    assert [r["radius"] for r in d["inputs"]] == api_l.radius.tolist()
