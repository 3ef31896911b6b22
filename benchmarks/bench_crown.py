"""Benchmark: certificates by linear bound propagation (CROWN) against lipverify's other methods and
the published auto_LiRPA numbers, on the public models.

For each row (model, norm, eps) on the first ``--n`` test images (default 50), side by side in one run:
certified-and-correct counts of ``certify --method global`` and ``--method local`` (the decision at
eps), of CROWN with interval intermediate bounds (CROWN-IBP) and of CROWN (the margins' lower bounds
over the ball intersected with [0, 1], :func:`lipverify.bounds.crown.margin_lower_bounds`, one call at
eps), the PGD upper bound (inputs no attack broke, ``attack --strength fast``), and the seconds per
input of the local and CROWN decisions (one thread).  The auto_LiRPA columns are the counts and
seconds per input measured with auto_LiRPA on the same networks and inputs (same CPU, one thread) and
filed with the request for this method (auto_LiRPA from its repository, with the torch it pins),
printed as reference values; ``bench_crown_peers.py`` runs auto_LiRPA side by side.

    python benchmarks/bench_crown.py                 # every row, 50 inputs
    python benchmarks/bench_crown.py --n 10 --rows 0,1   # a quick look
    python benchmarks/bench_crown.py --rows 0,1,2 --alpha  # with alpha-CROWN (optimised slopes)
    python benchmarks/bench_crown.py --rows 0 --alpha --alpha-budget 5  # and within a time budget

Nothing is a timed test; the numbers go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

import lipverify  # noqa: E402
from lipverify.bounds.crown import margin_lower_bounds  # noqa: E402
from lipverify.report.numbers import eps as fmt_eps  # noqa: E402

ONNX = SHARED / "models" / "onnx"
MNIST, CIFAR = SHARED / "data" / "mnist_test_1000.npz", SHARED / "data" / "cifar10_test_100.npz"
KW = {"mean": "0.485,0.456,0.406", "std": "0.225"}
R2B = {"mean": "0.4914,0.4822,0.4465", "std": "0.2471,0.2435,0.2616"}
#: (model, data, normalisation, norm, eps, auto_LiRPA IBP, CROWN, alpha-CROWN, s/input of CROWN)
ROWS = [
    ("mnist-net_256x2", MNIST, {}, "inf", 0.02, 0, 32, 35, 0.011),
    ("mnist-net_256x2", MNIST, {}, "2", 0.3, 0, 22, 24, 0.010),
    ("Convnet_maxpool", MNIST, {}, "inf", 0.02, 18, 26, 28, 0.018),
    ("cifar_base_kw", CIFAR, KW, "inf", 1 / 255, 0, 33, None, 0.136),
    ("cifar_base_kw", CIFAR, KW, "inf", 2 / 255, 0, 28, None, 1.43),
    ("cifar_base_kw", CIFAR, KW, "2", 36 / 255, 0, 2, None, 0.174),
    ("resnet_2b", CIFAR, R2B, "inf", 1 / 255, 0, 33, None, 3.87),
    ("resnet_2b", CIFAR, R2B, "inf", 2 / 255, 0, 12, None, 3.74),
]


def load(name, data, norm_kw, n):
    lm = lipverify.load(str(ONNX / f"{name}.onnx"), **norm_kw)
    d = np.load(data)
    x = torch.from_numpy(d["x"][:n]).float()
    if x.max() > 1.5:
        x = x / 255
    x = x.reshape(n, *lm.input_shape)
    return lm, x, torch.from_numpy(d["y"][:n]).long()


def crown_count(lm, x, y, eps, norm, intermediate, alpha_steps=0, alpha_budget=None):
    with torch.no_grad():
        pred = lm(x).argmax(1)
    t0 = time.perf_counter()
    low = margin_lower_bounds(lm.graph, x.double(), pred, eps, norm, domain=(0.0, 1.0), intermediate=intermediate,
                              alpha_steps=alpha_steps,
                              alpha_deadline=None if alpha_budget is None else time.perf_counter() + alpha_budget)
    dt = (time.perf_counter() - t0) / len(x)
    return int(((low > 0).all(1) & (pred == y)).sum()), dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--rows", default=None, help="comma-separated row numbers (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--alpha", action="store_true", help="also alpha-CROWN (20 Adam steps per bound; slow)")
    ap.add_argument("--alpha-budget", type=float, default=None,
                    help="with --alpha: also alpha-CROWN within this many seconds per row")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = ROWS if a.rows is None else [ROWS[int(k)] for k in a.rows.split(",")]
    head = (f"{'model':16} {'norm, eps':14} {'glob':>4} {'local':>5} {'c-ibp':>5} {'crown':>5} {'PGD':>4} | "
            f"{'LiRPA ibp':>9} {'crown':>5} {'a-crown':>7} | {'s/in local':>10} {'crown':>7} {'LiRPA':>7} {'ratio':>6}")
    print(f"first {a.n} test images, certified-and-correct counts; {a.threads} thread(s)\n")
    print(head)
    for name, data, kw, norm, eps, l_ibp, l_crown, l_alpha, l_s in rows:
        lm, x, y = load(name, data, kw, a.n)
        cg = lm.certify(x, y, eps=[eps], norm=norm, method="global")
        t0 = time.perf_counter()
        cl = lm.certify(x, y, eps=[eps], norm=norm, method="local")
        t_local = (time.perf_counter() - t0) / a.n
        n_ibp, _ = crown_count(lm, x, y, eps, norm, "ibp")
        n_crown, t_crown = crown_count(lm, x, y, eps, norm, "crown")
        alpha = ""
        if a.alpha:
            n_alpha, t_alpha = crown_count(lm, x, y, eps, norm, "crown", alpha_steps=20)
            alpha = f"  alpha-CROWN {n_alpha} ({t_alpha:.3f} s/input)"
            if a.alpha_budget is not None:
                n_b, t_b = crown_count(lm, x, y, eps, norm, "crown", alpha_steps=20, alpha_budget=a.alpha_budget)
                alpha += f"  within {a.alpha_budget:g} s: {n_b} ({t_b:.3f} s/input)"
        rob = lm.attack(x, y, eps=[eps], norm=norm, strength="fast")
        n_pgd = int(round(rob.robust_accuracy[eps] * a.n))
        eps_s = f"{'l_inf' if norm == 'inf' else 'l2'} {fmt_eps(eps)}"
        print(f"{name:16} {eps_s:14} {round(cg.vra[eps] * a.n):>4} {round(cl.vra[eps] * a.n):>5} {n_ibp:>5} "
              f"{n_crown:>5} {n_pgd:>4} | {l_ibp:>9} {l_crown:>5} {'-' if l_alpha is None else l_alpha:>7} | "
              f"{t_local:>10.3f} {t_crown:>7.3f} {l_s:>7.3f} {t_crown / l_s:>5.2f}x{alpha}", flush=True)


if __name__ == "__main__":
    main()
