"""PNG plots (matplotlib, Agg backend): certified accuracy against eps, radius histograms, bars."""

from __future__ import annotations

import io

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def certify_plot(radii: np.ndarray, correct: np.ndarray, norm: str, eps_marks=()) -> bytes:
    """Left: certified accuracy (correct and radius > eps) against eps.  Right: histogram of radii."""
    plt = _plt()
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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
