"""Benchmark: CROWN on networks with smooth activations and MinMax, trained the normal way.

Small convolutional networks (conv 1->8 k4 s2, conv 8->16 k4 s2, dense 784->100, dense 100->10) with
tanh, GELU, SiLU or MinMax (GroupSort-2) after every hidden layer are trained with plain cross-entropy on
``mnist_train_5k`` (shuffled with a fixed seed, Adam 1e-3, ``--epochs``), exported to ONNX the standard
way (``torch.onnx.export(..., dynamo=False, opset_version=17)``) and loaded with ``lipverify.load``.  On the
first ``--n`` test images, side by side in one run:

* certified-and-correct counts of CROWN (:func:`lipverify.bounds.crown.margin_lower_bounds` over the
  l_inf ball intersected with [0, 1]) with lipverify's relaxations (tangent/secant where the activation
  is convex or concave on the interval, the mean-value lines with the slope range on the interval and
  the moved secant elsewhere);
* the same with the reference relaxation this benchmark defines for comparison: the two lines through
  an end point with the activation's *global* slope range (mean value theorem), the tighter at the
  midpoint (what lipverify used before; MinMax had no relaxation then);
* the inputs no attack broke (``attack --strength standard``: an upper bound of any sound count) and
  the certified inputs an attack broke (must be 0);
* seconds per input of one CROWN call.

    python benchmarks/bench_crown_smooth.py              # 50 inputs, eps 0.01 and 0.03
    python benchmarks/bench_crown_smooth.py --n 20 --acts gelu,minmax

Nothing is a timed test; the numbers go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lipverify  # noqa: E402
import lipverify.bounds.relaxations as relaxations  # noqa: E402
from bench_finetune_zoo import export_onnx, load_mnist, pretrain  # noqa: E402
from lipverify.bounds.crown import margin_lower_bounds  # noqa: E402
from lipverify.models import MinMax  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
ACTS = {"tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "minmax": MinMax}


def global_slope_lines(act, l, u):
    """The reference relaxation: lines through ``(l, phi(l))`` or ``(u, phi(u))`` with the extreme
    slopes of the activation's global slope range, the tighter at the midpoint."""
    s_lo, s_hi = float(act.lo), float(act.hi)
    with torch.no_grad():
        fl, fu = act.fn(l), act.fn(u)
    tol = 1e-12 + 1e-9 * torch.maximum(fl.abs(), fu.abs())
    c = (l + u) / 2
    first = fl - tol + s_lo * (c - l) >= fu - tol - s_hi * (u - c)
    aL = torch.where(first, torch.full_like(l, s_lo), torch.full_like(l, s_hi))
    bL = torch.where(first, fl - tol - s_lo * l, fu - tol - s_hi * u)
    first = fl + tol + s_hi * (c - l) <= fu + tol - s_lo * (u - c)
    aU = torch.where(first, torch.full_like(l, s_hi), torch.full_like(l, s_lo))
    bU = torch.where(first, fl + tol - s_hi * l, fu + tol - s_lo * u)
    return aL, bL, aU, bU


def build(act):
    A = ACTS[act]
    return nn.Sequential(nn.Conv2d(1, 8, 4, 2, 1), A(), nn.Conv2d(8, 16, 4, 2, 1), A(), nn.Flatten(),
                         nn.Linear(784, 100), A(), nn.Linear(100, 10))


def count(lm, x, y, pred, eps):
    t0 = time.perf_counter()
    low = margin_lower_bounds(lm.graph, x, pred, eps, "inf", domain=(0.0, 1.0))
    return (low > 0).all(1) & (pred == y), (time.perf_counter() - t0) / len(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--acts", default="tanh,gelu,silu,minmax")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--eps", default="0.01,0.03")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    x_tr, y_tr, x_te, y_te = load_mnist(SHARED)
    x = torch.from_numpy(x_te[:a.n]).double()
    y = torch.from_numpy(y_te[:a.n]).long()
    print(f"first {a.n} MNIST test images, l_inf balls within [0, 1], certified-and-correct counts; "
          f"{a.threads} thread(s)\n")
    print(f"{'activation':10} {'acc':>5} {'eps':>5} | {'lipverify':>9} {'global-slope lines':>18} {'PGD':>4} "
          f"{'broken':>6} | {'s/input':>7}")
    smooth = relaxations._smooth_relaxation
    for act in a.acts.split(","):
        torch.manual_seed(0)
        net = build(act)
        acc, _, _ = pretrain(net, x_tr, y_tr, x_te[:500], y_te[:500], 1.0, a.epochs)
        net.eval()
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"{act}.onnx"
            export_onnx(net, torch.from_numpy(x_te[:1]), path)
            lm = lipverify.load(str(path))
        pred = lm(x).argmax(1)
        for eps in (float(e) for e in a.eps.split(",")):
            cert, dt = count(lm, x, y, pred, eps)
            if act == "minmax":
                ref = "no relaxation"
            else:
                relaxations._smooth_relaxation = global_slope_lines
                try:
                    ref = str(int(count(lm, x, y, pred, eps)[0].sum()))
                finally:
                    relaxations._smooth_relaxation = smooth
            rob = lm.attack(x.float(), y, eps=[eps], norm="inf", strength="standard")
            broken = int((cert & (rob.radius <= eps)).sum())
            n_pgd = int(round(rob.robust_accuracy[eps] * a.n))
            print(f"{act:10} {acc:5.1%} {eps:5.3g} | {int(cert.sum()):>9} {ref:>18} {n_pgd:>4} {broken:>6} | "
                  f"{dt:7.3f}", flush=True)


if __name__ == "__main__":
    main()
