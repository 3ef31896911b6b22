"""Render an :class:`~lipverify.report.audit.AuditResult` as Markdown, self-contained HTML and JSON.

Both human-readable reports have the same layout, written for a reader new to certification:

1. a red banner when the soundness invariant failed (a bug in lipverify), above everything;
2. a headline card: one line answering "how robust is this model?", then the key figures (clean
   accuracy, certified accuracy (VRA) and empirically robust accuracy at each eps, and how loose the
   global bound is against the best lower bound);
3. the verdict, a short glossary, the tables and figures; the long tables (per layer, per input) are
   collapsed in the HTML.

Every number goes through :mod:`lipverify.report.numbers`; soundness is always written ``sound`` or
``estimate (not a bound)``.  The HTML needs nothing outside itself (figures are inlined as base64,
no fonts, scripts or style sheets are fetched) and every string taken from the model is escaped.
"""

from __future__ import annotations

import base64
import html
import math
import re

import numpy as np

from lipverify.arguments import eps_key
from lipverify.report import plots
from lipverify.report.numbers import eps as fmt_eps
from lipverify.report.numbers import num, pct, ratio
from lipverify.results import dumps

#: every file :func:`render` writes
REPORT_FILES = ("scatter.png", "accuracy.png", "layers.png", "report.md", "report.html", "report.json")

SOUND = "sound"
ESTIMATE = "estimate (not a bound)"

#: how many layers are marked as dominating the bound
N_DOMINANT = 5
#: ... each with at least this share of the log of the product (the largest one always)
MIN_SHARE = 0.05
#: at most this many layers in the per-layer chart (the largest constants)
N_CHART = 20
#: at most this many rows in the per-input table
N_INPUTS = 200


def _sound(flag) -> str:
    return SOUND if flag else ESTIMATE


def _norm_name(norm: str) -> str:
    return "l∞" if str(norm) == "inf" else f"l{norm}"


# ------------------------------------------------------------------------------------------------
# what both reports say


def _correct(res) -> np.ndarray:
    return np.array([i["label"] == i["pred"] for i in res.inputs], dtype=bool)


def _accuracy_rows(res) -> list[dict]:
    """One row per requested eps: certified and empirical accuracy (fractions and counts)."""
    rows = []
    n = max(res.n, 1)
    table = dict(res.accuracy_at_eps)
    for e in res.eps:
        v = table.get(eps_key(e))
        if v is None:  # keys written some other way: match the value
            v = next((w for k, w in table.items() if _same(k, e)), None)
        if v is None:
            continue
        rows.append({"eps": fmt_eps(e, res.norm), "certified": v["certified"], "empirical": v["empirical"],
                     "n_cert": int(round(v["certified"] * n)),
                     "n_emp": None if v["empirical"] is None else int(round(v["empirical"] * n))})
    return rows


def _emp(a: dict, n: int) -> str:
    return "not run" if a["empirical"] is None else f"{pct(a['empirical'])} ({a['n_emp']}/{n})"


def _gap(a: dict) -> str:
    return "-" if a["empirical"] is None else f"{100 * (a['empirical'] - a['certified']):.1f} points"


def _same(key, e) -> bool:
    try:
        return math.isclose(float(key), float(e), rel_tol=1e-5)
    except (TypeError, ValueError):
        return False


def _cumulative_value(v):
    """A row's ``cumulative`` field: a number, ``{"value": ...}``, or None (none, or not finite: shown "-")."""
    if isinstance(v, dict):
        v = v.get("value")
    return None if v is None else float(v)


