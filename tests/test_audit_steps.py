"""What a newcomer's audit does: chosen steps, a time budget that says what it reduced, a report after
every step (an interrupted audit leaves a valid partial one), progress on a piped stderr, the one-line
answer first, and the same numbers from the command line and the Python API.

Oracles: the steps the report lists against the ones asked for, monkeypatched local-bound code that
must never run under ``--method global``, the certificates' own counts recomputed by hand for the
headline and the verdict, and the API run against the CLI run on the same inputs and seed.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

import lipverify
from lipverify.cli import main
from lipverify.report import budget, verdict
from lipverify.report.audit import parse_steps, parse_time_budget
from lipverify.report.progress import Stages, _PlainBar


def _run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from lipverify.models.zoo import default_samples

    x, y = default_samples()
    path = tmp_path_factory.mktemp("d") / "d.npz"
    np.savez(path, x=x[:8].numpy(), y=y[:8].numpy())
    return x[:8], y[:8], path


def _flat(text: str) -> str:
    return " ".join(text.split())


# -- arguments ---------------------------------------------------------------------------------------


def test_steps_and_time_budget_arguments():
    assert parse_steps("all") == ["bounds", "certify", "attack", "local", "lower", "lipsdp"]
    assert parse_steps("lower, attack") == ["bounds", "certify", "attack", "lower"]
    assert parse_steps("") == ["bounds", "certify"]
    with pytest.raises(lipverify.UserInputError, match="unknown step 'atack'"):
        parse_steps("atack")
    assert parse_time_budget("90") == 90.0 and parse_time_budget("90s") == 90.0
    assert parse_time_budget("3m") == 180.0 and parse_time_budget("2min") == 120.0
    assert parse_time_budget("none") is None and parse_time_budget("0") is None
    assert parse_time_budget("auto") == "auto"
    for bad in ("-5", "nan", "inf", "soon"):
        with pytest.raises(lipverify.UserInputError, match="--time-budget"):
            parse_time_budget(bad)


def test_cli_refuses_bad_steps_and_budgets_in_one_line(samples):
    _, _, data = samples
    for args, word in ((["--steps", "attack,foo"], "foo"), (["--time-budget", "soon"], "--time-budget")):
        res = _run("audit", "--data", data, "--quiet", *args)
        assert res.exit_code == 2 and word in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_help_shows_the_defaults_a_newcomer_gets():
    res = _run("audit", "--help")
    text = _flat(res.stdout)
    assert "[default: 200]" in text and "--time-budget" in text and "--steps" in text
    assert "0.1,0.3,1 for l2" in text  # the eps the code uses, not a promise about adversarial radii


# -- the time budget ---------------------------------------------------------------------------------


def test_auto_budget_grows_with_the_cost_of_a_pass_and_is_capped():
    assert budget.auto_budget(0.0) == budget.AUTO_BASE_S
    assert budget.auto_budget(1e-4) == pytest.approx(budget.AUTO_BASE_S + 10.0)
    assert budget.auto_budget(1.0) == budget.AUTO_MAX_S


@pytest.mark.parametrize("budget_s", [5.0, 40.0, 400.0])
def test_plan_fits_the_attack_in_its_share_or_says_what_it_cut(budget_s):
    t_pass = 1e-3  # one forward-backward pass of one input: a ResNet-18 on a laptop CPU
    p = budget.plan(100, 3, "2", "standard", {"attack", "lower", "local"}, budget_s, t_pass)
    share = budget_s * budget.SHARES["attack"] / sum(budget.SHARES[s] for s in ("attack", "lower", "local"))
    # the prediction is recomputed here from the cost model: passes x inputs x seconds per pass
    predicted = budget.attack_passes(p.strength, 3, "2") * p.n * t_pass
    assert p.predicted_s["attack"] == pytest.approx(predicted)
    reduced = p.strength.name != "standard" or p.n < 100
    if predicted > share * (1 + 1e-9):  # only at the floor: the smallest scale on the fewest inputs
        assert p.n == budget.MIN_INPUTS or p.strength.name.endswith(f"x{budget.MIN_SCALE:g}")
    if reduced:
        assert any("time budget" in n_ and "--time-budget none" in n_ for n_ in p.notes), p.notes
    else:
        assert not any("attacks at strength" in n_ for n_ in p.notes)
    assert budget.plan(100, 3, "2", "standard", {"attack"}, None, t_pass).strength.name == "standard"


def test_a_small_budget_reduces_the_audit_and_says_so(samples):
    x, y, _ = samples
    lm = lipverify.load("builtin:default")
    res = lm.audit(x, y, eps=[0.1, 0.5], time_budget=0.5, seed=0)
    assert not res.partial and res.steps == ["bounds", "certify", "attack", "local", "lower", "lipsdp"]
    assert res.strength != "standard"
    assert any(n.startswith("time budget 0.5 s: attacks at strength") for n in res.notes), res.notes
    assert res.plan["budget_s"] == 0.5 and res.plan["strength"] == res.strength


# -- steps -------------------------------------------------------------------------------------------


def test_method_global_runs_no_local_work(samples, tmp_path, monkeypatch):
    import lipverify.bounds.local as local_mod
    import lipverify.certify.local as local_cert

    def forbidden(*a, **k):
        raise AssertionError("local bound code ran under --method global")

    monkeypatch.setattr(local_cert, "local_certify", forbidden)
    monkeypatch.setattr(local_mod, "local_margin_constants", forbidden)
    _, _, data = samples
    out = tmp_path / "a"
    res = _run("audit", "--data", data, "--out", out, "--eps", "0.1", "--quiet", "--strength", "fast",
               "--method", "global", "--steps", "attack,local")
    assert res.exit_code == 0, res.stdout + res.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["steps"] == ["bounds", "certify", "attack"] and rep["local"] is None
    assert not any("local" in r["cert_method"] for r in rep["inputs"]), [r["cert_method"] for r in rep["inputs"]]


def test_steps_choose_what_runs(samples, tmp_path):
    _, _, data = samples
    out = tmp_path / "a"
    res = _run("audit", "--data", data, "--out", out, "--eps", "0.1", "--quiet", "--steps", "lower")
    assert res.exit_code == 0, res.stdout + res.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["steps"] == ["bounds", "certify", "lower"]
    assert rep["lipschitz_lower"] is not None and rep["lipschitz_lower"] <= rep["global_upper"]
    assert all(r["r_adv"] is None for r in rep["inputs"]) and rep["violations"] == []
    assert "no attack was run" in rep["headline"]
    assert "not run" in (out / "report.html").read_text()


# -- partial reports ---------------------------------------------------------------------------------


def test_every_step_leaves_a_valid_report(samples):
    from lipverify.report.files import render

    x, y, _ = samples
    lm = lipverify.load("builtin:default")
    seen = []

    def on_step(res):
        files = render(res, figures=False)
        rep = json.loads(files["report.json"])
        assert rep["partial"] is True and rep["steps"] == res.steps
        assert b"partial" in files["report.html"]
        seen.append(list(res.steps))

    res = lm.audit(x[:4], y[:4], eps=[0.1], strength="fast", steps="attack,lower", time_budget=None,
                   on_step=on_step)
    assert seen == [["bounds", "certify"], ["bounds", "certify", "attack"], ["bounds", "certify", "attack", "lower"]]
    assert not res.partial and res.steps == ["bounds", "certify", "attack", "lower"]


def test_interrupted_audit_leaves_the_partial_report(samples, tmp_path, monkeypatch):
    import lipverify.report.audit as audit_mod

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(audit_mod, "margin_lipschitz_lower_bound", interrupt)
    _, _, data = samples
    out = tmp_path / "a"
    res = _run("audit", "--data", data, "--out", out, "--eps", "0.1", "--quiet", "--strength", "fast",
               "--steps", "attack,lower")
    assert res.exit_code == 130 and "interrupted" in res.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["partial"] is True and rep["steps"] == ["bounds", "certify", "attack"]
    assert all(r["r_cert"] <= r["r_adv"] * (1 + 1e-9) + 1e-12 for r in rep["inputs"] if r["pred"] == r["label"])
    html = (out / "report.html").read_text()
    assert "partial" in html.lower()


# -- progress ----------------------------------------------------------------------------------------


def test_plain_progress_has_an_eta_capped_by_the_time_limit(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("lipverify.report.progress.time.monotonic", lambda: now[0])
    out = io.StringIO()
    bar = _PlainBar(10, "audit [4/6] local certificates", out, every=0.0, limit_s=12.0)
    now[0] = 5.0
    bar.advance(1)  # 1 of 10 after 5 s: the rate says 45 s more, the limit 7 s
    now[0] = 10.0
    bar.advance(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "audit [4/6] local certificates: 1/10 (10%), elapsed 5 s, ETA 7 s"
    assert lines[1].endswith("ETA 2 s") and lines[-1].endswith("- done")


def test_stages_are_numbered_by_step():
    st = Stages(["bounds", "certify", "attack", "lower"], quiet=True)
    with st.stage("attack (fast)", 3, step="attack"):
        assert st.i == 3
    with st.stage("lower bounds", 2, step="lower"):
        assert st.i == 4


def test_progress_reaches_a_piped_stderr(samples, tmp_path):
    import subprocess
    import sys

    x, y, data = samples
    code = ("import sys, lipverify.report.progress as p; p.PLAIN_EVERY_S = 0.0; "
            "from lipverify.cli import main; sys.exit(main())")
    res = subprocess.run([sys.executable, "-c", code, "audit", "--data", str(data), "--out", str(tmp_path / "a"),
                          "--eps", "0.1", "--strength", "fast", "--steps", "attack"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert re.search(r"audit \[3/3\] attack \(fast\): \d+/\d+ \(\d+%\), elapsed \d+ s, ETA", res.stderr), res.stderr
    assert "audit [3/3] attack (fast)" not in res.stdout  # progress goes to stderr only


# -- the words ---------------------------------------------------------------------------------------


def _words(cert_counts, emp_counts, n=10, eps=(0.1, 0.3), r_cert=None, r_adv=None):
    correct = np.ones(n, dtype=bool)
    cert_at = {e: np.arange(n) < c for e, c in zip(eps, cert_counts)}
    r_cert = np.full(n, 0.05) if r_cert is None else r_cert
    r_adv = np.full(n, 0.5) if r_adv is None else r_adv
    cert = verdict.certified_fractions(correct, cert_at, list(eps))
    emp = {e: c / n for e, c in zip(eps, emp_counts)}
    head = verdict.headline("2", list(eps), cert, emp, r_cert, r_adv, correct, 1.0, n, 10)
    lines = verdict.verdict(norm="2", glob=1e6, lower=2.0, pairs=[], r_cert=r_cert, r_adv=r_adv, correct=correct,
                            eps=list(eps), cert=cert, emp=emp, violations=[], lipsdp_info=None, local_info=None)
    return head, lines


def test_words_on_a_vacuous_audit():
    head, lines = _words([0, 0], [9, 7], r_cert=np.full(10, 3e-9))
    assert head.startswith("Nothing is certified at any requested eps (smallest l2 eps = 0.1)")
    assert "empirically robust on 90.0%" in head
    assert any("5.00e+05x the best lower bound" in ln and "far too loose to certify" in ln for ln in lines), lines
    assert any("Certificates are vacuous (no input certified) at eps >= 0.1" in ln for ln in lines)
    assert not any("gain" in ln for ln in lines)
    ratio_line = next(ln for ln in lines if "median certified radius" in ln)
    assert "6.0e-07%" in ratio_line  # 3e-9 / 0.5, never "0.0%"


def test_words_on_a_partly_certified_audit():
    head, lines = _words([4, 0], [9, 7])
    # the largest eps with any certificate is 0.1: 4 of 10 certified, 9 robust, 5 unproven
    assert head == "Certified at l2 eps = 0.1 on 40.0% of 10 inputs; empirically robust on 90.0%; 50.0% unproven."
    assert any(ln.startswith("Certificates are vacuous (no input certified) at eps >= 0.3") for ln in lines)
    assert not any(ln.startswith("Certificates are vacuous") and "0.1" in ln.split(">=")[1] for ln in lines)


def test_words_on_a_strong_audit_and_eps_in_255ths():
    eps = (2 / 255, 8 / 255)
    head, lines = _words([10, 10], [10, 10], eps=eps, r_cert=np.full(10, 0.1), r_adv=np.full(10, 0.2))
    assert head == "Certified at l2 eps = 8/255 on 100.0% of 10 inputs; empirically robust on 100.0%; 0.0% unproven."
    assert not any("vacuous" in ln for ln in lines)
    assert "The median certified radius is 50.0% of the adversarial radius the attacks found (l2)." in lines


def test_headline_at_chance_says_the_data_do_not_match():
    correct = np.zeros(10, dtype=bool)
    correct[0] = True
    head = verdict.headline("2", [0.1], {0.1: 0.1}, {0.1: 0.1}, np.zeros(10), np.zeros(10), correct, 0.1, 10, 10)
    assert "at or below chance" in head and "Certified" not in head


# -- one answer, first, from both doors --------------------------------------------------------------


def test_cli_and_api_give_the_same_audit(samples, tmp_path):
    x, y, data = samples
    out = tmp_path / "a"
    args = ["--eps", "0.1,0.5", "--strength", "fast", "--steps", "attack", "--seed", "3"]
    res = _run("audit", "--data", data, "--out", out, "--quiet", "--time-budget", "none", *args)
    assert res.exit_code == 0, res.stdout + res.stderr
    cli = json.loads((out / "report.json").read_text())
    api = lipverify.load("builtin:default").audit(x.numpy(), y.numpy(), eps="0.1,0.5", strength="fast",
                                                  steps="attack", seed=3, time_budget=None)
    assert cli["headline"] == api.headline
    assert cli["global_upper"] == api.global_upper
    for a, b in zip(cli["inputs"], api.inputs):
        assert a["pred"] == b["pred"] and a["r_cert"] == b["r_cert"] and a["r_adv"] == b["r_adv"]
    assert cli["accuracy_at_eps"] == json.loads(json.dumps(api.to_dict()["accuracy_at_eps"]))
    # the terminal's first line is the headline (wrapped to the terminal's width)
    first = res.stdout.split("lipverify audit")[0]
    assert _flat(first) == _flat(api.headline)
