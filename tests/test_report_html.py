"""The HTML and Markdown audit reports, read as a newcomer reads them.

Structure (headline card first, glossary, collapsed long tables, running product, dominant layers,
eps as k/255, one vocabulary for soundness), escaping of hostile layer names, self-containment, and
the page as a real headless browser draws it (screenshot and rendered DOM).
"""

from __future__ import annotations

import html as htmlmod
from html.parser import HTMLParser
import math
import re
import shutil
import subprocess

import numpy as np
import pytest

from lipverify.report.audit import AuditResult, PairTightness
from lipverify.report.files import REPORT_FILES, html_page, layer_rows, markdown, render

HOSTILE = "<script>alert('x')</script>"
CARD_RGB = (0xE3, 0xEF, 0xFF)  # the headline card's background (files._CSS .card)
BANNER_RGB = (0xB0, 0x00, 0x20)  # the soundness-violation banner


# ------------------------------------------------------------------------------------------------
# helpers


class _Tree(HTMLParser):
    """Flat list of (tag, attrs, index of the parent tag) plus the text of every table, for structural checks."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.depth, self.tables, self._cell, self._row, self._table = [], 0, {}, None, None, None
        self._stack = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        parent = self._stack[-1][2] if self._stack else None
        self.tags.append((tag, a, parent))
        if tag not in ("img", "meta", "br", "hr", "link", "input"):
            self._stack.append((tag, a, len(self.tags) - 1))
        if tag == "table":
            self._table = []
            owner = next((x.get("id") for t, x, _ in reversed(self._stack) if t == "details" and x.get("id")), None)
            self.tables[owner or f"table{len(self.tables)}"] = self._table
        elif tag == "tr" and self._table is not None:
            self._row = {"class": a.get("class", ""), "cells": []}
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        while self._stack:
            t = self._stack.pop()[0]
            if t == tag:
                break
        if tag in ("td", "th") and self._cell is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(page: str) -> _Tree:
    t = _Tree()
    t.feed(page)
    return t


def _body_children(tree: _Tree):
    """Top-level elements of <body>, in order."""
    body = next(k for k, (tag, _, _) in enumerate(tree.tags) if tag == "body")
    return [(tag, a) for tag, a, parent in tree.tags if parent == body]


def _text(page: str) -> str:
    """The page without its inlined images and tags (what a reader can see, roughly)."""
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    return htmlmod.unescape(re.sub(r"<[^>]+>", " ", page))


def _layers(n=30, hostile=True, cumulative=None):
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        c = float(np.exp(rng.normal(0.2, 0.6))) if k % 2 == 0 else 1.0
        name = f"block{k}.conv"
        if hostile and k == 4:
            name = HOSTILE
        if hostile and k == 6:
            name = "price $x^2$ {and} \\frac\nnewline|pipe"
        rows.append({"name": name, "op": "conv 3->3 k3x3" if k % 2 == 0 else "relu", "kind": "linear",
                     "in_shape": [3, 8, 8], "out_shape": [3, 8, 8], "lipschitz": c,
                     "method": "FFT bound" if k % 2 == 0 else "slope range [0, 1]", "sound": k != 8})
    rows.insert(10, {"name": "add", "op": "add", "kind": "add", "in_shape": [3, 8, 8], "out_shape": [3, 8, 8],
                     "lipschitz": None, "method": "sum of branches", "sound": True})
    if cumulative is not None:
        for r, v in zip(rows, cumulative(rows)):
            r["cumulative"] = v
    return rows


def _hand_made(violations=(), layers=None, headline="Certified at 8/255 on 50.0% of inputs, 75.0% survive attacks."):
    eps = [2 / 255, 8 / 255, 0.1]
    inputs = [{"index": i, "label": i % 3, "pred": i % 3 if i != 3 else 1, "r_cert": 0.01 * (i + 1),
               "r_adv": 0.05 * (i + 1), "r_adv_found_by": "pgd", "cert_method": f"global {HOSTILE}",
               "sound": i != 2} for i in range(8)]
    layers = _layers() if layers is None else layers
    glob = float(np.prod([r["lipschitz"] for r in layers if r["lipschitz"] is not None]))
    res = AuditResult(
        model=f"net{HOSTILE}.onnx", norm="inf", n=8, eps=eps, clip=(0.0, 1.0),
        bounds={"layers": layers, "global": {"value": glob, "method": "product", "sound": True}},
        global_upper=glob, lipschitz_lower=glob / 40.0, lipschitz_lower_method="witness",
        lipsdp={"value": glob / 2, "sound": False, "method": "power iteration", "time_s": 0.1,
                "ratio_to_lower": 20.0},
        local={"eps": 8 / 255, "n": 4, "median_local_over_global": 0.5, "min_local_over_global": 0.25,
               "sound_fraction": 1.0},
        pairs=[PairTightness((1, 2), 3.0, 1.0, 3.0, "gradient-fd")],
        inputs=inputs,
        curves={"eps": [0.0, 0.05, 0.1], "clean": [0.875] * 3, "certified": [0.875, 0.25, 0.0],
                "empirical": [0.875, 0.75, 0.5]},
        accuracy_at_eps={f"{e:.6g}": {"certified": c, "empirical": m}
                         for e, c, m in zip(eps, (0.625, 0.5, 0.0), (0.875, 0.75, 0.5))},
        violations=list(violations), verdict=["First verdict line.", f"A line with {HOSTILE} in it."],
        time_s=1.5, notes=[f"note about layer {HOSTILE}"])
    res.headline = headline  # a field of AuditResult in newer versions; set here either way
    return res


def _render(res, tmp_path):
    files = render(res)
    assert set(files) == set(REPORT_FILES)
    for k, v in files.items():
        (tmp_path / k).write_bytes(v)
    return files["report.html"].decode(), files["report.md"].decode()


def _check_structure(page: str, md: str, headline: str, violation: bool = False):
    tree = _parse(page)
    top = _body_children(tree)
    first = top[0]
    if violation:
        assert first[1].get("class") == "violation" and top[1][1].get("id") == "headline"
    else:
        assert first[0] == "header" and first[1].get("id") == "headline"
    # the headline is the first thing said, before the verdict and every table
    card = page.index("id='headline'")
    assert page.index(htmlmod.escape(headline, quote=True)) > card
    assert page.index(htmlmod.escape(headline, quote=True)) < min(page.index("<table"), page.index("id='verdict'"))
    text = _text(page)
    for term in ("VRA", "r_cert", "r_adv", "K(i,j)", "global Lipschitz bound", "witness", "estimate (not a bound)",
                 "Clean accuracy", "Certified (VRA)", "Empirically robust"):
        assert term in text, term
    assert "id='glossary'" in page
    # long tables collapsed: <details> without the open attribute
    details = [a for t, a, _ in tree.tags if t == "details"]
    assert {"layer-table", "input-table"} <= {a.get("id") for a in details}
    assert all("open" not in a for a in details)
    # one vocabulary for soundness; no Python booleans leak into the page
    assert not re.search(r"\b(True|False)\b", text), re.findall(r".{40}\b(?:True|False)\b.{20}", text)
    # self-contained: the three figures inlined, nothing fetched
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r"<(script|link|iframe|object|embed)\b", page, re.I)
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//)", page, re.I) and "@import" not in page
    assert "url(" not in page
    # Markdown: same headline, glossary and vocabulary
    assert md.index(f"> **{headline}**") < md.index("## Verdict")
    assert "## Glossary" in md and "estimate (not a bound)" in md
    assert not re.search(r"\b(True|False)\b", md)
    return tree


# ------------------------------------------------------------------------------------------------
# a real audit of the built-in model


@pytest.fixture(scope="module")
def real_audit(tmp_path_factory):
    import lipverify
    from lipverify.models.zoo import default_samples
    from lipverify.report.audit import run_audit

    x, y = default_samples()
    lm = lipverify.load()
    lm.set_domain(0.0, 1.0)
    res = run_audit(lm, x[:4], y[:4], [8 / 255, 0.5], norm="2", clip=(0.0, 1.0), strength="fast", lower_steps=20,
                    n_local=0, method="global")
    out = tmp_path_factory.mktemp("real")
    page, md = _render(res, out)
    return res, page, md, out


def test_real_audit_report_structure(real_audit):
    res, page, md, _ = real_audit
    headline = getattr(res, "headline", None) or res.verdict[0]
    tree = _check_structure(page, md, headline)
    assert "8/255" in _text(page) and "8/255" in md  # eps as k/255, never 0.031372...
    assert "0.0313725" not in page
    rows = tree.tables["layer-table"]
    assert len(rows) - 1 == len(res.bounds["layers"])
    # the layer with the largest constant dominates the bound
    big = max(range(len(res.bounds["layers"])), key=lambda k: res.bounds["layers"][k]["lipschitz"] or 0)
    assert "dominant" in rows[1 + big]["class"] and rows[1 + big]["cells"][1].startswith("★")
    # running product against an independent computation: the graph's cumulative bounds where the rows
    # carry them, else the product of the constants; for this chain the last one is the global bound
    col = rows[0]["cells"].index("running product")
    got = [float(r["cells"][col]) for r in rows[1:]]
    layers = res.bounds["layers"]
    if any(r.get("cumulative") is not None for r in layers):
        expect = [r["cumulative"]["value"] if isinstance(r["cumulative"], dict) else r["cumulative"] for r in layers]
    else:
        expect = np.cumprod([1.0 if r["lipschitz"] is None else r["lipschitz"] for r in layers])
    np.testing.assert_allclose(got, expect, rtol=1e-4)
    assert got[-1] == pytest.approx(res.global_upper, rel=1e-4)
    # the previous audit-page expectations still hold
    assert "Verdict" in page and "upper/lower" in md


def test_real_audit_screenshot(real_audit, tmp_path):
    res, _, _, out = real_audit
    headline = getattr(res, "headline", None) or res.verdict[0]
    shot = _screenshot(out / "report.html", tmp_path / "shot.png", tmp_path)
    _check_top_band(shot, CARD_RGB)
    dom = _dump_dom(out / "report.html", tmp_path)
    assert headline in htmlmod.unescape(re.sub(r"<[^>]+>", "", dom))


# ------------------------------------------------------------------------------------------------
# a hand-made result: hostile names, l-inf eps in k/255, a long network


def test_hand_made_report_structure_and_escaping(tmp_path):
    res = _hand_made()
    page, md = _render(res, tmp_path)
    tree = _check_structure(page, md, res.headline)
    text = _text(page)
    # escaping: the hostile name is shown as text, never as markup (page, title, tables, notes)
    assert "<script" not in page.lower()
    assert htmlmod.escape(HOSTILE, quote=True) in page and HOSTILE in text
    assert "<script" not in md.lower()
    # eps as k/255 in the headline card, the tables and the glossary; 0.1 as a decimal
    for k in ("2/255", "8/255"):
        assert f"ε = {k}" in text and f"| {k} |" in md
    assert "ε = 0.1" in text
    # soundness vocabulary: the LipSDP value and one layer are estimates
    bounds = tree.tables["table1"]
    lipsdp = next(r for r in bounds if r["cells"][0].endswith("(LipSDP)"))
    assert lipsdp["cells"][2] == "estimate (not a bound)"
    # running product: the fallback (no cumulative field) is the product of the constants in order
    rows = tree.tables["layer-table"]
    col = rows[0]["cells"].index("running product")
    consts = [r["lipschitz"] for r in res.bounds["layers"]]
    expect = np.cumprod([1.0 if c is None else c for c in consts])
    got = [float(r["cells"][col]) for r in rows[1:]]
    np.testing.assert_allclose(got, expect, rtol=1e-4)
    # dominant: the largest constants, at most five, the largest always; the markdown marks the same
    logs = {k: math.log(c) for k, c in enumerate(consts) if c is not None and c > 1}
    top = sorted(logs, key=lambda k: -logs[k])
    marked = [k for k, r in enumerate(rows[1:]) if "dominant" in r["class"]]
    assert top[0] in marked and 1 <= len(marked) <= 5 and set(marked) <= set(top[:5])
    md_marked = [ln for ln in md.splitlines() if ln.startswith("| ") and "★" in ln]
    assert len(md_marked) == len(marked)
    # a hostile name with a pipe stays inside its Markdown cell
    line = next(ln for ln in md.splitlines() if "newline" in ln)
    assert line.count("|") - line.count("\\|") == 9


def test_running_product_uses_cumulative_field(tmp_path):
    """Where the layer rows carry the graph's cumulative bound (residual branches summed), the report
    shows it rather than a plain product."""
    layers = _layers(n=12, hostile=False, cumulative=lambda rows: [0.5 * (k + 1) for k in range(len(rows))])
    rows, how = layer_rows({"layers": layers})
    assert [r["running"] for r in rows] == [0.5 * (k + 1) for k in range(len(layers))]
    assert "graph" in how
    page = html_page(_hand_made(layers=layers), {k: "data:image/png;base64," for k in REPORT_FILES})
    t = _parse(page).tables["layer-table"]
    col = t[0]["cells"].index("running product")
    assert [float(r["cells"][col]) for r in t[1:]] == [0.5 * (k + 1) for k in range(len(layers))]
    # a row without a cumulative bound (or an infinite one, null in the JSON) shows "-", not a product
    layers[-1]["cumulative"] = None
    assert layer_rows({"layers": layers})[0][-1]["running"] is None
    # rows of an older report (no cumulative field, or all None): the product of the constants
    for r in layers:
        r["cumulative"] = None
    assert "product" in layer_rows({"layers": layers})[1]


def test_violation_banner_comes_first(tmp_path):
    res = _hand_made(violations=[{"index": 0, "r_cert": 1.0, "r_adv": 0.5}])
    page, md = _render(res, tmp_path)
    _check_structure(page, md, res.headline, violation=True)
    assert md.lstrip().startswith("> **SOUNDNESS VIOLATION")
    assert page.index("SOUNDNESS VIOLATION") < page.index("id='headline'")


def test_headline_falls_back_to_first_verdict_line():
    res = _hand_made(headline=None)
    page = html_page(res, {k: "data:image/png;base64," for k in REPORT_FILES})
    md = markdown(res, {k: k for k in REPORT_FILES})
    card = page[page.index("id='headline'"):page.index("</header>")]
    assert "First verdict line." in card and "> **First verdict line.**" in md


def test_hand_made_screenshot(tmp_path):
    """The browser draws the page: headline card at the top; with a violation, the red banner above it."""
    res = _hand_made()
    _render(res, tmp_path)
    shot = _screenshot(tmp_path / "report.html", tmp_path / "shot.png", tmp_path)
    _check_top_band(shot, CARD_RGB)
    dom = _dump_dom(tmp_path / "report.html", tmp_path)
    assert res.headline in htmlmod.unescape(re.sub(r"<[^>]+>", "", dom))
    assert "<script>alert" not in dom  # the hostile name never became an element
    bad = _hand_made(violations=[{"index": 0, "r_cert": 1.0, "r_adv": 0.5}])
    (tmp_path / "bad").mkdir()
    _render(bad, tmp_path / "bad")
    shot = _screenshot(tmp_path / "bad" / "report.html", tmp_path / "bad.png", tmp_path)
    _check_top_band(shot, BANNER_RGB, band=(0, 90))
    _check_top_band(shot, CARD_RGB)


# ------------------------------------------------------------------------------------------------
# the browser


def _browser():
    b = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if b is None:
        pytest.skip("no headless browser (chromium) found to draw the HTML report")
    return b


def _chrome(html_file, tmp, *extra):
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chrome-profile'}", "--window-size=1200,900", *extra, f"file://{html_file}"]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("headless browser did not finish in 120 s")


def _screenshot(html_file, png, tmp):
    p = _chrome(html_file, tmp, f"--screenshot={png}")
    assert p.returncode == 0 and png.exists(), p.stderr[-2000:]
    assert png.read_bytes()[:4] == b"\x89PNG"
    return png


def _dump_dom(html_file, tmp) -> str:
    p = _chrome(html_file, tmp, "--dump-dom")
    assert p.returncode == 0 and "<body" in p.stdout, p.stderr[-2000:]
    return p.stdout


def _check_top_band(png, rgb, band=(0, 300)):
    """Not blank; the band at the top holds the colour ``rgb`` (a card or banner) and dark text on it."""
    Image = pytest.importorskip("PIL.Image")
    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert a.shape[0] >= 600 and a.shape[1] >= 1000
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 50  # not blank
    top = a[band[0]:band[1]]
    match = np.abs(top - np.array(rgb)).sum(-1) <= 6
    assert match.mean() > 0.05, f"{match.mean():.3f} of the top band has the colour {rgb}"
    ys, xs = np.nonzero(match)
    box = top[ys.min():ys.max() + 1, xs.min():xs.max() + 1]  # the card (or banner) as drawn
    # dark text on the card, white text on the red banner
    text = (box.sum(-1) < 200) if rgb != BANNER_RGB else (box.min(-1) > 235)
    assert text.mean() > 0.005, f"no text drawn on the {rgb} box at the top ({text.mean():.4f})"


def test_bound_tile_uses_the_tightest_sound_bound():
    res = _hand_made()
    res.compositional = {"eclipse": {"value": res.global_upper / 4, "sound": True, "method": "eclipse", "time_s": 1.0},
                         "made-up": {"value": res.global_upper / 100, "sound": False, "method": "?", "time_s": 1.0}}
    page = html_page(res, {k: "data:image/png;base64," for k in REPORT_FILES})
    card = _text(page[page.index("id='headline'"):page.index("</header>")])
    assert "10x" in card and "eclipse; sound" in card  # 40x / 4; the estimate is never used