def layer_rows(bounds: dict) -> tuple[list[dict], str]:
    """The per-layer rows with a running product and the layers that dominate the bound.

    The running product is the row's ``cumulative`` field (the graph's bound from the input to the
    layer's output, residual branches included; None is shown as ``-``, ``inf`` where the row says the
    bound overflowed) where the rows carry it, else the product of the
    constants in order (``None`` constants, e.g. of an ``add``, are skipped).  Dominant: the
    :data:`N_DOMINANT` largest constants above 1, by their share of the log of the product of all
    constants above 1 (the layers that make the bound grow), those with at least :data:`MIN_SHARE` of it.
    """
    src = list(bounds.get("layers", []))
    use_cum = any(r.get("cumulative") is not None for r in src)
    rows, prod = [], 1.0
    for k, r in enumerate(src):
        c = r.get("lipschitz")
        if c is not None:
            prod *= float(c)
        run = _cumulative_value(r.get("cumulative")) if use_cum else prod
        if run is None and r.get("overflow"):  # the running bound passed float64's range here
            run = math.inf
        rows.append({"index": k + 1, "name": str(r.get("name", "")), "op": str(r.get("op", "")), "constant": c,
                     "running": run, "method": str(r.get("method", "")), "sound": r.get("sound"),
                     "share": None, "dominant": False})
    growth = [(math.log(float(r["constant"])), r) for r in rows
              if r["constant"] is not None and float(r["constant"]) > 1.0]
    total = sum(g for g, _ in growth)
    if total > 0:
        for g, r in growth:
            r["share"] = g / total
        for k, (_, r) in enumerate(sorted(growth, key=lambda t: -t[0])[:N_DOMINANT]):
            r["dominant"] = k == 0 or r["share"] >= MIN_SHARE
    how = ("the graph's bound from the input to this layer's output" if use_cum
           else "product of the constants from the first layer to this one")
    return rows, how


def _tiles(res) -> list[dict]:
    """The key figures of the headline card: title, (label, big value) rows, a line under them, a tip."""
    correct = _correct(res)
    n = len(correct)
    acc = _accuracy_rows(res)
    tiles = [{"title": "Clean accuracy", "rows": [("", pct(correct.mean()) if n else "-")],
              "sub": f"{int(correct.sum())} of {n} inputs classified correctly",
              "tip": "fraction of inputs the model classifies correctly without any perturbation"}]
    shown = acc[:4]
    more = f" ({len(acc) - 4} more eps in the table below)" if len(acc) > 4 else ""
    tiles.append({"title": "Certified (VRA)", "rows": [(f"ε = {a['eps']}", pct(a["certified"])) for a in shown],
                  "sub": "proven: no perturbation of size ε can change the prediction" + more,
                  "tip": "verified robust accuracy: correct and certified at eps (sound)"})
    tiles.append({"title": "Empirically robust", "rows": [(f"ε = {a['eps']}", pct(a["empirical"]) if a["empirical"]
                                                            is not None else "not run") for a in shown],
                  "sub": "attacks failed to change the prediction — an estimate (not a bound)" + more,
                  "tip": "correct and no adversarial example found within eps; an upper limit for VRA"})
    lo = res.lipschitz_lower
    if lo:
        value, how, sound = _best_global(res)
        tiles.append({"title": "Global bound vs lower bound", "rows": [("", ratio(value / lo))],
                      "sub": f"bound {num(value)} ({how}; {_sound(sound)}) / lower bound {num(lo)} (witness); "
                             "1x would be exact",
                      "tip": "how much larger the sound global Lipschitz bound is than a value the model "
                             "provably reaches"})
    elif res.pairs:
        p = max((_pair(p) for p in res.pairs), key=lambda q: q["ratio"])
        tiles.append({"title": "Margin bound vs lower bound", "rows": [("", ratio(p["ratio"]))],
                      "sub": f"K{_pair_name(p)}: bound {num(p['upper'])} (sound) / lower bound "
                             f"{num(p['lower'])} (witness); 1x would be exact",
                      "tip": "the loosest of the margin constants that decide predictions"})
    return tiles


