"""Human-readable terminal output (rich) for the CLI.

Every number goes through :mod:`lipverify.report.numbers` (at most 11 characters), and every table is laid
out here for the console's width (a pipe counts as 80 columns unless ``COLUMNS`` says otherwise) so that a
number is never cut or wrapped:

* numeric columns are exactly as wide as their widest cell and never wrap;
* text columns wrap at word boundaries and are at least as wide as their longest word (long unbreakable
  names are folded as a last resort);
* when the columns still do not fit, the less important ones (shapes) are left out, and a table that
  cannot fit at all is printed as one line per row;
* a K_ij matrix too wide for the console is summarised by its extreme pairs (``--json`` has it all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lipverify.report.numbers import eps as fmt_eps
from lipverify.report.numbers import num, pct

__all__ = ["print_bounds", "print_certify", "print_attack", "print_property_attack", "print_audit",
           "MAX_LAYER_ROWS"]

#: layer rows printed by ``bounds`` (the first ones and the last 20 of a longer graph; ``--json`` has all)
MAX_LAYER_ROWS = 200

#: widest a column of names grows to make room for an unbreakable name before it folds it
NAME_CAP = 20

#: width a wrapping column should have for easy reading; shapes are left out to give it that much
COMFORT = 24

#: drop order of columns that go for readability, before the others go for lack of room
COMFORT_DROP = 2

#: extreme pairs of K_ij shown (each end) when the matrix does not fit the console
K_EXTREMES = 5


# --------------------------------------------------------------------------------------------------- layout


@dataclass(eq=False)
class _Col:
    """One column: ``kind`` "num" (never wraps), "text" (wraps at words) or "name" (wraps, folds long names);
    ``drop``: order in which columns go when the table is too wide (0: never)."""

    header: str
    kind: str = "text"
    drop: int = 0
    justify: str = "left"
    cells: list = field(default_factory=list)


def _text(v) -> Text:
    if isinstance(v, Text):
        return v
    return Text(str(v))


def _longest_word(t: Text) -> int:
    words = t.plain.split()
    return max((Text(w).cell_len for w in words), default=0)


def _needs(col: _Col) -> tuple[int, int, int]:
    """(smallest, comfortable, natural) content width of a column."""
    head = Text(col.header)
    cells = [_text(c) for c in col.cells]
    widest = max([c.cell_len for c in cells] + [head.cell_len])
    if col.kind == "num":
        return widest, widest, widest
    least = max([_longest_word(c) for c in cells] + [_longest_word(head), 1])
    if col.kind == "name":
        least = min(least, NAME_CAP)
    return least, max(least, min(widest, COMFORT)), widest


def _overhead(n: int) -> int:
    return 3 * n + 1  # edges, separators and one space of padding each side


def _layout(cols: list[_Col], width: int):
    """The columns kept and their content widths, or None when not even the essential ones fit."""
    cols = list(cols)
    for level, limit in ((1, COMFORT_DROP), (0, math.inf)):  # first for readability, then for room
        while True:
            needs = [_needs(c) for c in cols]
            if sum(n[level] for n in needs) + _overhead(len(cols)) <= width:
                break
            droppable = [c for c in cols if 0 < c.drop <= limit]
            if not droppable:
                if level == 0:
                    return None
                break
            cols = [c for c in cols if c is not min(droppable, key=lambda c: c.drop)]
    widths = [n[0] for n in needs]
    spare = width - sum(widths) - _overhead(len(cols))
    # share the rest, one character at a time, to the column furthest from its natural width
    while spare > 0:
        k = max(range(len(cols)), key=lambda k: (needs[k][2] - widths[k], k))
        if widths[k] >= needs[k][2]:
            break
        widths[k] += 1
        spare -= 1
    return cols, widths


def _table(console: Console, cols: list[_Col], heading: str | None = None, after: str | None = None) -> None:
    """Print ``cols`` as a table that fits the console, or one line per row when no table can."""
    c = console
    if heading:
        c.print(Text(heading, style="bold"))
    n_rows = len(cols[0].cells) if cols else 0
    fit = _layout(cols, c.width)
    if fit is None:
        for r in range(n_rows):
            line = Text()
            for k, col in enumerate(cols):
                if k:
                    line.append("   ")
                line.append(f"{col.header}: ", style="dim")
                line.append_text(_text(col.cells[r]))
            c.print(line, overflow="fold")
    else:
        kept, widths = fit
        t = Table(box=box.HEAVY_HEAD, show_header=True)
        for col, w in zip(kept, widths):
            t.add_column(col.header, width=w, justify=col.justify, no_wrap=col.kind == "num", overflow="fold")
        for r in range(n_rows):
            t.add_row(*[_text(col.cells[r]) for col in kept])
        c.print(t)
        gone = [col.header for col in cols if all(col is not k for k in kept)]
        if gone:
            c.print(Text(f"(left out at {c.width} columns: {', '.join(gone)}; --json has every column)",
                         style="dim"))
    if after:
        c.print(Text(after, style="dim"))


def _line(console: Console, *parts) -> None:
    """One line of label/value parts (``(text, style)`` tuples or plain strings), wrapped at words."""
    t = Text()
    for p in parts:
        if isinstance(p, tuple):
            t.append(*p)
        elif isinstance(p, Text):
            t.append_text(p)
        else:
            t.append(str(p))
    console.print(t, overflow="fold")


def _hanging(console: Console, text: str, first: str = "  ", style: str = "") -> None:
    """``text`` after ``first``, wrapped at words with a hanging indent, never truncated."""
    ind = len(first)
    body = Text(str(text), style=style)
    lines = body.wrap(console, max(console.width - ind, 8), overflow="fold") if body.plain else [Text()]
    for k, ln in enumerate(lines):
        ln.rstrip()
        console.print(Text(first if k == 0 else " " * ind) + ln, overflow="fold", soft_wrap=False)


def _indented(console: Console, text: str, style: str = "") -> None:
    _hanging(console, text, "  ", style)


def _bullets(console: Console, lines, style: str = "") -> None:
    for ln in lines:
        _hanging(console, ln, "- ", style)


def _notes(console: Console, notes) -> None:
    for n in notes:
        _line(console, ("note: " + str(n), "dim"))


def _sound(s: bool, short: bool = False) -> Text:
    if s:
        return Text("yes", style="green")
    return Text("estimate" if short else "no (estimate)", style="yellow")


def _secs(t) -> str:
    """Seconds to 3 significant digits (``2.23``, ``147``)."""
    return num(float(f"{float(t):.3g}")) if t is not None and math.isfinite(float(t)) else num(t)


def _eps_value(e):
    """A float for an eps key (``"0.0313725"``, ``0.03``); the key itself when it is not a number."""
    if isinstance(e, str):
        try:
            return float(e)
        except ValueError:
            return e
    return e


def _eps_text(e) -> str:
    v = _eps_value(e)
    return v if isinstance(v, str) else fmt_eps(v)


def _by_eps(eps_list, table: dict) -> list:
    """``(eps, value)`` in the order of ``eps_list`` for a dict keyed ``f"{e:.6g}"`` (then any other keys)."""
    out, seen = [], set()
    for e in eps_list or []:
        k = f"{float(e):.6g}"
        if k in table and k not in seen:
            out.append((float(e), table[k]))
            seen.add(k)
    out += [(_eps_value(k), v) for k, v in table.items() if k not in seen]
    return out


# --------------------------------------------------------------------------------------------------- bounds


def _fidelity_line(f) -> str:
    try:
        verdict = "ok" if f.passed else "FAILED"
        return (f"fidelity vs {f.reference}: max |diff| {num(f.max_abs_diff)}, relative {num(f.max_rel_diff)} "
                f"over {f.n_inputs} inputs (tolerance {num(f.tolerance)}) {verdict}")
    except AttributeError:
        return f.line()


def _k_pairs(K) -> tuple[list, bool]:
    """Off-diagonal ``(value, i, j)``; only ``i < j`` when the matrix is symmetric."""
    n = len(K)
    sym = all(K[i][j] == K[j][i] for i in range(n) for j in range(i + 1, n))
    pairs = [(float(K[i][j]), i, j) for i in range(n) for j in range(n) if i != j and (not sym or i < j)]
    return pairs, sym


def _k_matrix(c: Console, K) -> None:
    n = len(K)
    if n < 2:
        return
    heading = "K_ij (Lipschitz constant of f_i - f_j)"
    cols = [_Col("", "num", cells=[str(i) for i in range(n)])]
    for j in range(n):
        cols.append(_Col(str(j), "num", justify="right",
                         cells=[num(K[i][j]) if i != j else "-" for i in range(n)]))
    if _layout(cols, c.width) is not None:
        _table(c, cols, heading)
        return
    pairs, sym = _k_pairs(K)
    pairs.sort(key=lambda p: -p[0] if not math.isnan(p[0]) else math.inf)
    k = min(K_EXTREMES, (len(pairs) + 1) // 2)
    hi, lo = pairs[:k], pairs[::-1][:k]
    _line(c, (f"{heading}, extreme pairs", "bold"))
    _line(c, (f"full matrix: --json ({n}x{n} is too wide for {c.width} columns"
              + ("; K_ij = K_ji" if sym else "") + ")", "dim"))
    _table(c, [_Col("largest (i,j)", "num", cells=[f"({i},{j})" for _, i, j in hi]),
               _Col("K_ij", "num", justify="right", cells=[num(v) for v, _, _ in hi]),
               _Col("smallest (i,j)", "num", cells=[f"({i},{j})" for _, i, j in lo]),
               _Col("K_ij", "num", justify="right", cells=[num(v) for v, _, _ in lo])])


def _time_text(label, time_s) -> str:
    """The last line: the command's labelled times (loading included) when it set them, else the
    analysis time."""
    return label or f"time {_secs(time_s)} s"


def print_bounds(report, console: Console | None = None) -> None:
    c = console or Console()
    _line(c, ("lipverify bounds", "bold"), f"  model {report.model}  norm l{report.norm}  "
          f"input {tuple(report.input_shape)}  classes {report.n_classes}")
    if report.fidelity is not None:
        _line(c, _fidelity_line(report.fidelity))
    _notes(c, report.notes)
    layers = list(report.layers)
    head, tail = (layers, []) if len(layers) <= MAX_LAYER_ROWS else (layers[:MAX_LAYER_ROWS - 20], layers[-20:])
    cols = [_Col("layer", "name"), _Col("op", "text", drop=3), _Col("in", "num", drop=1),
            _Col("out", "num", drop=2), _Col("constant", "num", justify="right"), _Col("method", "text"),
            _Col("sound", "text")]
    rows = []
    at = getattr(report, "overflow_at", None)
    for k, r in enumerate(head + tail):
        if tail and k == len(head):
            rows.append(["...", "", "", "", "", f"{len(layers) - len(head) - len(tail)} more layers (all in --json)",
                         ""])
        method = r.method
        if r.name == at:
            method = "OVERFLOW: the running bound is inf from this layer on; " + method
        rows.append([r.name, r.op, "x".join(map(str, r.in_shape)), "x".join(map(str, r.out_shape)),
                     num(r.lipschitz), method, _sound(r.sound, short=True) if r.lipschitz is not None else ""])
    for row in rows:
        for col, v in zip(cols, row):
            col.cells.append(v)
    if rows:
        _table(c, cols)
    g = report.global_bound

    def big(v):
        return f"{num(v)} (overflow at layer {at})" if at is not None and v is not None and math.isinf(v) else num(v)
    _line(c, ("global Lipschitz bound", "bold"), f" (l{report.norm}): {big(g.value)}   sound: ", _sound(g.sound))
    _indented(c, f"method: {g.method}", "dim")
    m = report.margin
    _line(c, ("margin constants K_ij", "bold"), f": max {big(m.max)}  min {num(m.min)}   sound: ", _sound(m.sound))
    _indented(c, f"method: {m.method}", "dim")
    _k_matrix(c, m.K)
    _line(c, _time_text(getattr(report, "time_label", None), report.time_s))


# -------------------------------------------------------------------------------------------------- certify


def print_certify(res, model_name: str, console: Console | None = None) -> None:
    c = console or Console()
    _line(c, ("lipverify certify", "bold"), f"  model {model_name}  norm l{res.norm}  method {res.method}  "
          f"inputs {res.n}")
    _notes(c, res.notes)
    _line(c, f"clean accuracy: {pct(res.clean_accuracy)}")
    cols = [_Col("eps", "num", justify="right"), _Col("VRA", "num", justify="right")]
    if res.vra_with_estimates:
        cols.append(_Col("incl. estimates", "num", justify="right"))
    for k, v in res.vra.items():
        cols[0].cells.append(_eps_text(k))
        cols[1].cells.append(pct(v))
        if res.vra_with_estimates:
            cols[2].cells.append(pct(res.vra_with_estimates.get(k, v)))
    _table(c, cols, "verified-robust accuracy (VRA)", "VRA: inputs both correct and soundly certified"
           + ("; incl. estimates: also counting unproven (estimated) certificates" if res.vra_with_estimates
              else ""))
    _line(c, f"median certified radius (correct inputs): {num(res.median_radius)}")
    by = ", ".join(f"{k}: {v}" for k, v in res.counts.items()) or "none"
    at = max((k for k in res.vra if not isinstance(k, str)), default=None)
    _line(c, f"certified{f' at eps = {_eps_text(at)}' if at is not None else ''} by: {by}")
    if getattr(res, "stable_misclassified", 0):
        _line(c, f"certified but misclassified (stable, in no VRA, not in 'certified by'): {res.stable_misclassified}")
    _line(c, _time_text(getattr(res, "time_label", None), res.time_s))


# --------------------------------------------------------------------------------------------------- attack


def print_attack(out: dict, exact_box: bool = False, console: Console | None = None) -> None:
    """The ``lipverify attack`` summary from its JSON object."""
    c = console or Console()
    _line(c, ("lipverify attack", "bold"), f"  model {out['model']}  norm l{out['norm']}  inputs {out['n']}  "
          f"clip {out['clip']}  strength {out['strength']}")
    _notes(c, out["notes"])
    _line(c, f"clean accuracy: {pct(out['clean_accuracy'])}")
    rows = _by_eps(out.get("eps"), out["robust_accuracy"])
    if rows:
        _table(c, [_Col("eps", "num", justify="right", cells=[_eps_text(e) for e, _ in rows]),
                   _Col("robust accuracy", "num", justify="right", cells=[pct(v) for _, v in rows])],
               "robust accuracy under attack")
    if exact_box:
        _line(c, f"counterexamples found inside the VNN-LIB boxes: {out['counterexamples_found']} of {out['n']}")
    _line(c, f"median adversarial radius (correct inputs): {num(out['median_adversarial_radius'])}")
    _line(c, "found by: " + (", ".join(f"{k} {v}" for k, v in sorted(out["found_by"].items())) or "none"))
    _line(c, (f"attacks run: {'; '.join(out['tried'])}; every point checked in {out['precision']}", "dim"))
    _line(c, _time_text(out.get("time_label"), out["time_s"]))


def print_property_attack(out: dict, console: Console | None = None) -> None:
    """The ``lipverify attack`` summary for specifications with general output properties."""
    c = console or Console()
    _line(c, ("lipverify attack", "bold"), f"  model {out['model']}  specifications {out['n']}  clip {out['clip']}")
    _notes(c, out["notes"])
    rows = out["inputs"]
    _table(c, [_Col("spec", "name", cells=[r["name"] for r in rows]),
               _Col("property", "text", cells=[r["property"] for r in rows]),
               _Col("counterexample", "text", cells=["found" if r["counterexample"] else "none found" for r in rows]),
               _Col("slack (float64)", "num", justify="right", cells=[num(r["slack"]) for r in rows])],
           "counterexample search per specification")
    _line(c, f"counterexamples found inside the VNN-LIB boxes: {out['counterexamples_found']} of {out['n']}")
    _line(c, _time_text(out.get("time_label"), out["time_s"]))


# ---------------------------------------------------------------------------------------------------- audit


def print_audit(res, console: Console | None = None, report_path=None) -> None:
    """The ``lipverify audit`` terminal summary: violations first, the one-line answer, certified against
    empirical robustness per eps, the verdict, notes, and where the report went."""
    c = console or Console()
    violations = list(getattr(res, "violations", None) or [])
    if violations:
        _line(c, (f"SOUNDNESS VIOLATION on {len(violations)} input(s): a certified input was broken by an "
                  "attack; do not trust these certificates", "bold red"))
    verdict = [str(v) for v in (getattr(res, "verdict", None) or [])]
    headline = getattr(res, "headline", None)
    if not headline and verdict:
        headline, verdict = verdict[0], verdict[1:]
    if headline:  # the answer is the first line
        _line(c, (str(headline), "bold"))
    _line(c, ("lipverify audit", "bold"), f"  model {res.model}  norm l{res.norm}  inputs {res.n}"
          + ("  (partial: interrupted)" if getattr(res, "partial", False) else ""))
    rows = _by_eps(getattr(res, "eps", None), getattr(res, "accuracy_at_eps", None) or {})
    if rows:
        def frac(d, key):
            v = d.get(key) if isinstance(d, dict) else None
            return None if v is None else float(v)

        cert = [frac(d, "certified") for _, d in rows]
        emp = [frac(d, "empirical") for _, d in rows]
        _table(c, [_Col("eps", "num", justify="right", cells=[_eps_text(e) for e, _ in rows]),
                   _Col("certified", "num", justify="right", cells=[pct(v) for v in cert]),
                   _Col("empirically robust", "num", justify="right", cells=[pct(v) for v in emp]),
                   _Col("gap", "num", justify="right",
                        cells=[pct(e - k) if e is not None and k is not None else "-" for k, e in zip(cert, emp)])],
               after="certified: correct and provably robust; empirically robust: correct and no attack "
                     "found an adversarial example; gap: empirically robust minus certified")
    _bullets(c, verdict)
    _notes(c, getattr(res, "notes", None) or [])
    label = getattr(res, "time_label", None) or f"time {_secs(res.time_s)} s"
    if report_path is not None:
        _line(c, f"report: {report_path} (also report.md, report.json)")
    _line(c, label)
