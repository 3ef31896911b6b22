"""Certification cost, measured side by side in one run.

Global certification throughput / float32 inference throughput of the model (same inputs, same batch):
``certify`` computes ``K`` once, then each batch is one float32 forward pass over the Lipschitz graph
with a proven rounding-error bound (``--precision auto``, the default), the margin rule, and a float64
recomputation of the inputs whose decision the bound leaves open (after the running error bound, where
the probe chose it as a second stage); ``float64`` is the float64-only path.
``auto batch``: certify with the batch it picks (free memory, and on CPUs the activation working
set), against the same float32 inference at ``--batch``.  Also printed: the fraction of inputs
recomputed in float64, the median bound on the margin error, how much lower the float32-proven
radii are than the float64 ones (median, relative), and which bound the probe took (``range``: the
one bound over the inputs' range, :mod:`lipverify.bounds.domain`; ``sensitivity``, ``running``, or
the sensitivity bound with the running bound as a second stage).  The last two columns split the
cost: ``plain/infer``, the float32 pass over the Lipschitz graph with no bound work (what certifying
would cost with a free bound and a free rule: the ceiling of ``cert/infer32``), and ``pass/infer``,
that pass with the bound the probe took, alone.  The timings of the contenders are interleaved and the
best of ``--repeats`` is kept (the machine is shared).

    python benchmarks/bench_certify.py [--data ../shared/data] [--batch 256] [--repeats 7] [--n 1000]

``--n``: inputs per model (the test images repeated; 10000 is the size of a full test set).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lipverify  # noqa: E402
from lipverify.bounds.domain import DomainForward  # noqa: E402
from lipverify.bounds.rounding import trusted_kernels  # noqa: E402


def best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("LIPVERIFY_REALDATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    cases = []
    from lipverify.models.zoo import default_samples

    xs, ys = default_samples()
    cases.append(("builtin:default", lipverify.load(), xs.repeat(32, 1, 1, 1)[:1000], ys.repeat(32)[:1000]))
    if (data / "models").is_dir():
        mn = np.load(data / "data" / "mnist_test_1000.npz")
        cf = np.load(data / "data" / "cifar10_test_100.npz")
        xm, ym = torch.from_numpy(mn["x"]), torch.from_numpy(mn["y"])
        xc, yc = torch.from_numpy(cf["x"]).repeat(10, 1, 1, 1), torch.from_numpy(cf["y"]).repeat(10)
        cases.append(("mnist-net_256x2.onnx", lipverify.load(data / "models/onnx/mnist-net_256x2.onnx"),
                      xm.reshape(-1, 784, 1), ym))
        cases.append(("Convnet_maxpool.onnx", lipverify.load(data / "models/onnx/Convnet_maxpool.onnx"), xm, ym))
        cases.append(("cifar_base_kw.onnx", lipverify.load(data / "models/onnx/cifar_base_kw.onnx",
                                                           mean="0.485,0.456,0.406", std="0.225"), xc, yc))
        cases.append(("resnet_2b.onnx", lipverify.load(data / "models/onnx/resnet_2b.onnx",
                                                       mean="0.4914,0.4822,0.4465", std="0.2471,0.2435,0.2616"),
                      xc, yc))
    print(f"{'model':22s} {'n':>5s} {'infer32/s':>10s} {'cert/s':>10s} {'cert/infer32':>12s} "
          f"{'f64/infer32':>11s} {'auto batch':>10s} {'fallback':>8s} {'delta med':>9s} {'radius low':>10s} "
          f"{'K once (s)':>10s} {'bound':>13s} {'plain/infer':>11s} {'pass/infer':>10s}")
    for name, lm, x, y in cases:
        reps = -(-args.n // len(x))
        x, y = x.repeat(reps, *([1] * (x.dim() - 1)))[:args.n], y.repeat(reps)[:args.n]
        t0 = time.perf_counter()
        lm.margin_constants("2")
        rf = lm.rounded_forward("2")
        tk = time.perf_counter() - t0
        m32 = lm.module
        lo, hi = (float(v) for v in torch.aminmax(x))
        passes = {"plain": lambda xb: rf.run(rf.converted(xb)[0], plain=True), "sensitivity": rf,
                  "running": lm.running_error("2"), "range": DomainForward(rf, lo, hi, check=False)}

        def infer():
            with torch.no_grad():
                for s in range(0, len(x), args.batch):
                    m32(x[s:s + args.batch])

        def one_pass(fn):
            with torch.no_grad(), trusted_kernels():
                for s in range(0, len(x), args.batch):
                    fn(x[s:s + args.batch])

        best = {"infer": math.inf, "auto": math.inf, "float64": math.inf, "auto batch": math.inf,
                **{k: math.inf for k in passes}}
        res = {}
        for _ in range(args.repeats):
            for key in best:
                t0 = time.perf_counter()
                if key == "infer":
                    infer()
                elif key in passes:
                    one_pass(passes[key])
                elif key == "auto batch":  # the batch certify picks from free memory
                    lm.certify(x, y, eps=[0.1, 0.3])
                else:
                    res[key] = lm.certify(x, y, eps=[0.1, 0.3], batch_size=args.batch, precision=key)
                best[key] = min(best[key], time.perf_counter() - t0)
        a, b = res["auto"], res["float64"]
        for e in (0.1, 0.3):
            assert torch.equal(a.certified_at[e], b.certified_at[e]), "float32 decisions differ"
        fallback = float((a.method_code == 0).double().mean())
        note = [t for t in a.notes if "rounding-error bound" in t]
        delta = note[0].split("median ")[-1].split(")")[0] if note else "-"
        text = note[0] if note else ""
        used = ("range" if "whole input range" in text else "running" if "bound by entry-wise" in text else
                "sens.+running" if "bounded again by entry-wise" in text else "sensitivity" if text else "-")
        pos = b.radius > 0
        low = float(((b.radius - a.radius)[pos] / b.radius[pos]).median()) if bool(pos.any()) else 0.0
        n = len(x)
        bound_key = used if used in ("running", "range") else "sensitivity"
        print(f"{name:22s} {n:5d} {n / best['infer']:10.0f} {n / best['auto']:10.0f} "
              f"{best['infer'] / best['auto']:12.3f} {best['infer'] / best['float64']:11.3f} "
              f"{best['infer'] / best['auto batch']:10.3f} {fallback:8.1%} "
              f"{delta:>9s} {low:10.2%} {tk:10.3f} {used:>13s} {best['infer'] / best['plain']:11.3f} "
              f"{best['infer'] / best[bound_key]:10.3f}")


if __name__ == "__main__":
    main()