def _best_global(res) -> tuple[float, str, bool]:
    """The tightest sound global bound (value, method, sound); the product when none is sound."""
    g = res.bounds.get("global", {})
    found = [(float(res.global_upper), "product of layers", bool(g.get("sound", True)))]
    if res.lipsdp:
        found.append((float(res.lipsdp["value"]), "LipSDP", bool(res.lipsdp.get("sound"))))
    for name, c in (res.compositional or {}).items():
        found.append((float(c["value"]), str(name), bool(c.get("sound"))))
    sound = [f for f in found if f[2]]
    return min(sound, key=lambda f: f[0]) if sound else found[0]


def _pair(p) -> dict:
    return p if isinstance(p, dict) else p.__dict__


def _pair_name(p) -> str:
    return "(" + ",".join(str(v) for v in p["pair"]) + ")"


def _bound_rows(res) -> list[tuple]:
    """(quantity, upper, soundness of the upper, lower, upper/lower)."""
    lo = res.lipschitz_lower

    def r(v):
        return ratio(v / lo) if lo and v is not None else "-"

    g = res.bounds.get("global", {})
    rows = [("global Lipschitz bound (product of layers)", num(res.global_upper), _sound(g.get("sound", True)),
             num(lo), r(res.global_upper))]
    if res.lipsdp:
        rows.append(("global Lipschitz bound (LipSDP)", num(res.lipsdp["value"]), _sound(res.lipsdp.get("sound")),
                     num(lo), r(res.lipsdp["value"])))
    for name, c in (res.compositional or {}).items():
        rows.append((f"global Lipschitz bound ({name})", num(c["value"]), _sound(c.get("sound")), num(lo),
                     r(c["value"])))
    for p in map(_pair, res.pairs):
        rows.append((f"margin constant K{_pair_name(p)}", num(p["upper"]), SOUND, num(p["lower"]), ratio(p["ratio"])))
    return rows


def _glossary(res) -> list[tuple[str, str]]:
    nn = _norm_name(res.norm)
    if str(res.norm) == "inf":
        norm_txt = f"{nn} norm: the largest change made to any single input value (pixel)"
    else:
        norm_txt = f"{nn} norm: the Euclidean length of the whole change, all input values (pixels) together"
    if res.clip is not None:
        lo, hi = res.clip
        scale = (f"Inputs lie in [{num(lo)}, {num(hi)}]" +
                 ("; on this pixel scale k/255 is a change of k grey levels of an 8-bit image, "
                  "e.g. 8/255 ≈ 0.031." if (float(lo), float(hi)) == (0.0, 1.0) else "."))
    else:
        scale = "The input domain is not bounded; ε is on the model's own input scale."
    return [
        ("ε (eps)", f"The size of the input change the model must withstand, measured in the {norm_txt}. {scale}"),
        ("VRA (certified)", "Verified robust accuracy: the fraction of inputs that are classified correctly AND "
                            "proven robust at ε. This is a guarantee."),
        ("Empirically robust", "The fraction classified correctly where the attacks found no adversarial example "
                               "within ε. An estimate (not a bound): a stronger attack may do better. VRA is never "
                               "above it."),
        ("certified radius r_cert", "Distance around an input within which the prediction provably cannot change: "
                                    "the margin between the top two scores divided by their constant K(i,j)."),
        ("adversarial radius r_adv", "Distance to the closest input with a different prediction that the attacks "
                                     "found. The true robust radius lies between r_cert and r_adv, so r_cert <= "
                                     "r_adv must always hold (checked on every input)."),
        ("K(i,j) margin constant", "How fast the difference between the scores of classes i and j can change per "
                                   "unit of input change. A smaller K gives larger certified radii."),
        ("global Lipschitz bound", "An upper bound, valid for every input, on how much the outputs can change per "
                                   "unit of input change; here from the product of the layers' constants (or a "
                                   "tighter method where named)."),
        ("lower bound / witness", "A Lipschitz value the model actually reaches, shown by a concrete pair of "
                                  "inputs (the witness). The true constant lies between the lower bound and the "
                                  "bound; their ratio says how loose the bound can be at most."),
        ("sound vs estimate", "sound: guaranteed, rounding errors included. estimate (not a bound): a measured "
                              "value that the true one may exceed."),
        ("running product, dominant layers", "The bound from the input up to each layer. The layers with the "
                                             "largest constants make it grow most (marked ★): they are where "
                                             "training or a tighter bound would pay off."),
    ]


