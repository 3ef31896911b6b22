"""Benchmark: batched, warm-started local Lipschitz bounds vs. a per-example reference.

Local bounds of Huang et al. 2021 ("Training certifiably robust neural networks with efficient local
Lipschitz bounds", NeurIPS; SPEC section 4).  For N inputs and a radius eps it compares

* ``lipverify.bounds.local.local_margin_constants`` on batches: masks from interval bounds, masked
  operator norms by exact SVD where the masked matrix is small (``exact_max_entries``) and otherwise by
  batched power iteration warm-started from the unmasked singular vector (stopping per example on a
  relative change ``<= --tol``); also the same with power iteration only (``exact_max_entries=0``);
* a straightforward reference, one example at a time: the same masks, then plain power iteration on
  every masked operator with a fixed ``--ref-iters`` iterations (2000) from a random start, as the
  paper's code does at test time, and the same combination over the graph;

and prints the time per input, the speed-up, the relative difference of the local Lipschitz bounds
(and of the margin constants) with respect to the reference, the mean ratio local / global bound and
how many inputs the global and the local margin constants certify at eps.

Model: the embedded MNIST model (``lipverify.load()``: the trained 2c2f conv net, pixels in [0, 1]) or
``--onnx PATH``.  Data: ``--data PATH.npz`` with ``x`` and ``y``; default
``../shared/data/data/mnist_test_1000.npz`` relative to the repository root.

Example::

    python benchmarks/bench_local.py --n 40 --eps 0.3
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lipverify  # noqa: E402
from lipverify.bounds.local import (  # noqa: E402
    combine_local,
    local_margin_constants,
    operator_masks,
    varying_masks,
)


def reference_local(graph, ops, x, eps, norm, iters, seed, cache):
    """One example ``x`` (``(1, *shape)``): masks, then fixed-count power iteration from random starts."""
    masks = varying_masks(graph, x, eps, norm, warm_start=cache)
    opm = operator_masks(graph, masks)
    g = torch.Generator().manual_seed(seed)
    norms = {}
    for i, (m_in, m_out) in opm.items():
        op = ops[i]
        mi, mo = m_in.to(torch.float64), m_out.to(torch.float64)
        if norm == "inf":  # no power iteration for l-inf: exact masked row sums
            norms[i] = (op.abs_apply(mi) * mo).reshape(1, -1).amax(dim=1)
            continue
        u = torch.randn(m_in.shape, generator=g, dtype=torch.float64) * mi
        sigma = torch.zeros(1, dtype=torch.float64)
        for _ in range(iters):
            nu = u.norm()
            if float(nu) == 0.0:
                break
            u = u / nu
            v = mo * op.apply(mi * u)
            sigma = v.norm().reshape(1)
            u = mi * op.adjoint(mo * v)
        norms[i] = sigma
    return combine_local(graph, norms, masks, norm, warm_start=cache)


def margins_certified(logits, y, K, eps):
    """Correct and ``f_y - f_i > eps K_yi`` for all ``i != y`` (K: (B, m, m) or (m, m))."""
    B, m = logits.shape
    K = K.expand(B, m, m) if K.dim() == 3 else K.unsqueeze(0).expand(B, m, m)
    pred = logits.argmax(1)
    fy = logits.gather(1, y[:, None])
    Ky = K[torch.arange(B), y]  # (B, m)
    ok = (fy - logits > eps * Ky) | (torch.arange(m)[None] == y[:, None])
    return (pred == y) & ok.all(1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", help="ONNX model (default: the embedded MNIST conv net)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "data" / "mnist_test_1000.npz"))
    ap.add_argument("--n", type=int, default=40, help="inputs for the batched implementation")
    ap.add_argument("--n-ref", type=int, default=8, help="inputs also run through the slow reference")
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--norm", choices=["2", "inf"], default="2")
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--ref-iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    lm = lipverify.load(args.onnx) if args.onnx else lipverify.load()
    graph = lm.graph
    data = np.load(args.data)
    n = min(args.n, len(data["x"]))
    x = torch.tensor(data["x"][:n], dtype=torch.float32).reshape((n,) + tuple(lm.input_shape))
    y = torch.tensor(data["y"][:n]).long()
    n_ref = min(args.n_ref, n)
    print(f"model: {args.onnx or 'builtin:default (MNIST 2c2f)'}; {n} inputs ({n_ref} for the reference); "
          f"l{args.norm} eps = {args.eps:g}; torch threads = {args.threads}")

    cache: dict = {}
    t0 = time.perf_counter()
    local_margin_constants(graph, x[:1], args.eps, args.norm, warm_start=cache)  # one-off per model
    t_prep = time.perf_counter() - t0

    def run(**kw):
        t = time.perf_counter()
        Ks, Ls, snd, its = [], [], [], []
        for s in range(0, n, args.batch):
            r = local_margin_constants(graph, x[s:s + args.batch], args.eps, args.norm, tol=args.tol,
                                       warm_start=cache, clamp_to_global=False, jacobian=False, estimate=True,
                                       **kw)
            Ks.append(r.K_estimate), Ls.append(r.lipschitz_estimate), snd.append(r.exact), its.append(r.iterations)
            frac = r.varying_fraction
        return (time.perf_counter() - t) / n, torch.cat(Ks), torch.cat(Ls), torch.cat(snd), torch.cat(its), frac

    t_def, K_def, L_def, s_def, it_def, frac = run(gram_max_entries=0)
    t_pow, K_pow, L_pow, s_pow, it_pow, _ = run(exact_max_entries=0, gram_max_entries=0)

    ops = {i: copy.deepcopy(nd.op).to(torch.float64) for i, nd in enumerate(graph.nodes) if nd.kind == "linear"}
    t = time.perf_counter()
    K_ref, L_ref = [], []
    for b in range(n_ref):
        K, L = reference_local(graph, ops, x[b:b + 1], args.eps, args.norm, args.ref_iters, args.seed + b, cache)
        K_ref.append(K), L_ref.append(L)
    t_ref = (time.perf_counter() - t) / max(n_ref, 1)
    K_ref, L_ref = torch.cat(K_ref), torch.cat(L_ref)

    glob_K = lm.margin_constants(args.norm).K
    glob_L = lm.node_constants(args.norm)[graph.output].cumulative.value
    off = ~torch.eye(glob_K.shape[0], dtype=torch.bool)

    def reldiff(L, K):
        dl = ((L[:n_ref] - L_ref) / L_ref).abs()
        dk = ((K[:n_ref] - K_ref)[:, off] / K_ref[:, off].clamp_min(1e-300)).abs()
        return float(dl.max()), float(dl.mean()), float(dk.max())

    with torch.no_grad():
        logits = lm(x).double()
    cert_g = int(margins_certified(logits, y, glob_K, args.eps).sum())
    Kc_def = torch.minimum(K_def, glob_K.unsqueeze(0))
    cert_l = int(margins_certified(logits, y, Kc_def, args.eps).sum())

    rows = [
        ("reference (per example, %d power it.)" % args.ref_iters, t_ref, None, None, "-"),
        ("batched, exact SVD + warm power it.", t_def, reldiff(L_def, K_def), it_def,
         f"{int(s_def.sum())}/{n}"),
        ("batched, warm power it. only", t_pow, reldiff(L_pow, K_pow), it_pow, f"{int(s_pow.sum())}/{n}"),
    ]
    print(f"\none-off preparation per model (global constants, warm-start vectors): {t_prep:.2f} s\n")
    hdr = f"{'method':<40} {'ms/input':>9} {'speed-up':>9} {'max |dL|/L':>11} {'mean |dL|/L':>12} " \
          f"{'max |dK|/K':>11} {'iters mean/max':>15} {'sound':>7}"
    print(hdr)
    print("-" * len(hdr))
    for name, tt, diff, it, snd in rows:
        sp = "1.0x" if diff is None else f"{t_ref / tt:.1f}x"
        d = ("-", "-", "-") if diff is None else tuple(f"{v:.2e}" for v in diff)
        its = f"{args.ref_iters}/{args.ref_iters}" if it is None else f"{float(it.double().mean()):.1f}/{int(it.max())}"
        print(f"{name:<40} {1e3 * tt:>9.1f} {sp:>9} {d[0]:>11} {d[1]:>12} {d[2]:>11} {its:>15} {snd:>7}")

    L_cl = torch.minimum(L_def, torch.full_like(L_def, glob_L))
    ratio_L = float((L_cl / glob_L).mean())
    ratio_K = float((Kc_def[:, off] / glob_K[off].unsqueeze(0)).mean())
    print(f"\nglobal Lipschitz bound {glob_L:.4g}; mean local/global: Lipschitz {ratio_L:.3f}, "
          f"margin constants K {ratio_K:.3f}")
    print("varying fraction per activation layer: " + ", ".join(f"{f:.3f}" for f in frac))
    print(f"certified at eps={args.eps:g}: global {cert_g}/{n}, local {cert_l}/{n}")
    if math.isfinite(ratio_L) and ratio_L > 0.9:
        print("note: the model was not trained for local bounds; the post-hoc gain is expected to be small")


if __name__ == "__main__":
    main()
