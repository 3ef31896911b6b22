"""Certification cost, measured side by side in one run.

1. Global certification throughput / plain inference throughput (same model, same batch): certify
   computes K once, then each batch is one float64 forward pass plus the margin rule.  Plain
   inference is timed in float64 (same arithmetic) and in float32 (what a deployed model runs).
2. Local certification (when ``--local``): inputs per second and local/global bound ratio against a
   straightforward per-example implementation is in ``benchmarks/bench_local.py``.

    python benchmarks/bench_certify.py [--data ../shared/data] [--batch 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lipverify  # noqa: E402


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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
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
    print(f"{'model':24s} {'n':>5s} {'infer64/s':>10s} {'cert/s':>10s} {'cert/infer64':>12s} {'infer32/s':>10s} "
          f"{'cert/infer32':>12s} {'K once (s)':>10s}")
    for name, lm, x, y in cases:
        t0 = time.perf_counter()
        lm.margin_constants("2")
        tk = time.perf_counter() - t0
        m64 = lm.module_double()
        m32 = lm.module

        def infer(m, dt):
            with torch.no_grad():
                for s in range(0, len(x), args.batch):
                    m(x[s:s + args.batch].to(dt))

        t64 = best_time(lambda: infer(m64, torch.float64), args.repeats)
        t32 = best_time(lambda: infer(m32, torch.float32), args.repeats)
        tc = best_time(lambda: lm.certify(x, y, eps=[0.1, 0.3], batch_size=args.batch), args.repeats)
        n = len(x)
        print(f"{name:24s} {n:5d} {n / t64:10.0f} {n / tc:10.0f} {t64 / tc:12.3f} {n / t32:10.0f} {t32 / tc:12.3f} "
              f"{tk:10.3f}")


if __name__ == "__main__":
    main()
