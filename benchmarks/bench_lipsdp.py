"""Benchmark: lipverify's fast LipSDP path against a naive cvxpy + SCS formulation, side by side.

Fast path (``lipverify.bounds.lipsdp.lipsdp``): weights normalised by their spectral norms, input /
output blocks reduced exactly, SCS called directly at ``tol=1e-6`` (chordal cones for deep nets),
multipliers polished on the exact Schur-complement rho and verified a posteriori in float64.

Naive path (written here, independently): the textbook cvxpy model of the LipSDP-Neuron / -Layer LMI
on the raw weights, solved by SCS at ``eps_abs = eps_rel = 1e-8``, reporting ``sqrt(rho)`` of the
solver (no verification, no scaling, no reduction).

Networks: the LipSDP authors' ``random_weights.mat`` (neuron and layer forms) and
``mnist_weights.mat`` (784-50-10) when the data folder is available, and random ReLU MLPs with 100
(10-50-50-10) and 300 (10-100-100-100-10) hidden neurons.

Usage::

    python benchmarks/bench_lipsdp.py [--data DIR] [--threads N] [--naive-time-limit S] [--skip-naive-large]

``--data`` defaults to ``$LIPVERIFY_REALDATA`` or ``../shared/data`` next to the repository.
``--threads`` sets the BLAS thread count for both paths (before numpy is imported).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="third-party data folder (holds lipsdp/*.mat)")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads for both paths")
    p.add_argument("--naive-time-limit", type=float, default=300.0, help="SCS time limit (s) of the naive path")
    p.add_argument("--skip-naive-large", action="store_true", help="skip the naive solve of mnist / 300 units")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

from lipverify.bounds.lipsdp import lipsdp, product_bound  # noqa: E402


def naive_lipsdp(weights, form="neuron", eps=1e-8, time_limit=300.0):
    """Textbook LipSDP for ReLU (slopes [0, 1]) in cvxpy, solved by SCS; returns (value, seconds, status)."""
    import cvxpy as cp

    L = len(weights) - 1
    sizes = [weights[0].shape[1]] + [w.shape[1] for w in weights[1:]]
    rho = cp.Variable(nonneg=True)
    if form == "neuron":
        ts = [cp.Variable(n, nonneg=True) for n in sizes[1:]]
        T = [cp.diag(t) for t in ts]
    else:
        lam = cp.Variable(L, nonneg=True)
        T = [lam[k] * np.eye(n) for k, n in enumerate(sizes[1:])]
    blocks = [[np.zeros((sizes[i], sizes[j])) for j in range(L + 1)] for i in range(L + 1)]
    blocks[0][0] = -rho * np.eye(sizes[0])
    for k in range(1, L + 1):
        W = weights[k - 1]
        blocks[k - 1][k] = W.T @ T[k - 1]
        blocks[k][k - 1] = T[k - 1] @ W
        blocks[k][k] = -2 * T[k - 1]
    blocks[L][L] = blocks[L][L] + weights[L].T @ weights[L]
    M = cp.bmat(blocks)
    prob = cp.Problem(cp.Minimize(rho), [(M + M.T) / 2 << 0])
    t0 = time.perf_counter()
    try:
        prob.solve(solver="SCS", eps_abs=eps, eps_rel=eps, max_iters=200000, time_limit_secs=time_limit)
    except cp.error.SolverError as exc:  # pragma: no cover - reported in the table
        return float("nan"), time.perf_counter() - t0, f"error: {exc}"
    dt = time.perf_counter() - t0
    val = float(np.sqrt(max(rho.value, 0.0))) if rho.value is not None else float("nan")
    return val, dt, str(prob.status)


def pattern_lower_bound(weights, restarts=4, seed=0):
    """Local search over ReLU slope patterns D in {0,1}^N for max ||W_L D_L ... D_1 W_0||_2.

    Every valid LipSDP value is >= this number (LipSDP certifies all slope-restricted activations,
    linear ones included), so a solver value below it is not a LipSDP certificate.
    """
    rng = np.random.default_rng(seed)
    widths = [w.shape[1] for w in weights[1:]]
    N = sum(widths)
    cuts = np.cumsum(widths)[:-1]

    def norm(d):
        J = weights[0]
        for w, dk in zip(weights[1:], np.split(d, cuts)):
            J = w @ (dk[:, None] * J)
        return float(np.linalg.norm(J, 2))

    best = 0.0
    for _ in range(restarts):
        d = rng.integers(0, 2, N).astype(float)
        f = norm(d)
        improved = True
        while improved:
            improved = False
            for i in rng.permutation(N):
                d[i] = 1.0 - d[i]
                g = norm(d)
                if g > f:
                    f, improved = g, True
                else:
                    d[i] = 1.0 - d[i]
        best = max(best, f)
    return best


def random_mlp(widths, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((widths[i + 1], widths[i])) / np.sqrt(widths[i]) for i in range(len(widths) - 1)]


def _data_dir(arg):
    if arg:
        return Path(arg)
    env = os.environ.get("LIPVERIFY_REALDATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def main():
    args = ARGS or _parse()
    cases = []
    data = _data_dir(args.data)
    try:
        import scipy.io as sio

        rw = data / "lipsdp" / "random_weights.mat"
        mn = data / "lipsdp" / "mnist_weights.mat"
        if rw.exists():
            w = [np.asarray(x, dtype=np.float64) for x in sio.loadmat(rw)["weights"].ravel()]
            cases.append(("random_weights (pub. 36.482)", w, "neuron", False))
            cases.append(("random_weights (pub. 39.839)", w, "layer", False))
        if mn.exists():
            w = [np.asarray(x, dtype=np.float64) for x in sio.loadmat(mn)["weights"].ravel()]
            cases.append(("mnist_weights 784-50-10", w, "neuron", True))
        if not cases:
            print(f"# note: no LipSDP .mat files under {data}; running the random networks only", file=sys.stderr)
    except ImportError:  # pragma: no cover
        pass
    cases.append(("relu mlp 10-50-50-10", random_mlp([10, 50, 50, 10], 0), "neuron", False))
    cases.append(("relu mlp 10-100x3-10", random_mlp([10, 100, 100, 100, 10], 0), "neuron", True))

    head = (
        f"{'network':30s} {'form':6s} {'hidden':>6s} | {'fast value':>12s} {'fast s':>7s} {'sound':>5s} | "
        f"{'naive value':>12s} {'naive s':>8s} {'naive status':>18s} | "
        f"{'speed-up':>8s} {'rel diff':>9s} | {'pattern LB':>10s} {'product':>9s}"
    )
    print(head)
    print("-" * len(head))
    for name, w, form, large in cases:
        hidden = sum(x.shape[1] for x in w[1:])
        fast = lipsdp(w, form=form)
        if large and args.skip_naive_large:
            nv, nt, ns = float("nan"), float("nan"), "skipped"
        else:
            nv, nt, ns = naive_lipsdp(w, form=form, time_limit=args.naive_time_limit)
        ratio = nt / fast.solve_time if np.isfinite(nt) else float("nan")
        rel = (fast.value - nv) / nv if np.isfinite(nv) and nv > 0 else float("nan")
        print(
            f"{name:30s} {form:6s} {hidden:6d} | {fast.value:12.6f} {fast.solve_time:7.2f} {str(fast.sound):>5s} | "
            f"{nv:12.6f} {nt:8.2f} {ns[:18]:>18s} | {ratio:7.1f}x {rel:+9.1e} | "
            f"{pattern_lower_bound(w):10.4f} {product_bound(w):9.3f}",
            flush=True,
        )
    print(
        "\nrel diff = (fast - naive) / naive.  The fast value is verified and includes a 1e-6 safety factor;\n"
        "the naive value is the solver's unverified sqrt(rho) at eps 1e-8 (it may sit below the true SDP\n"
        "optimum by the solver's residual, or far below it when SCS stops at its time limit).\n"
        "pattern LB: a slope pattern found by local search; every valid LipSDP value is >= it."
    )


if __name__ == "__main__":
    main()