def _meta(res) -> str:
    clip = "unbounded" if res.clip is None else f"[{num(res.clip[0])}, {num(res.clip[1])}]"
    return (f"norm {_norm_name(res.norm)} · {res.n} inputs · eps {', '.join(fmt_eps(e, res.norm) for e in res.eps)}"
            f" · input domain {clip} · time {num(res.time_s)} s")


def _headline(res) -> str:
    h = getattr(res, "headline", None) or (res.verdict[0] if res.verdict else "")
    return str(h)


def _violation_text(res) -> str:
    return (f"SOUNDNESS VIOLATION on {len(res.violations)} input(s): a certified radius is larger than an "
            "adversarial radius. This is a bug in lipverify; do not trust these certificates.")


def make_figures(res) -> dict[str, bytes]:
    r_cert = np.array([i["r_cert"] for i in res.inputs], dtype=float)
    r_adv = np.array([np.nan if i["r_adv"] is None else i["r_adv"] for i in res.inputs], dtype=float)
    correct = _correct(res)
    rows, _ = layer_rows(res.bounds)
    return {
        "scatter.png": plots.radius_scatter(r_cert, r_adv, correct, res.norm),
        "accuracy.png": plots.accuracy_curves(res.curves, res.norm, eps_marks=list(res.eps)),
        "layers.png": plots.layer_chart([f"{r['index']}. {r['name']} {r['op']}" for r in rows],
                                        [r["constant"] for r in rows], [r["running"] for r in rows],
                                        [r["dominant"] for r in rows], res.norm, n_bars=N_CHART),
    }


# ------------------------------------------------------------------------------------------------
# Markdown


def _md(s) -> str:
    """A string from the model made harmless in a Markdown table cell or line."""
    s = " ".join(str(s).split()).replace("&", "&amp;").replace("|", "\\|")
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", s)  # no tag can start; "<=" stays readable


