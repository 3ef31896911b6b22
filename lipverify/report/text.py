"""Human-readable terminal output (rich) for the CLI."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lipverify.results import BoundsReport


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.4e}"
    return f"{v:.5g}"


def _sound(s: bool) -> str:
    return "[green]yes[/green]" if s else "[yellow]no (estimate)[/yellow]"


#: layer rows printed by ``bounds`` (the first ones and the last 20 of a longer graph; ``--json`` has all)
MAX_LAYER_ROWS = 200


def print_bounds(report: BoundsReport, console: Console | None = None) -> None:
    c = console or Console()
    c.print(f"[bold]lipverify bounds[/bold]  model {report.model}  norm l{report.norm}  "
            f"input {tuple(report.input_shape)}  classes {report.n_classes}")
    if report.fidelity is not None:
        c.print(report.fidelity.line())
    for n in report.notes:
        c.print(f"[dim]note: {escape(str(n))}[/dim]")
    t = Table(show_lines=False)
    for col in ("layer", "op", "in", "out", "constant", "method", "sound"):
        t.add_column(col, overflow="fold")
    layers = list(report.layers)
    head, tail = (layers, []) if len(layers) <= MAX_LAYER_ROWS else (layers[:MAX_LAYER_ROWS - 20], layers[-20:])
    for k, r in enumerate(head + tail):
        if tail and k == len(head):
            t.add_row(f"... {len(layers) - len(head) - len(tail)} more layers (every one in --json)", "", "", "", "",
                      "", "")
        t.add_row(r.name, r.op, "x".join(map(str, r.in_shape)), "x".join(map(str, r.out_shape)),
                  _fmt(r.lipschitz), r.method, _sound(r.sound) if r.lipschitz is not None else "")
    c.print(t)
    g = report.global_bound
    c.print(f"[bold]global Lipschitz bound[/bold] (l{report.norm}): {_fmt(g.value)}   "
            f"method: {g.method}   sound: {_sound(g.sound)}")
    m = report.margin
    c.print(f"[bold]margin constants K_ij[/bold]: max {_fmt(m.max)}  min {_fmt(m.min)}   "
            f"method: {m.method}   sound: {_sound(m.sound)}")
    if report.n_classes <= 20:
        kt = Table(title="K_ij (Lipschitz constant of f_i - f_j)", show_header=True)
        kt.add_column("")
        for j in range(report.n_classes):
            kt.add_column(str(j))
        for i, row in enumerate(m.K):
            kt.add_row(str(i), *[_fmt(v) if i != j else "-" for j, v in enumerate(row)])
        c.print(kt)
    c.print(f"time {report.time_s:.2f} s")


def print_certify(res, model_name: str, console: Console | None = None) -> None:
    c = console or Console()
    c.print(f"[bold]lipverify certify[/bold]  model {model_name}  norm l{res.norm}  method {res.method}  "
            f"inputs {res.n}")
    for n in res.notes:
        c.print(f"[dim]note: {escape(str(n))}[/dim]")
    c.print(f"clean accuracy: {res.clean_accuracy:.4f}")
    t = Table(title="verified-robust accuracy (correct and soundly certified)")
    t.add_column("eps")
    t.add_column("VRA")
    if res.vra_with_estimates:
        t.add_column("incl. estimates")
    for k, v in res.vra.items():
        row = [k if isinstance(k, str) else f"{k:.6g}", f"{v:.4f}"]
        if res.vra_with_estimates:
            row.append(f"{res.vra_with_estimates.get(k, v):.4f}")
        t.add_row(*row)
    c.print(t)
    c.print(f"median certified radius (correct inputs): {res.median_radius:.6g}")
    by = ", ".join(f"{k}: {v}" for k, v in res.counts.items()) or "none"
    c.print(f"certified by: {by}")
    c.print(f"time {res.time_s:.2f} s")


def print_attack(out: dict, exact_box: bool = False, console: Console | None = None) -> None:
    """The ``lipverify attack`` summary from its JSON object."""
    c = console or Console()
    c.print(f"[bold]lipverify attack[/bold]  model {out['model']}  norm l{out['norm']}  inputs {out['n']}  "
            f"clip {out['clip']}  strength {out['strength']}")
    for n in out["notes"]:
        c.print(f"[dim]note: {escape(str(n))}[/dim]")
    c.print(f"clean accuracy: {out['clean_accuracy']:.4f}")
    for e, v in out["robust_accuracy"].items():
        c.print(f"robust accuracy under attack at eps={e}: {v:.4f}")
    if exact_box:
        c.print(f"counterexamples found inside the VNN-LIB boxes: {out['counterexamples_found']} of {out['n']}")
    c.print(f"median adversarial radius (correct inputs): {out['median_adversarial_radius']:.6g}")
    c.print("found by: " + ", ".join(f"{k} {v}" for k, v in sorted(out["found_by"].items())))
    c.print(f"[dim]attacks run: {'; '.join(out['tried'])}; every point checked in {out['precision']}[/dim]")
    c.print(f"time {out['time_s']:.1f} s")


def print_property_attack(out: dict, console: Console | None = None) -> None:
    """The ``lipverify attack`` summary for specifications with general output properties."""
    c = console or Console()
    c.print(f"[bold]lipverify attack[/bold]  model {out['model']}  specifications {out['n']}  clip {out['clip']}")
    for n in out["notes"]:
        c.print(f"[dim]note: {escape(str(n))}[/dim]")
    t = Table(title="counterexample search per specification")
    for col in ("spec", "property", "counterexample", "slack (float64)"):
        t.add_column(col)
    for row in out["inputs"]:
        t.add_row(escape(row["name"]), escape(row["property"]), "found" if row["counterexample"] else "none found",
                  f"{row['slack']:.6g}")
    c.print(t)
    c.print(f"counterexamples found inside the VNN-LIB boxes: {out['counterexamples_found']} of {out['n']}")
    c.print(f"time {out['time_s']:.1f} s")
