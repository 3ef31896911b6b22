"""Benchmark: sound local margin constants on every public model, against the estimate path.

For each model and N test inputs at one radius, side by side in one run:

* **estimate path** (lipverify before the Clarke-Jacobian bound): masks from interval bounds, exact
  float64 SVDs of the small masked operators and warm-started power iteration on the others
  (``local_margin_constants(jacobian=False, estimate=True)``); an input's local constants were sound
  only when every masked norm was exact;
* **sound path** (what ``certify --method local`` and ``audit`` use now): the same exact SVDs, proven
  factors for the large masked operators, and the Clarke-Jacobian interval bound for the pairs of the
  prediction (``local_margin_constants(rows=pred)``).

Printed per model: ms per input of both paths and their ratio (and of the sound path asked only for
the certification decision at the radius, with the thresholds ``margin / eps`` that ``certify``
passes, so that the certified Gram bounds are computed only where they can turn it), the fraction of
inputs whose local constants are sound, the median local/global ratio of ``K_{pred, j}`` (sound and estimate), and how
many inputs each certifies at the radius (global constants; estimate path counting only its sound
inputs; estimate path counting estimates; sound path).

Run::

    python benchmarks/bench_local_sound.py                       # public models, 32 inputs each
    python benchmarks/bench_local_sound.py --extra ft/model.onnx:mnist --eps 0.3
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
from lipverify.bounds.local import local_margin_constants  # noqa: E402

MODELS = [
    ("builtin:default", None, "mnist"),
    ("Convnet_maxpool", SHARED / "models" / "onnx" / "Convnet_maxpool.onnx", "mnist"),
    ("mnist-net_256x2", SHARED / "models" / "onnx" / "mnist-net_256x2.onnx", "mnist"),
    ("cifar_base_kw", SHARED / "models" / "onnx" / "cifar_base_kw.onnx", "cifar"),
    ("resnet_2b", SHARED / "models" / "onnx" / "resnet_2b.onnx", "cifar"),
]
DATA = {"mnist": SHARED / "data" / "mnist_test_1000.npz", "cifar": SHARED / "data" / "cifar10_test_100.npz"}


def _certified(logits, pred, y, Kp, eps):
    """Correct and ``f_pred - f_j > eps K_{pred j}`` for every ``j != pred``."""
    d = logits.gather(1, pred[:, None]) - logits
    others = torch.arange(logits.shape[1])[None] != pred[:, None]
    return (pred == y) & ((d > eps * Kp) | ~others).all(1)


def run_model(name, path, data, n, eps, batch, threads):
    torch.set_num_threads(threads)
    lm = lipverify.load(str(path)) if path is not None else lipverify.load()
    d = np.load(DATA[data])
    x = torch.tensor(d["x"][:n], dtype=torch.float64).reshape((-1,) + tuple(lm.input_shape))
    y = torch.tensor(d["y"][:n]).long()
    n = len(y)
    with torch.no_grad():
        logits = lm.module_double()(x).reshape(n, -1)
    pred = logits.argmax(1)
    Kg = lm.margin_constants("2").K
    dom = lm.effective_domain()
    warm: dict = {}
    local_margin_constants(lm.graph, x[:1], eps, "2", warm_start=warm, domain=dom)  # one-off per model

    d_all = logits.gather(1, pred[:, None]) - logits
    need_all = torch.where(torch.arange(logits.shape[1])[None] != pred[:, None], d_all / eps,
                           torch.full_like(d_all, float("inf")))

    def timed(decide=False, **kw):
        t0 = time.perf_counter()
        out = [local_margin_constants(lm.graph, x[s:s + batch], eps, "2", warm_start=warm, domain=dom,
                                      **({"rows": pred[s:s + batch], "need": need_all[s:s + batch]} if decide else {}),
                                      **kw)
               for s in range(0, n, batch)]
        return (time.perf_counter() - t0) / n, out

    t_est, r_est = timed(jacobian=False, estimate=True, gram_max_entries=0)
    t_new, r_new = timed(rows=pred)
    t_dec, r_dec = timed(decide=True)
    b = torch.arange(n)
    K_old = torch.cat([r.K_estimate for r in r_est])[b, pred]
    exact_old = torch.cat([r.exact for r in r_est])
    K_new = torch.cat([r.K for r in r_new])[b, pred]
    sound_new = torch.cat([r.sound for r in r_new])
    Kgp = Kg[pred]
    off = torch.arange(Kg.shape[0])[None] != pred[:, None]

    def med(K):
        return float((K[off] / Kgp[off]).median())
    cert_g = _certified(logits, pred, y, Kgp, eps)
    cert_old_est = _certified(logits, pred, y, torch.minimum(K_old, Kgp), eps)
    cert_old_sound = cert_old_est & exact_old
    cert_new = _certified(logits, pred, y, K_new, eps) & sound_new
    K_dec = torch.cat([r.K for r in r_dec])[b, pred]
    cert_dec = _certified(logits, pred, y, K_dec, eps)
    return {"model": name, "n": n, "eps": eps, "t_est_ms": 1e3 * t_est, "t_new_ms": 1e3 * t_new,
            "sound_old": float(exact_old.double().mean()), "sound_new": float(sound_new.double().mean()),
            "ratio_new": med(K_new), "ratio_est": med(torch.minimum(K_old, Kgp)),
            "cert_global": int(cert_g.sum()), "cert_old_sound": int(cert_old_sound.sum()),
            "cert_old_est": int(cert_old_est.sum()), "cert_new": int(cert_new.sum()),
            "t_dec_ms": 1e3 * t_dec, "cert_dec": int(cert_dec.sum()),
            "method": r_new[0].method}


def certify_end_to_end(path, data, n, eps, threads):
    """``LipModel.certify(method="local")`` (bisection included) with today's sound constants against the
    same certifier on the estimate path (power-iteration masked norms; certificates counted only where
    every factor was exact, and counted with estimates): VRA at ``eps`` and wall time of each."""
    import lipverify.certify.local as cl

    torch.set_num_threads(threads)
    lm = lipverify.load(str(path)) if path is not None else lipverify.load()
    d = np.load(DATA[data])
    x = torch.tensor(d["x"][:n], dtype=torch.float32).reshape((-1,) + tuple(lm.input_shape))
    y = torch.tensor(d["y"][:n]).long()
    out = {}
    t0 = time.perf_counter()
    res = lm.certify(x, y, eps=[eps], norm="2", method="local")
    out["sound"] = (res.vra[eps], time.perf_counter() - t0)
    real = cl.local_margin_constants

    def estimate_path(graph, xs, e, norm, counted, **kw):
        kw.pop("rows", None), kw.pop("need", None)
        r = real(graph, xs, e, norm, jacobian=False, estimate=True, gram_max_entries=0, **kw)
        r.K = r.K_estimate
        r.sound = r.exact if not counted else torch.ones_like(r.exact)
        return r
    for label, counted in (("estimate (sound only where exact)", False), ("estimate (counted)", True)):
        cl.local_margin_constants = lambda g, xs, e, nm, _c=counted, **kw: estimate_path(g, xs, e, nm, _c, **kw)
        try:
            t0 = time.perf_counter()
            res = lm.certify(x, y, eps=[eps], norm="2", method="local")
            out[label] = (res.vra[eps], time.perf_counter() - t0)
        finally:
            cl.local_margin_constants = real
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--eps", type=float, default=0.1, help="l2 radius in pixel space")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated model names")
    ap.add_argument("--extra", action="append", default=[], help="PATH:mnist|cifar, another model")
    ap.add_argument("--certify", default=None, help="PATH:mnist|cifar: also certify N inputs end to end "
                    "(bisection) on both paths")
    args = ap.parse_args(argv)
    if args.certify:
        p, _, ds = args.certify.rpartition(":")
        r = certify_end_to_end(Path(p) if p != "builtin:default" else None, ds, args.n, args.eps, args.threads)
        print(f"certify --method local, {args.n} inputs, l2 eps {args.eps:g}: {p}")
        for k, (vra, t) in r.items():
            print(f"  {k:<36} VRA {100 * vra:5.1f}%   {t:7.1f} s   ({t / r['estimate (counted)'][1]:.2f}x the estimate path)")
        return 0
    models = [m for m in MODELS if m[1] is None or m[1].exists()]
    if args.only:
        keep = set(args.only.split(","))
        models = [m for m in models if m[0] in keep]
    for e in args.extra:
        p, _, ds = e.rpartition(":")
        models.append((Path(p).name if Path(p).name != "model.onnx" else p, Path(p), ds))
    hdr = (f"{'model':<22} {'est ms/in':>9} {'sound ms/in':>11} {'ratio':>6} {'sound old':>9} {'sound now':>9} "
           f"{'K loc/glob est':>14} {'K loc/glob sound':>16} {'cert: global':>12} {'est(sound)':>10} "
           f"{'est(all)':>8} {'now':>5} | {'decision ms/in':>14} {'ratio':>6} {'cert':>5}")
    print(f"l2 eps = {args.eps:g} (pixel space), {args.n} inputs per model, {args.threads} threads\n")
    print(hdr)
    print("-" * len(hdr))
    for name, path, data in models:
        r = run_model(name, path, data, args.n, args.eps, args.batch, args.threads)
        print(f"{r['model']:<22} {r['t_est_ms']:>9.1f} {r['t_new_ms']:>11.1f} {r['t_new_ms'] / r['t_est_ms']:>6.2f} "
              f"{100 * r['sound_old']:>8.0f}% {100 * r['sound_new']:>8.0f}% {r['ratio_est']:>14.3f} "
              f"{r['ratio_new']:>16.3f} {r['cert_global']:>12d} {r['cert_old_sound']:>10d} {r['cert_old_est']:>8d} "
              f"{r['cert_new']:>5d} | {r['t_dec_ms']:>14.1f} {r['t_dec_ms'] / r['t_est_ms']:>6.2f} {r['cert_dec']:>5d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
