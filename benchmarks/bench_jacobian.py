"""Benchmark: local Lipschitz constants of the margins, interval vs linear relaxation of the Clarke
Jacobian (Shi et al., NeurIPS 2022), on ``kw_mnist`` and ``Convnet_maxpool``.

For each (model, norm, eps) on the first ``--n`` MNIST test images, side by side in one run, the median
over the ``9 n`` margins ``f_pred - f_j`` of the sound local constants
(:meth:`lipverify.LipModel.local_constants`) with ``jacobian=`` ``interval``, ``linear`` and
``linear-refined``, their seconds per input (one thread), and a lower bound of the true value: the
largest dual norm of the margin's gradient at 400 points of the ball intersected with [0, 1] (vertices
or sphere points, uniform points and PGD iterates on the margin).  Every bound must be at least the
sampled value; the ratio bound / sampled says how much room is left.

The request for this method measured auto_LiRPA's Jacobian bound (Shi et al.) on ``kw_mnist`` as
33-63x tighter than lipverify's interval constants at l_inf and 2.2-2.7x at l2 (medians), about 10 s
per input.  auto_LiRPA's last registry release (0.3, which ``bench_crown_peers.py`` runs side by side)
has no Jacobian bounds, so those ratios are printed as the reference, not re-measured.

    python benchmarks/bench_jacobian.py                    # both models, both norms, 10 inputs
    python benchmarks/bench_jacobian.py --n 3 --rows 0     # a quick look
    python benchmarks/bench_jacobian.py --certify --rows 0 # also certify --method local both ways

``--certify``: certified-and-correct counts and seconds per input of ``certify --method local`` at the
row's eps with ``--local-jacobian interval`` and ``linear``, side by side.

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

#: (model, norm, eps, reference ratio interval / auto_LiRPA's Jacobian bound, from the request)
ROWS = [
    ("kw_mnist", "inf", 0.02, "33-63x"),
    ("kw_mnist", "2", 0.3, "2.2-2.7x"),
    ("Convnet_maxpool", "inf", 0.02, "-"),
    ("Convnet_maxpool", "2", 0.3, "-"),
]


def load(name):
    if name == "kw_mnist":
        return lipverify.load(str(SHARED / "models" / "pytorch" / "kw_mnist.pth"),
                              arch=f"{ROOT / 'examples' / 'architectures.py'}:kw_mnist", input_shape=(1, 28, 28))
    return lipverify.load(str(SHARED / "models" / "onnx" / f"{name}.onnx"))


def sampled(lm, x, pred, eps, norm, n_pts=400, seed=0):
    """``(B, m)`` largest dual norms of the margin gradients found at points of the balls."""
    net = lm.module_double()
    gen = torch.Generator().manual_seed(seed)
    B, m = x.shape[0], lm.n_classes
    best = torch.zeros(B, m, dtype=torch.float64)
    for b in range(B):
        d = torch.randn((n_pts,) + tuple(x.shape[1:]), generator=gen, dtype=torch.float64)
        if norm == "inf":
            half = torch.arange(n_pts).reshape(-1, *([1] * (x.dim() - 1))) < n_pts // 2
            d = torch.where(half, torch.sign(d) * eps,
                            (torch.rand(d.shape, generator=gen, dtype=torch.float64) * 2 - 1) * eps)
        else:
            d = d / d.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.dim() - 1))) * eps
        pts = (x[b] + d).clamp(0, 1)
        for j in range(m):
            if j == int(pred[b]):
                continue
            z = torch.cat([pts, x[b:b + 1]]).requires_grad_(True)
            for it in range(11):
                out = net(z)
                (gr,) = torch.autograd.grad((out[:, pred[b]] - out[:, j]).sum(), z)
                gn = gr.flatten(1).norm(dim=1) if norm == "2" else gr.flatten(1).abs().sum(1)
                best[b, j] = max(float(best[b, j]), float(gn.max()))
                if it == 10:
                    break
                with torch.no_grad():  # PGD on the margin (its other regions) from the first 32 points
                    z = z[:32]
                    gz = gr[:32]
                    step = gz.sign() if norm == "inf" else gz / (gz.flatten(1).norm(dim=1).reshape(
                        -1, *([1] * (x.dim() - 1))) + 1e-12)
                    delta = z - step * eps / 4 - x[b]
                    if norm == "inf":
                        delta = delta.clamp(-eps, eps)
                    else:
                        nrm = delta.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.dim() - 1)))
                        delta = delta * torch.clamp(eps / (nrm + 1e-300), max=1.0)
                    z = (x[b] + delta).clamp(0, 1)
                z.requires_grad_(True)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--rows", default=",".join(str(i) for i in range(len(ROWS))))
    ap.add_argument("--modes", default="interval,linear,linear-refined")
    ap.add_argument("--certify", action="store_true")
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"needs the shared data next to the repository ({SHARED})")
    torch.set_num_threads(1)
    d = np.load(SHARED / "data" / "mnist_test_1000.npz")
    modes = args.modes.split(",")
    head = ["model", "norm", "eps", "sampled"] + [f"{m} (s/in)" for m in modes] + ["interval/best", "ref. LiRPA"]
    print(" | ".join(head))
    for r in (int(v) for v in args.rows.split(",")):
        name, norm, eps, ref = ROWS[r]
        lm = load(name)
        x = torch.from_numpy(d["x"][:args.n]).double()
        x = (x / 255 if x.max() > 1.5 else x).reshape(args.n, *lm.input_shape)
        with torch.no_grad():
            pred = lm(x).argmax(1)
        mask = torch.arange(lm.n_classes)[None] != pred[:, None]
        low = sampled(lm, x, pred, eps, norm)
        cells, meds = [], {}
        for mode in modes:
            t0 = time.perf_counter()
            res = lm.local_constants(x, eps, norm, jacobian=mode, rows=pred)
            dt = (time.perf_counter() - t0) / args.n
            K = res.K[torch.arange(args.n)[:, None], pred[:, None], torch.arange(lm.n_classes)[None]]
            assert bool((K[mask] >= low[mask] * (1 - 1e-9)).all()), f"{name} {mode}: a bound below a gradient"
            meds[mode] = float(K[mask].median())
            cells.append(f"{meds[mode]:.4g} ({dt:.3g})")
        best = min(meds.values())
        row = [name, norm, f"{eps:g}", f"{float(low[mask].median()):.4g}"] + cells + \
            [f"{meds.get('interval', float('nan')) / best:.3g}x", ref]
        print(" | ".join(row), flush=True)
        if args.certify:
            y = torch.from_numpy(d["y"][:args.n]).long()
            cells = []
            for jac in ("interval", "linear"):
                t0 = time.perf_counter()
                c = lm.certify(x.float(), y, eps=[eps], norm=norm, method="local",
                               local_options=None if jac == "interval" else {"jacobian": jac})
                dt = (time.perf_counter() - t0) / args.n
                cells.append(f"{jac}: {int(round(c.vra[eps] * args.n))}/{args.n} certified ({dt:.3g} s/input)")
            print("  certify --method local: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