def markdown(res, images: dict[str, str]) -> str:
    L = []
    if res.violations:
        L.append(f"> **{_violation_text(res)}**\n")
    L.append(f"# lipverify audit: {_md(res.model)}\n")
    L.append(f"> **{_md(_headline(res))}**\n")
    L.append(_md(_meta(res)) + "\n")
    L.append("| key figure | value | what it means |")
    L.append("|---|---|---|")
    for t in _tiles(res):
        val = "; ".join(f"{a}: **{b}**" if a else f"**{b}**" for a, b in t["rows"]) or "-"
        L.append(f"| {t['title']} | {val} | {_md(t['sub'])} |")
    L.append("\n## Verdict\n")
    L.extend(f"- {_md(v)}" for v in res.verdict)
    L.append("\n## Glossary\n")
    L.extend(f"- **{term}**: {text}" for term, text in _glossary(res))
    L.append("\n## Upper and lower bounds\n")
    L.append("| quantity | upper | upper is | lower (witness) | upper/lower |")
    L.append("|---|---|---|---|---|")
    L.extend(f"| {q} | {u} | {s} | {lo} | {r} |" for q, u, s, lo, r in _bound_rows(res))
    if res.local:
        lc = res.local
        L.append(f"\nLocal bounds at eps {fmt_eps(lc['eps'], res.norm)} on {lc['n']} inputs: the local margin "
                 f"constant is {pct(lc['median_local_over_global'])} of the global one (median; min "
                 f"{pct(lc['min_local_over_global'])}); {pct(lc['sound_fraction'])} of them {SOUND}.")
    L.append("\n## Accuracy against eps\n")
    L.append("| eps | certified (VRA) | empirically robust | gap |")
    L.append("|---|---|---|---|")
    for a in _accuracy_rows(res):
        L.append(f"| {a['eps']} | {pct(a['certified'])} ({a['n_cert']}/{res.n}) | {_emp(a, res.n)} | {_gap(a)} |")
    if images:
        L.append(f"\n![certified and empirically robust accuracy against eps]({images['accuracy.png']})\n")
        L.append(f"![certified radius against adversarial radius, per input]({images['scatter.png']})\n")
    rows, how = layer_rows(res.bounds)
    L.append("## Layers\n")
    L.append(f"Running product: {how}. ★ marks the layers that make the bound grow most.\n")
    if images:
        L.append(f"![per-layer constants and running product]({images['layers.png']})\n")
    L.append("| # | layer | op | constant | running product | share of growth | method | constant is |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        star = "★ " if r["dominant"] else ""
        L.append(f"| {r['index']} | {star}{_md(r['name'])} | {_md(r['op'])} | {num(r['constant'])} | "
                 f"{num(r['running'])} | {pct(r['share']) if r['share'] is not None else '-'} | {_md(r['method'])} | "
                 f"{_sound(r['sound']) if r['sound'] is not None else '-'} |")
    L.append("\n## Per input\n")
    L.append("| index | label | pred | certified radius | adversarial radius | found by | certificate | "
             "certificate is |")
    L.append("|---|---|---|---|---|---|---|---|")
    for i in res.inputs[:N_INPUTS]:
        L.append(f"| {i['index']} | {i['label']} | {i['pred']} | {num(i['r_cert'])} | {num(i['r_adv'])} | "
                 f"{_md(i.get('r_adv_found_by', '-'))} | {_md(i['cert_method'])} | {_sound(i.get('sound'))} |")
    if len(res.inputs) > N_INPUTS:
        L.append(f"\n({len(res.inputs) - N_INPUTS} more inputs in report.json)")
    if res.notes:
        L.append("\n## Notes\n")
        L.extend(f"- {_md(n)}" for n in res.notes)
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------------
# HTML

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1f2933;
 max-width:1080px;margin:0 auto;padding:20px 24px 48px;line-height:1.45;background:#fff}
h1{font-size:15px;font-weight:600;margin:0 0 6px;color:#334e68;letter-spacing:.02em}
h2{font-size:20px;margin:34px 0 10px;padding-bottom:4px;border-bottom:2px solid #d9e2ec}
.violation{background:#b00020;color:#fff;font-weight:700;font-size:18px;padding:14px 18px;border-radius:8px;
 margin:0 0 16px}
.card{background:#e3efff;border:1px solid #9fc3f5;border-radius:12px;padding:18px 22px 14px;margin:0 0 8px}
.headline{font-size:25px;font-weight:700;color:#0b1f3a;margin:0 0 14px;line-height:1.3}
.tiles{display:flex;flex-wrap:wrap;gap:12px;margin:0 0 10px}
.tile{flex:1 1 200px;background:#fff;border-radius:10px;padding:10px 14px;border:1px solid #c8dcf7}
.tile .t{font-size:13px;font-weight:600;color:#486581;text-transform:uppercase;letter-spacing:.03em}
.tile .row{display:flex;align-items:baseline;justify-content:space-between;gap:8px}
.tile .row.one{justify-content:flex-start}
.tile .lab{font-size:14px;color:#486581}
.tile .big{font-size:30px;font-weight:700;color:#0b1f3a;font-variant-numeric:tabular-nums}
.tile .rows-many .big{font-size:22px}
.tile .sub{font-size:12.5px;color:#52606d;margin-top:4px}
.meta{font-size:13px;color:#334e68;margin:4px 0 0}
.verdict li{margin:3px 0}
dl.gloss{display:grid;grid-template-columns:210px 1fr;gap:6px 16px;margin:0;font-size:14.5px}
dl.gloss dt{font-weight:700;color:#102a43}dl.gloss dd{margin:0;color:#334e68}
table{border-collapse:collapse;margin:6px 0;font-size:13.5px}
td,th{border:1px solid #d9e2ec;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f0f4f8}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.layers td:nth-child(3){white-space:nowrap}
tr.dominant td{background:#fff4d6}tr.dominant td.name{font-weight:700}
.estimate{color:#9c4221;font-weight:600}
details{margin:10px 0;border:1px solid #d9e2ec;border-radius:8px;padding:6px 12px}
summary{cursor:pointer;font-weight:600;color:#243b53}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.figs img{max-width:100%;height:auto;border:1px solid #eef2f6}
img.wide{width:100%;height:auto}
.note{font-size:13px;color:#52606d}
"""


def _h(s) -> str:
    return html.escape(str(s), quote=True)


def _sound_html(flag) -> str:
    if flag is None:
        return "-"
    return SOUND if flag else f"<span class='estimate'>{ESTIMATE}</span>"


def _table(head, rows, num_cols=(), row_class=None, cls="") -> str:
    h = "".join(f"<th>{_h(c)}</th>" for c in head)
    body = []
    for k, r in enumerate(rows):
        cls = f" class='{row_class[k]}'" if row_class and row_class[k] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td class='n'>{c}</td>" if j in num_cols else f"<td>{c}</td>"
                                          for j, c in enumerate(r)) + "</tr>")
    c = f" class='{cls}'" if cls else ""
    return f"<table{c}><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_page(res, images: dict[str, str]) -> str:
    """The self-contained HTML report; ``images`` maps each figure name to a ``data:`` URI."""
    P = []
    if res.violations:
        P.append(f"<div class='violation' id='violation' role='alert'>{_h(_violation_text(res))}</div>")
    P.append("<header class='card' id='headline'>")
    P.append(f"<h1>lipverify audit · {_h(res.model)}</h1>")
    P.append(f"<p class='headline'>{_h(_headline(res))}</p><div class='tiles'>")
    for t in _tiles(res):
        many = " rows-many" if len(t["rows"]) > 1 else ""
        rows = "".join(f"<div class='row'><span class='lab'>{_h(a)}</span><span class='big'>{_h(b)}</span></div>"
                       if a else f"<div class='row one'><span class='big'>{_h(b)}</span></div>"
                       for a, b in t["rows"]) or "<div class='row'><span class='big'>-</span></div>"
        P.append(f"<div class='tile' title='{_h(t['tip'])}'><div class='t'>{_h(t['title'])}</div>"
                 f"<div class='rows{many}'>{rows}</div><div class='sub'>{_h(t['sub'])}</div></div>")
    P.append(f"</div><p class='meta'>{_h(_meta(res))} · new to these words? see the "
             "<a href='#glossary'>glossary</a></p></header>")

    P.append("<h2 id='verdict'>Verdict</h2><ul class='verdict'>")
    P.extend(f"<li>{_h(v)}</li>" for v in res.verdict)
    P.append("</ul>")

    P.append("<h2 id='glossary'>Glossary</h2><dl class='gloss'>")
    P.extend(f"<dt>{_h(term)}</dt><dd>{_h(text)}</dd>" for term, text in _glossary(res))
    P.append("</dl>")

    P.append("<h2 id='accuracy'>Accuracy against eps</h2>")
    acc = _accuracy_rows(res)
    P.append(_table(["eps", "certified (VRA)", "empirically robust", "gap"],
                    [[_h(a["eps"]), f"{pct(a['certified'])} ({a['n_cert']}/{res.n})",
                      _emp(a, res.n), _gap(a)] for a in acc], num_cols=(1, 2, 3)))
    if images:
        P.append("<div class='figs'>"
             f"<img alt='certified and empirically robust accuracy against eps' src='{images['accuracy.png']}' "
             "style='width:560px'>"
             f"<img alt='certified radius against adversarial radius, per input' src='{images['scatter.png']}' "
             "style='width:440px'></div>")

    P.append("<h2 id='bounds'>Upper and lower bounds</h2>")
    P.append(_table(["quantity", "upper", "upper is", "lower (witness)", "upper/lower"],
                    [[_h(q), u, _sound_html(s == SOUND), lo, r] for q, u, s, lo, r in _bound_rows(res)],
                    num_cols=(1, 3, 4)))
    if res.local:
        lc = res.local
        P.append(f"<p>Local bounds at eps {_h(fmt_eps(lc['eps'], res.norm))} on {lc['n']} inputs: the local margin "
                 f"constant is {pct(lc['median_local_over_global'])} of the global one (median; min "
                 f"{pct(lc['min_local_over_global'])}); {pct(lc['sound_fraction'])} of them {SOUND}.</p>")

    rows, how = layer_rows(res.bounds)
    dom = sorted((r for r in rows if r["dominant"]), key=lambda r: -r["share"])
    P.append("<h2 id='layers'>Layers</h2>")
    if dom:
        P.append("<p>The bound grows most in " + ", ".join(
            f"<b>{_h(r['name'])}</b> ({_h(r['op'])}, ×{num(r['constant'])})" for r in dom) + ".</p>")
    if images:
        P.append(f"<img class='wide' alt='per-layer constants and running product' src='{images['layers.png']}'>")
    P.append(f"<details id='layer-table'><summary>Per-layer table ({len(rows)} layers; ★ = dominates the bound)"
             "</summary>")
    P.append(f"<p class='note'>Running product: {_h(how)}. Share of growth: the layer's part of the log of the "
             "product of all constants above 1.</p>")
    P.append(_table(["#", "layer", "op", "constant", "running product", "share of growth", "method", "constant is"],
                    [[str(r["index"]), ("★ " if r["dominant"] else "") + _h(r["name"]), _h(r["op"]),
                      num(r["constant"]), num(r["running"]),
                      pct(r["share"]) if r["share"] is not None else "-", _h(r["method"]),
                      _sound_html(r["sound"])] for r in rows],
                    num_cols=(0, 3, 4, 5), row_class=["dominant" if r["dominant"] else "" for r in rows],
                    cls="layers"))
    P.append("</details>")

    P.append("<h2 id='inputs'>Per input</h2>")
    extra = f"; the first {N_INPUTS} shown, all in report.json" if len(res.inputs) > N_INPUTS else ""
    P.append(f"<details id='input-table'><summary>Per-input table ({len(res.inputs)} inputs{extra})</summary>")
    P.append(_table(["index", "label", "pred", "certified radius", "adversarial radius", "found by", "certificate",
                     "certificate is"],
                    [[str(i["index"]), str(i["label"]), str(i["pred"]), num(i["r_cert"]), num(i["r_adv"]),
                      _h(i.get("r_adv_found_by", "-")), _h(i["cert_method"]), _sound_html(i.get("sound"))]
                     for i in res.inputs[:N_INPUTS]], num_cols=(0, 1, 2, 3, 4)))
    P.append("</details>")
    if res.notes:
        P.append("<h2 id='notes'>Notes</h2><ul class='note'>")
        P.extend(f"<li>{_h(n)}</li>" for n in res.notes)
        P.append("</ul>")
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>lipverify audit: {_h(res.model)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(P) + "</body></html>")


def render(res, figures: bool = True) -> dict[str, bytes]:
    """All report files: report.md (with PNGs beside it), report.html (images embedded), report.json.
    ``figures=False``: no PNGs (the quick partial report written after each audit step)."""
    figs = make_figures(res) if figures else {}
    files = dict(figs)
    files["report.md"] = markdown(res, {k: k for k in figs}).encode()
    data_uris = {k: "data:image/png;base64," + base64.b64encode(v).decode() for k, v in figs.items()}
    files["report.html"] = html_page(res, data_uris).encode()
    files["report.json"] = dumps(res.to_dict(), indent=2).encode()
    return files
