"""Benchmark: CROWN certificates on the torchvision families, at random initialisation and trained the
normal way, checked against attacks.

For each family (``--families``): build it with 10 classes and a 1-channel stem (as
``bench_finetune_zoo.py`` does), optionally pre-train it with plain cross-entropy on ``mnist_train_5k``
(shuffled with a fixed seed; downsampled to ``--size`` pixels by average pooling), export it to ONNX the
standard way (``torch.onnx.export(..., dynamo=False, opset_version=17)``, dynamic batch), load it with
``lipverify.load`` and, on the first ``--n`` test images it classifies correctly:

* CROWN's lower bounds of every margin ``f_pred - f_j`` over the l_inf (or l2) ball of radius ``--eps``
  intersected with [0, 1] (:func:`lipverify.bounds.crown.margin_lower_bounds`, one call), and the seconds
  per input;
* the smallest margin a targeted PGD finds for every ``j`` inside the same set (``--pgd-steps`` sign or
  normalised gradient steps on the float32 model from the centre and from ``--restarts`` random starts,
  each target's best point judged in float64): no lower bound may
  exceed it (``unsound bounds`` counts those that do, with the float64 model);
* ``lipverify attack --strength STRENGTH`` (``--strength``, default standard) on the same inputs: an input certified at eps must have no
  adversarial point within eps (``broken`` counts those that do; ``r_cert <= r_adv`` at eps);
* with ``--radii``, the certified radius of ``certify --method crown`` (bisection) against the attack's
  radius, input by input.

A family lipverify cannot bound by linear relaxation (squeeze-excitation products, layer normalisation,
attention) prints the refusal's line.  Nothing is a timed test; the numbers go in docs/benchmarks.md.

    python benchmarks/bench_crown_zoo.py --families resnet18,shufflenet_v2_x0_5 --n 3
    python benchmarks/bench_crown_zoo.py --families shufflenet_v2_x0_5 --radii --n 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lipverify  # noqa: E402
from bench_finetune_zoo import accuracy, build, export_onnx, load_mnist, pretrain  # noqa: E402
from lipverify.bounds.crown import margin_lower_bounds, refined_units  # noqa: E402
from lipverify.errors import LipverifyError  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
FAMILIES = ["resnet18", "shufflenet_v2_x0_5", "mobilenet_v2", "mnasnet0_5", "regnet_x_400mf", "squeezenet1_1",
            "googlenet", "densenet121", "vgg11_bn", "efficientnet_b0", "mobilenet_v3_small", "convnext_tiny"]


def pgd_margins(net, net64, x, pred, eps, norm, steps, restarts, seed=0):
    """``(B, m)`` smallest margins ``f_pred - f_j`` found by targeted PGD in the ball intersected with
    [0, 1]: steps on the float32 ``net``, each target's best point judged by the float64 ``net64``
    (``+inf`` at ``j = pred``)."""
    gen = torch.Generator().manual_seed(seed)
    B = x.shape[0]
    x32 = x.float()
    with torch.no_grad():
        m = net(x32).shape[1]
    best = torch.full((B, m), float("inf"), dtype=torch.float64)
    ar = torch.arange(B)
    shape = (-1,) + (1,) * (x.dim() - 1)

    def project(z):
        d = z - x32
        if norm == "inf":
            d = d.clamp(-eps, eps)
        else:
            d = d * torch.clamp(eps / d.flatten(1).norm(dim=1).clamp_min(1e-30), max=1.0).reshape(shape)
        return (x32 + d).clamp(0.0, 1.0)

    for j in range(m):
        for r in range(restarts + 1):
            z = x32.clone() if r == 0 else project(x32 + eps * (2 * torch.rand(x.shape, generator=gen) - 1))
            keep, keep_m = z.clone(), torch.full((B,), float("inf"))
            for _ in range(steps):
                z.requires_grad_(True)
                out = net(z)
                marg = out[ar, pred] - out[:, j]
                (g,) = torch.autograd.grad(marg.sum(), z)
                with torch.no_grad():
                    better = marg < keep_m
                    keep[better], keep_m[better] = z[better], marg[better]
                    if norm == "inf":
                        z = project(z - 2.5 * eps / steps * g.sign())
                    else:
                        z = project(z - 2.5 * eps / steps * g / g.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(shape))
            with torch.no_grad():
                for pt in (keep, z):
                    out = net64(pt.double())
                    best[:, j] = torch.minimum(best[:, j], out[ar, pred] - out[:, j])
    best[ar, pred] = float("inf")
    return best


def run(family, trained, a, data):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(0)
    net = build(family)
    acc, epochs = float("nan"), 0
    if trained:
        acc, epochs, _ = pretrain(net, x_tr, y_tr, x_te[:500], y_te[:500], a.pretrain_acc, a.epochs)
    net.eval()
    if not trained:
        acc = accuracy(net, x_te[:500], y_te[:500])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{family}.onnx"
        export_onnx(net, torch.from_numpy(x_te[:1]), path)
        try:
            lm = lipverify.load(str(path))
            units = refined_units(lm.graph)
            # the first n test images the model classifies correctly (the first n when too few are)
            xa, ya = torch.from_numpy(x_te).double(), torch.from_numpy(y_te)
            ok = (lm(xa).argmax(1) == ya).nonzero().flatten()
            idx = ok[:a.n] if len(ok) >= a.n else torch.arange(a.n)
            x, y = xa[idx], ya[idx]
            pred = lm(x).argmax(1)
            t0 = time.perf_counter()
            low = margin_lower_bounds(lm.graph, x, pred, a.eps, a.norm, domain=(0.0, 1.0))
            t_crown = (time.perf_counter() - t0) / a.n
        except LipverifyError as exc:
            return f"refused: {str(exc).splitlines()[0][:90]}"
        net64 = lm.module_double()
        pgd = pgd_margins(net, net64, x, pred, a.eps, a.norm, a.pgd_steps, a.restarts)
        unsound = int((low > pgd + 1e-9 * (1 + pgd.abs())).sum())
        cert = (low > 0).all(1)
        rob = lm.attack(x, y, eps=[a.eps], norm=a.norm, strength=a.strength)
        right = pred == y  # the attack's radius is 0 on a misclassified input
        broken = int((cert & right & (rob.radius <= a.eps)).sum())
        line = (f"acc {acc:5.1%} ({epochs} ep)  units {units:6d}  crown {t_crown:7.2f} s/input  "
                f"certified {int(cert.sum())}/{a.n} (correct {int((cert & right).sum())})  "
                f"PGD-robust {int((pgd.min(1).values > 0).sum())}  unsound bounds {unsound}  broken {broken}")
        if a.radii:
            c = lm.certify(x, y, eps=[a.eps], norm=a.norm, method="crown")
            rc = torch.tensor([c_.radius if c_.sound else 0.0 for c_ in c.inputs], dtype=torch.float64)
            bad = int((right & (rc > rob.radius)).sum())
            line += f"  r_cert > r_adv: {bad} (median r_cert {float(rc.median()):.4g}, r_adv {float(rob.radius.median()):.4g})"
        return line


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="resnet18,shufflenet_v2_x0_5,mobilenet_v2")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--size", type=int, default=14, help="input side (MNIST average-pooled from 28)")
    ap.add_argument("--eps", type=float, default=1 / 255)
    ap.add_argument("--norm", default="inf", choices=["inf", "2"])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--pretrain-acc", type=float, default=0.95)
    ap.add_argument("--pgd-steps", type=int, default=30)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--states", default="random,trained")
    ap.add_argument("--strength", default="standard", choices=["fast", "standard", "thorough"])
    ap.add_argument("--radii", action="store_true", help="also certified radii by bisection (many CROWN calls)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    x_tr, y_tr, x_te, y_te = load_mnist(SHARED)
    if a.size != 28:
        def down(v):
            return F.adaptive_avg_pool2d(torch.from_numpy(v), a.size).numpy().astype(np.float32)
        x_tr, x_te = down(x_tr), down(x_te)
    print(f"{a.n} MNIST test images at {a.size}x{a.size}, l_{a.norm} eps {a.eps:.4g} on [0, 1], "
          f"{a.threads} thread(s)", flush=True)
    for fam in a.families.split(","):
        for state in a.states.split(","):
            t0 = time.perf_counter()
            try:
                line = run(fam, state == "trained", a, (x_tr, y_tr, x_te, y_te))
            except RuntimeError as exc:  # the architecture itself fails at this input size (before lipverify)
                line = f"does not run at {a.size}x{a.size}: {str(exc).splitlines()[0][:80]}"
            print(f"{fam:20} {state:8} {line}  [{time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
