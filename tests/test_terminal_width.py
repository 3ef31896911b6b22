"""Terminal tables at any width: no line wider than the console, no number cut or wrapped, no ellipsis, no
word of a method description split across lines; every number the result holds printed exactly as
:mod:`lipverify.report.numbers` formats it (the oracle is the result itself, e.g. K from the JSON)."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from rich.console import Console

from lipverify.cli import main
from lipverify.report import numbers
from lipverify.report.text import print_attack, print_audit, print_bounds, print_certify, print_property_attack
from lipverify.results import BoundsReport, LayerRow, MarginSummary, ValueWithMethod

WIDTHS = (80, 200)
RESNET_ARGS = ("--mean", "0.4914,0.4822,0.4465", "--std", "0.2471,0.2435,0.2616")
BOX = "│┃"


def render(fn, width, *args, **kw) -> str:
    con = Console(file=io.StringIO(), width=width, force_terminal=False)
    fn(*args, console=con, **kw)
    return con.file.getvalue()


def tokens(text: str) -> list[str]:
    return [t for t in re.split(rf"[\s{BOX}]+", text) if t]


def has_number(text: str, s: str) -> bool:
    """``s`` as a whole token (not part of a longer number)."""
    return re.search(rf"(?<![\w.+\-/]){re.escape(s)}(?![\w.%/]|e[+-])", text) is not None


def check_layout(text: str, width: int, *, words=(), wide: str | None = None) -> None:
    lines = text.splitlines()
    assert lines, "nothing printed"
    too_long = [ln for ln in lines if len(ln) > width]
    assert not too_long, f"lines wider than {width}: {too_long[:3]}"
    assert "…" not in text and "..." not in text.replace("... ", ""), text
    toks = set(tokens(text))
    for w in words:  # every word of the method descriptions intact on one line
        assert w in toks, f"word {w!r} split or missing at width {width}:\n{text}"
    if wide is not None:  # a token the unwrapped output lacks is a fragment: never of a method word
        cells = "\n".join(ln for ln in text.splitlines() if ln[:1] in BOX)  # table rows
        extra = set(tokens(cells)) - set(tokens(wide))
        bad = [t for t in extra if any(t != w and (w.startswith(t) or w.endswith(t)) for w in words)]
        assert not bad, f"fragments of method words at width {width}: {bad}\n{text}"


def method_words(*strings) -> list[str]:
    return sorted({w for s in strings for w in str(s).split()})


def check_numbers(text: str, values, fmt=numbers.num) -> None:
    missing = [(v, fmt(v)) for v in values if v is not None and not has_number(text, fmt(v))]
    assert not missing, f"numbers missing or cut: {missing}\n{text}"


# --------------------------------------------------------------------------------------------------- bounds


def synthetic_report(n_classes=10, symmetric=False) -> BoundsReport:
    long_method = ("FFT bound (circular embedding, polyphase for strides) after folding the affine chain "
                   "of batch normalisations into the convolution")
    rows = [
        LayerRow("encoder.layers.11.attention.output_projection.linear_weight_orig", "dense 4096->4096",
                 "dense", (4096,), (4096,), 10886353.0, long_method, True),
        LayerRow("normalize..conv_0", "scale > conv 3->8 k3x3 s2", "conv", (3, 32, 32), (8, 16, 16), 6570.5,
                 "power iteration (100 steps, not a proof)", False),
        LayerRow("relu_1", "relu", "act", (8, 16, 16), (8, 16, 16), 1.0, "slope range [0, 1]", True),
        LayerRow("tiny", "mul", "scale", (8, 16, 16), (8, 16, 16), 1.234e-7, "exact |scale| (float64)", True),
        LayerRow("add_6", "add(+1, +1)", "add", (16, 8, 8), (16, 8, 8), None,
                 "combines branches (bounded in the global propagation)", True),
        LayerRow("neg", "affine", "dense", (10,), (10,), -1.234e300, "hostile value", False),
    ]
    K = [[0.0 if i == j else (6570.5 + 1000.5 * i + 17.25 * j if not symmetric else 6570.5 + 100.25 * (i + j))
          for j in range(n_classes)] for i in range(n_classes)]
    if not symmetric and n_classes > 3:
        K[1][2], K[2][3], K[3][1] = 10886353.0, 1.234e-7, 6570.5
    return BoundsReport("a_model_with_a_rather_long_name.onnx", "2", "sound", (3, 32, 32), n_classes, rows,
                        ValueWithMethod(10886353.0, "product of layer constants along the graph (sums over "
                                                    "residual branches)", True),
                        MarginSummary(K, "l2 norms of row differences of the affine tail x L(h) (propagated)",
                                      True),
                        notes=["a note long enough to wrap at eighty columns of terminal, with a path "
                               "/a/very/long/path/that/does/not/break/anywhere/model_weights_final.onnx"],
                        time_s=3.7312)


def check_bounds_text(text: str, d: dict, width: int, wide: str) -> None:
    """``d``: the report's JSON (the oracle)."""
    words = method_words(*(r["method"] for r in d["layers"]))
    check_layout(text, width, words=words, wide=wide)
    check_numbers(text, [r["lipschitz"] for r in d["layers"]] + [d["global"]["value"], d["margin"]["max"],
                                                                 d["margin"]["min"]])
    K = d["margin"]["K"]
    n = len(K)
    off = [(K[i][j], i, j) for i in range(n) for j in range(n) if i != j]
    if "full matrix: --json" in text:  # summarised: the extreme entries with their pairs
        sym = all(K[i][j] == K[j][i] for _, i, j in off)
        off = [p for p in off if not sym or p[1] < p[2]]
        k = min(5, (len(off) + 1) // 2)
        vals = sorted(off, key=lambda p: -p[0])
        for v, i, j in vals[:k] + vals[::-1][:k]:
            assert re.search(rf"\({i},{j}\)\s*[{BOX}]\s*{re.escape(numbers.num(v))}(?![\w.])", text), (v, i, j, text)
    else:
        check_numbers(text, [v for v, _, _ in off])
        for i in range(n):  # each row of the matrix in order
            row = [numbers.num(K[i][j]) if i != j else "-" for j in range(n)]
            assert re.search(rf"[{BOX}] {i} [{BOX}]\s*" + rf"\s*[{BOX}]\s*".join(map(re.escape, row)), text), (i, text)


@pytest.mark.parametrize("n_classes,symmetric", [(10, False), (10, True), (3, False)])
def test_synthetic_bounds_report(n_classes, symmetric):
    rep = synthetic_report(n_classes, symmetric)
    d = json.loads(json.dumps(rep.to_dict()))
    wide = render(print_bounds, 1000, rep)
    for w in WIDTHS + (60,):
        text = render(print_bounds, w, rep)
        check_bounds_text(text, d, w, wide)
        if w == 200 or n_classes == 3:
            assert "full matrix: --json" not in text
        if w == 80 and n_classes == 10:
            assert "full matrix: --json" in text
    # shapes are the first to go on a narrow terminal, and that is said
    assert "in, out" in render(print_bounds, 80, rep)
    assert "3x32x32" in render(print_bounds, 200, rep)


def test_bounds_narrower_than_any_table_prints_rows_as_lines():
    rep = synthetic_report(10)
    d = rep.to_dict()
    text = render(print_bounds, 40, rep)
    check_layout(text, 40)
    check_numbers(text, [r["lipschitz"] for r in d["layers"]] + [d["global"]["value"]])


@pytest.fixture(scope="module")
def builtin_report():
    import lipverify

    return lipverify.load(lipverify.BUILTIN_DEFAULT).bounds(norm="2", method="sound")


def test_builtin_model_bounds(builtin_report):
    d = json.loads(json.dumps(builtin_report.to_dict()))
    wide = render(print_bounds, 1000, builtin_report)
    for w in WIDTHS:
        check_bounds_text(render(print_bounds, w, builtin_report), d, w, wide)


def _cli(*args, width=80) -> str:
    """The real console script, stdout piped, ``COLUMNS`` set."""
    env = dict(os.environ, COLUMNS=str(width))
    p = subprocess.run([sys.executable, "-m", "lipverify", *args], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_builtin_model_bounds_cli_piped_80(builtin_report):
    d = json.loads(json.dumps(builtin_report.to_dict()))
    text = _cli("bounds")
    check_bounds_text(text, d, 80, render(print_bounds, 1000, builtin_report))
    assert "full matrix: --json" in text


def test_resnet_2b_bounds(realdata):
    import lipverify

    path = realdata / "models" / "onnx" / "resnet_2b.onnx"
    if not path.exists():
        pytest.skip("resnet_2b.onnx not in the real data folder")
    rep = lipverify.load(str(path), mean=RESNET_ARGS[1], std=RESNET_ARGS[3]).bounds(norm="2", method="sound")
    d = json.loads(json.dumps(rep.to_dict()))
    wide = render(print_bounds, 1000, rep)
    for w in WIDTHS:
        check_bounds_text(render(print_bounds, w, rep), d, w, wide)
    text = _cli("bounds", str(path), *RESNET_ARGS)  # the real command, piped, at 80 columns
    check_bounds_text(text, d, 80, wide)
    K = d["margin"]["K"]
    assert any(numbers.num(v) == "6570.5" for row in K for v in row)  # the entry once shown as "657…"
    assert has_number(text, numbers.num(max(v for row in K for v in row)))


# -------------------------------------------------------------------------------------------------- certify


def synthetic_certify(estimates=True):
    return SimpleNamespace(
        n=1000, norm="2", method="global (float32, rounding error bounded)", eps=[36 / 255, 0.3, 1.0],
        clean_accuracy=0.9871, vra={36 / 255: 0.9512, 0.3: 0.9, 1.0: 1.234e-3},
        vra_with_estimates={36 / 255: 0.96, 0.3: 0.91, 1.0: 0.0} if estimates else {},
        median_radius=0.88477123, counts={"global (float32, rounding error bounded)": 7, "local": 12},
        time_s=2.2345, notes=["logits in float32 with a proven rounding-error bound (median 0.0423); 0 of 20 "
                              "input(s) near a decision recomputed in float64"])


@pytest.mark.parametrize("estimates", [True, False])
def test_certify(estimates):
    res = synthetic_certify(estimates)
    for w in WIDTHS:
        text = render(print_certify, w, res, "builtin:default")
        check_layout(text, w)
        check_numbers(text, [res.clean_accuracy, *res.vra.values(), *res.vra_with_estimates.values()], numbers.pct)
        check_numbers(text, res.vra, numbers.eps)
        assert "36/255" in text
        check_numbers(text, [res.median_radius])
        title = [ln for ln in text.splitlines() if "verified-robust accuracy" in ln]
        assert len(title) == 1 and title[0].startswith("verified-robust accuracy")  # one line, not wrapped


def test_certify_cli_piped_80(tmp_path):
    data = tmp_path / "d.npz"
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(0)
    np.savez(data, x=torch.rand(6, 1, 28, 28, generator=g).numpy(), y=np.arange(6) % 10)
    args = ["certify", "--data", str(data), "--eps", "36/255,0.3", "--quiet", "--allow-low-accuracy"]
    runner = CliRunner()
    j = runner.invoke(main, args + ["--json"])
    assert j.exit_code == 0, j.output
    d = json.loads(j.stdout)
    res = runner.invoke(main, args, env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    text = res.stdout
    check_layout(text, 80)
    check_numbers(text, [d["clean_accuracy"], *d["vra"].values()], numbers.pct)
    check_numbers(text, [d["median_radius"]])
    assert "36/255" in text and has_number(text, "0.3")


# --------------------------------------------------------------------------------------------------- attack


def synthetic_attack():
    eps = [2 / 255, 8 / 255, 0.3, 1.0]
    return {"model": "/some/where/a_model_with_a_rather_long_name_and_no_spaces_whatsoever.onnx", "norm": "inf",
            "n": 100, "clip": (0.0, 1.0), "strength": "standard", "eps": eps,
            "robust_accuracy": {f"{e:.6g}": v for e, v in zip(eps, [0.77, 0.4123, 0.0, 1.234e-3])},
            "clean_accuracy": 0.8123, "median_adversarial_radius": 6570.5,
            "found_by": {"fmn": 40, "apgd-t": 3}, "tried": ["fmn (150 steps, 1 targets)",
                                                            "pgd bisection (20 steps x 2 restarts, 4 bisection steps)",
                                                            "apgd-ce (50 steps x 1)"],
            "precision": "float64", "time_s": 146.61, "notes": ["n" * 100], "counterexamples_found": 3}


def test_attack():
    out = synthetic_attack()
    for w in WIDTHS:
        text = render(print_attack, w, out, True)
        check_layout(text, w)
        check_numbers(text, [out["clean_accuracy"], *out["robust_accuracy"].values()], numbers.pct)
        check_numbers(text, out["eps"], numbers.eps)
        assert "2/255" in text and "8/255" in text
        check_numbers(text, [out["median_adversarial_radius"]])


def test_property_attack():
    out = {"model": "m.onnx", "n": 3, "clip": "VNN-LIB box", "time_s": 1.5, "notes": [], "counterexamples_found": 1,
           "inputs": [{"name": f"prop_{i}_spec_with_a_long_file_name_from_the_competition.vnnlib",
                       "property": "Y_0 > Y_1 and Y_0 > Y_2 or some longer output condition",
                       "counterexample": i == 0, "slack": s} for i, s in enumerate([6570.5, -1.234e-7, 10886353.0])]}
    for w in WIDTHS:
        text = render(print_property_attack, w, out)
        check_layout(text, w, words=method_words(out["inputs"][0]["property"]))
        check_numbers(text, [r["slack"] for r in out["inputs"]])


# ---------------------------------------------------------------------------------------------------- audit


def synthetic_audit(headline=True, violations=()):
    eps = [0.1, 36 / 255, 1.0]
    acc = {f"{e:.6g}": {"certified": c, "empirical": m} for e, c, m in zip(eps, [0.9, 0.4567, 0.0],
                                                                        [0.95, 0.8, 0.1234])}
    res = SimpleNamespace(
        model="builtin:default", norm="2", n=200, eps=eps, verdict=[
            "The global bound 9.7 is 1.2x the best lower bound found (8.1).",
            "Median certified radius is 55.0% of the adversarial radius found by attacks (l2), a sentence long "
            "enough to wrap twice at eighty columns of terminal width and still be read in full.",
            "Soundness invariant r_cert <= r_adv held on every input."],
        violations=list(violations), time_s=12.345, notes=["data: first 200 of 1000 images"],
        accuracy_at_eps=acc)
    if headline:
        res.headline = "Certified 45.7% at eps 36/255 where attacks leave 80.0% robust: the bound is 1.8x loose."
    return res


@pytest.mark.parametrize("headline,violations", [(True, ()), (False, ()), (True, [{"index": 3}])])
def test_audit(headline, violations):
    res = synthetic_audit(headline, violations)
    for w in WIDTHS:
        text = render(print_audit, w, res, report_path="lipverify-audit/report.html")
        check_layout(text, w, words=method_words(*res.verdict))
        vals = list(res.accuracy_at_eps.values())
        check_numbers(text, [v["certified"] for v in vals] + [v["empirical"] for v in vals], numbers.pct)
        check_numbers(text, [v["empirical"] - v["certified"] for v in vals], numbers.pct)
        check_numbers(text, res.eps, numbers.eps)
        assert "36/255" in text
        lines = text.splitlines()
        # the answer comes first, right after a violation (which may wrap)
        flat = " ".join(" ".join(lines).split())
        if violations:
            flat = flat[flat.index("do not trust these certificates") + len("do not trust these certificates"):]
        answer = " ".join(res.headline.split()) if headline else res.verdict[0]  # verdict[0] stands in
        assert flat.lstrip().startswith(answer)
        assert ("SOUNDNESS VIOLATION" in lines[0]) == bool(violations)
        assert "report: lipverify-audit/report.html (also report.md, report.json)" in text
        assert math.isclose(float(re.search(r"time ([\d.]+) s", text).group(1)), 12.3)
