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
    fig, ax = plt.subplots(figsize=(5, 5))
    fin = np.isfinite(r_adv)
    ax.scatter(r_adv[fin & correct], r_cert[fin & correct], s=12, label="correct")
    ax.scatter(r_adv[fin & ~correct], r_cert[fin & ~correct], s=12, marker="x", label="misclassified")
    top = max(float(np.max(r_adv[fin])) if fin.any() else 1.0, 1e-6)
    ax.plot([0, top], [0, top], "k--", lw=1, label="r_cert = r_adv")
    ax.set_xlabel(f"adversarial radius (l{norm}, attack)")
    ax.set_ylabel(f"certified radius (l{norm}, sound)")
    ax.legend()
    ax.set_title("certified vs adversarial radius")
    return png_bytes(fig)


def accuracy_curves(curves: dict, norm: str) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("clean", ":"), ("empirical", "-"), ("certified", "-")):
        ax.plot(curves["eps"], curves[key], style, label=key)
    ax.set_xlabel(f"eps (l{norm})")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title("clean, empirically robust and certified accuracy")
    return png_bytes(fig)


def layer_bars(names, values) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(names) + 2), 3.5))
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("Lipschitz constant")
    ax.set_title("per-layer constants (sound)")
    return png_bytes(fig)
