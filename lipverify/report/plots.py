"""PNG plots (matplotlib, Agg backend): certified accuracy against eps, radius histograms, bars."""

from __future__ import annotations

import io

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def certify_plot(radii: np.ndarray, correct: np.ndarray, norm: str, eps_marks=()) -> bytes:
    """Left: certified accuracy (correct and radius > eps) against eps.  Right: histogram of radii."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    r = np.where(correct, radii, 0.0)
    top = max(float(np.max(r)) if len(r) else 1.0, max(eps_marks, default=0.0), 1e-6) * 1.1
    grid = np.linspace(0, top, 200)
    a.plot(grid, [(r > e).mean() for e in grid], label="certified accuracy")
    for e in eps_marks:
        a.axvline(e, color="grey", ls=":", lw=1)
    a.set_xlabel(f"eps (l{norm})")
    a.set_ylabel("fraction of inputs")
    a.set_ylim(0, 1.02)
    a.set_title("certified accuracy vs eps")
    b.hist(radii[correct], bins=30, color="tab:blue", alpha=0.8, label="correct")
    b.set_xlabel(f"certified radius (l{norm})")
    b.set_title("certified radii (correctly classified inputs)")
    return png_bytes(fig)


def png_bytes(fig) -> bytes:
    """Render a figure to PNG bytes and close it."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def radius_scatter(r_cert, r_adv, correct, norm: str) -> bytes:
    """Certified radius against adversarial radius per input; the diagonal is the soundness limit."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    fin = np.isfinite(r_adv)
    ax.scatter(r_adv[fin & correct], r_cert[fin & correct], s=12, label="correct")
    ax.scatter(r_adv[fin & ~correct], r_cert[fin & ~correct], s=12, marker="x", label="misclassified")
    top = max(float(np.max(r_adv[fin])) if fin.any() else 1.0, 1e-6)
    ax.plot([0, top], [0, top], "k--", lw=1, label="r_cert = r_adv (no point may lie above)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"adversarial radius r_adv ({_norm(norm)}, found by attacks)")
    ax.set_ylabel(f"certified radius r_cert ({_norm(norm)}, sound)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper left")
    ax.set_title("per input: proven vs attacked radius")
    return png_bytes(fig)


def accuracy_curves(curves: dict, norm: str, eps_marks=()) -> bytes:
    """Clean, empirically robust and certified accuracy against eps; dotted lines at the requested eps."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.6))
    styles = (("clean", "clean accuracy", ":", "grey"),
              ("empirical", "empirically robust (attacks fail; estimate)", "-", "tab:orange"),
              ("certified", "certified, VRA (sound)", "-", "tab:blue"))
    for key, label, style, color in styles:
        if curves.get(key) is not None:  # no attack run: no empirical curve
            ax.plot(curves["eps"], curves[key], style, color=color, lw=2, label=label)
    if curves.get("certified") is not None and curves.get("empirical") is not None:
        ax.fill_between(curves["eps"], curves["certified"], curves["empirical"], color="tab:orange", alpha=0.12,
                        lw=0, label="gap: not proven, not broken")
    for k, e in enumerate(eps_marks):
        ax.axvline(e, color="k", ls=":", lw=0.8, alpha=0.5, label="eps in the report's tables" if k == 0 else None)
    ax.set_xlabel(f"eps: size of the input change ({_norm(norm)} norm)")
    ax.set_ylabel("fraction of inputs")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.set_title("accuracy as the allowed change eps grows")
    return png_bytes(fig)


def _norm(norm) -> str:
    return "l-inf" if str(norm) == "inf" else f"l{norm}"


def _label(s: str, width: int = 34) -> str:
    """A layer name made safe for a matplotlib label: one line, printable, no mathtext, at most ``width``."""
    s = "".join(c if c.isprintable() else " " for c in " ".join(str(s).split()))
    if len(s) > width:
        s = s[: width - 1] + "…"
    return s.replace("$", r"\$")


def layer_chart(labels, constants, running, dominant, norm: str = "2", n_bars: int = 20) -> bytes:
    """Left: log10 of the per-layer constants as horizontal bars (at most ``n_bars``, the largest in
    absolute log, in network order; dominant layers in orange).  Right: the running product (bound from
    the input to each layer) on a log scale."""
    plt = pyplot()
    idx = [k for k, c in enumerate(constants) if c is not None and c > 0 and np.isfinite(c)]
    keep = sorted(sorted(idx, key=lambda k: -abs(np.log10(constants[k])))[:n_bars])
    nb = max(len(keep), 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, max(3.2, 0.36 * nb + 1.6)),
                               gridspec_kw={"width_ratios": [1.25, 1]})
    vals = [np.log10(constants[k]) for k in keep]
    colors = ["tab:orange" if dominant[k] else "tab:blue" for k in keep]
    ys = np.arange(len(keep))[::-1]
    a.barh(ys, vals, color=colors, height=0.65)
    a.set_yticks(ys)
    a.set_yticklabels([_label(labels[k]) for k in keep], fontsize=9)
    a.axvline(0, color="k", lw=0.8)
    for y, v, k in zip(ys, vals, keep):
        a.text(v, y, f" x{constants[k]:.3g} ", va="center", ha="left" if v >= 0 else "right", fontsize=8)
    lo, hi = min(vals + [0.0]), max(vals + [0.0])
    pad = 0.25 * max(hi - lo, 0.1)
    a.set_xlim(lo - (pad if lo < 0 else 0), hi + pad)
    a.set_xlabel("log10 of the layer's constant (0 = no growth)")
    shown = "" if len(keep) == len(idx) else f" ({len(keep)} largest of {len(idx)})"
    a.set_title("per-layer constants" + shown + "; orange: dominate the bound", fontsize=10)
    a.grid(axis="x", alpha=0.3)
    run = np.array([v if v is not None else np.nan for v in running], dtype=float)
    x = np.arange(1, len(run) + 1)
    ok = np.isfinite(run) & (run > 0)
    if ok.any():
        b.plot(x[ok], run[ok], "-o", color="tab:blue", ms=4, lw=1.8)
        dm = ok & np.array(dominant, dtype=bool)
        b.plot(x[dm], run[dm], "o", color="tab:orange", ms=7, label="after a dominant layer")
        b.set_yscale("log")
        from matplotlib.ticker import FuncFormatter, LogLocator

        fmt = FuncFormatter(lambda v, _: f"{v:.3g}")
        b.yaxis.set_major_formatter(fmt)
        lo, hi = float(np.min(run[ok])), float(np.max(run[ok]))
        if hi / max(lo, 1e-300) < 100:  # under two decades: label the minor ticks too
            b.yaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
            b.yaxis.set_minor_formatter(fmt)
        if dm.any():
            b.legend(fontsize=8.5, loc="upper left")
    b.set_xlabel("layer number (as in the table)")
    b.set_ylabel("running product (bound so far)")
    b.set_title(f"bound from the input to each layer ({_norm(norm)})", fontsize=10)
    b.grid(alpha=0.3, which="both")
    if len(x) <= 30:
        b.set_xticks(x)
    return png_bytes(fig)
