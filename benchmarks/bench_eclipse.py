"""Benchmark: fast compositional bounds (eclipse-fast, eclipse) against LipSDP-Neuron, side by side.

For each dense ReLU network: the product of spectral norms, lipverify's LipSDP-Neuron (SCS, split
into blocks of at most 300 hidden neurons as ``bounds --method lipsdp`` does, verified a posteriori),
``eclipse-fast`` (closed-form sequential certificate) and ``eclipse`` (the same polished by
quasi-Newton steps on LipSDP's exact rho_min, 10 s budget), all sound; values, times and the ratios
value / LipSDP and time / LipSDP time.

Networks: LipSDP's ``random_weights.mat`` (published LipSDP-Neuron 36.482) and ``mnist_weights.mat``,
the public ``mnist-net_256x2.onnx``, and 784-256x4-10 / 784-256x6-10 ReLU MLPs at random (He)
initialisation.

Run::

    python benchmarks/bench_eclipse.py [--skip-lipsdp-deep] [--threads 2]
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

from lipverify.bounds.eclipse import eclipse, eclipse_fast  # noqa: E402
from lipverify.bounds.lipsdp import lipsdp, product_bound  # noqa: E402


def _mlp(depth, width=256, seed=0):
    g = np.random.default_rng(seed)
    sizes = [784] + [width] * depth + [10]
    return [g.standard_normal((b, a)) * np.sqrt(2.0 / a) for a, b in zip(sizes[:-1], sizes[1:])]


def _cases(skip_deep):
    out = []
    try:
        import scipy.io as sio

        for f, label in (("random_weights.mat", "random_weights (LipSDP pub. 36.482)"),
                         ("mnist_weights.mat", "mnist_weights 784-50-10")):
            p = SHARED / "lipsdp" / f
            if p.exists():
                out.append((label, [np.asarray(x, dtype=np.float64) for x in sio.loadmat(p)["weights"].ravel()], True))
    except ImportError:  # pragma: no cover
        pass
    onnx = SHARED / "models" / "onnx" / "mnist-net_256x2.onnx"
    if onnx.exists():
        import lipverify
        from lipverify.bounds.lipsdp_graph import extract_weights

        out.append(("mnist-net_256x2", extract_weights(lipverify.load(str(onnx)).graph)[0], True))
    out.append(("mlp 784-256x4-10 (random)", _mlp(4), not skip_deep))
    out.append(("mlp 784-256x6-10 (random)", _mlp(6), not skip_deep))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-lipsdp-deep", action="store_true", help="no LipSDP on the 256x4 / 256x6 MLPs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=10.0, help="eclipse's budget (s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    hdr = (f"{'network':38s} {'hidden':>6s} {'product':>9s} | {'LipSDP':>9s} {'s':>6s} | {'ecl-fast':>9s} {'s':>5s} "
           f"{'/LipSDP':>7s} | {'eclipse':>9s} {'s':>5s} {'/LipSDP':>7s} {'time/LipSDP':>11s}")
    print(hdr)
    print("-" * len(hdr))
    for name, ws, run_sdp in _cases(args.skip_lipsdp_deep):
        hidden = sum(w.shape[0] for w in ws[:-1])
        prod = product_bound(ws)
        if run_sdp:
            t0 = time.perf_counter()
            sdp = lipsdp(ws, form="neuron")
            t_sdp = time.perf_counter() - t0
            v_sdp = sdp.value if sdp.sound else float("nan")
        else:
            t_sdp, v_sdp = float("nan"), float("nan")
        f = eclipse_fast(ws)
        e = eclipse(ws, time_limit=args.time_limit)
        print(f"{name:38s} {hidden:>6d} {prod:>9.4g} | {v_sdp:>9.4g} {t_sdp:>6.1f} | {f.value:>9.4g} {f.time_s:>5.2f} "
              f"{f.value / v_sdp:>7.3f} | {e.value:>9.4g} {e.time_s:>5.1f} {e.value / v_sdp:>7.3f} "
              f"{e.time_s / t_sdp:>11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
