"""Render an :class:`~lipverify.report.audit.AuditResult` as Markdown, self-contained HTML and JSON."""

from __future__ import annotations

import base64
import html

import numpy as np

from lipverify.report import plots
from lipverify.results import dumps

#: every file :func:`render` writes
REPORT_FILES = ("scatter.png", "accuracy.png", "layers.png", "report.md", "report.html", "report.json")


def figures(res) -> dict[str, bytes]:
    r_cert = np.array([i["r_cert"] for i in res.inputs])
    r_adv = np.array([i["r_adv"] for i in res.inputs])
    correct = np.array([i["label"] == i["pred"] for i in res.inputs])
    layers = [r for r in res.bounds["layers"] if r["lipschitz"] is not None]
    return {
        "scatter.png": plots.radius_scatter(r_cert, r_adv, correct, res.norm),
        "accuracy.png": plots.accuracy_curves(res.curves, res.norm),
        "layers.png": plots.layer_bars([r["name"] for r in layers], [max(r["lipschitz"], 1e-12) for r in layers]),
    }


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if v == float("inf"):
        return "inf"
    return f"{v:.5g}"


def markdown(res, images: dict[str, str]) -> str:
    L = []
    L.append(f"# lipverify audit: {res.model}\n")
    if res.violations:
        L.append(f"**SOUNDNESS VIOLATION on {len(res.violations)} input(s): certified radius above an "
                 "adversarial radius. This is a bug in lipverify.**\n")
    L.append(f"Norm l{res.norm}; {res.n} inputs; eps {', '.join(f'{e:.4g}' for e in res.eps)}; "
             f"input domain {res.clip}; time {res.time_s:.1f} s.\n")
    L.append("## Verdict\n")
    L.extend(f"- {v}" for v in res.verdict)
    L.append("\n## Upper and lower bounds\n")
    L.append("| quantity | upper (sound) | lower (witness) | upper/lower |")
    L.append("|---|---|---|---|")
    lo = res.lipschitz_lower
    L.append(f"| global Lipschitz (product) | {_fmt(res.global_upper)} | {_fmt(lo)} | "
             f"{_fmt(res.global_upper / lo) if lo else '-'} |")
    if res.lipsdp:
        L.append(f"| global Lipschitz (LipSDP) | {_fmt(res.lipsdp['value'])} | {_fmt(lo)} | "
                 f"{_fmt(res.lipsdp['value'] / lo) if lo else '-'} |")
    for name, r in (res.compositional or {}).items():
        L.append(f"| global Lipschitz ({name}) | {_fmt(r['value'])} | {_fmt(lo)} | "
                 f"{_fmt(r['value'] / lo) if lo else '-'} |")
    for p in res.pairs:
        pr = p if isinstance(p, dict) else p.__dict__
        L.append(f"| margin K{tuple(pr['pair'])} | {_fmt(pr['upper'])} | {_fmt(pr['lower'])} | {_fmt(pr['ratio'])} |")
    if res.local:
        L.append(f"\nLocal bounds at eps={res.local['eps']:.4g} on {res.local['n']} inputs: median local/global "
                 f"margin constant {res.local['median_local_over_global']:.3f} (min "
                 f"{res.local['min_local_over_global']:.3f}; sound fraction {res.local['sound_fraction']:.2f}).")
    L.append("\n## Accuracy against eps\n")
    L.append("| eps | certified | empirically robust |")
    L.append("|---|---|---|")
    for e, v in res.accuracy_at_eps.items():
        L.append(f"| {e} | {v['certified']:.3f} | {v['empirical']:.3f} |")
    L.append(f"\n![accuracy]({images['accuracy.png']})\n")
    L.append(f"![certified vs adversarial radius]({images['scatter.png']})\n")
    L.append("## Per input\n")
    L.append("| index | label | pred | certified radius | adversarial radius | found by | certificate |")
    L.append("|---|---|---|---|---|---|---|")
    for i in res.inputs[:200]:
        L.append(f"| {i['index']} | {i['label']} | {i['pred']} | {_fmt(i['r_cert'])} | {_fmt(i['r_adv'])} | "
                 f"{i.get('r_adv_found_by', '-')} | {i['cert_method']} |")
    if len(res.inputs) > 200:
        L.append(f"\n({len(res.inputs) - 200} more inputs in report.json)")
    L.append("\n## Layers\n")
    L.append("| layer | op | constant | method | sound |")
    L.append("|---|---|---|---|---|")
    for r in res.bounds["layers"]:
        L.append(f"| {r['name']} | {r['op']} | {_fmt(r['lipschitz'])} | {r['method']} | {r['sound']} |")
    L.append(f"\n![per-layer constants]({images['layers.png']})\n")
    if res.notes:
        L.append("## Notes\n")
        L.extend(f"- {n}" for n in res.notes)
    return "\n".join(L) + "\n"


def render(res) -> dict[str, bytes]:
    """All report files: report.md (with PNGs beside it), report.html (images embedded), report.json."""
    figs = figures(res)
    files = dict(figs)
    md = markdown(res, {k: k for k in figs})
    files["report.md"] = md.encode()
    data_uris = {k: "data:image/png;base64," + base64.b64encode(v).decode() for k, v in figs.items()}
    body = _md_to_html(markdown(res, data_uris))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>lipverify audit</title><style>"
            "body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;font-size:90%}"
            "img{max-width:100%}strong{color:#b00}</style></head><body>" + body + "</body></html>")
    files["report.html"] = page.encode()
    files["report.json"] = dumps(res.to_dict(), indent=2).encode()
    return files


def _md_to_html(md: str) -> str:
    """A small Markdown subset (headings, lists, tables, images, bold) — enough for the report."""
    out, in_list, table = [], False, []

    def inline(t):
        t = html.escape(t)
        import re

        t = re.sub(r"!\[([^\]]*)\]\(([^)]*)\)", lambda m: f"<img alt='{m.group(1)}' src='{m.group(2)}'>", t)
        t = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)
        return t

    def flush_table():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-", ""}]
            h = "".join(f"<th>{inline(c.strip())}</th>" for c in rows[0].strip("|").split("|"))
            b = "".join("<tr>" + "".join(f"<td>{inline(c.strip())}</td>" for c in r.strip("|").split("|")) + "</tr>"
                        for r in rows[1:])
            out.append(f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{inline(line[2:])}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("# "):
            out.append(f"<h1>{inline(line[2:])}</h1>")
        elif line.startswith("## "):
            out.append(f"<h2>{inline(line[3:])}</h2>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush_table()
    if in_list:
        out.append("</ul>")
    return "\n".join(out)
