"""Tightness: sound upper bounds vs optimised lower bounds, per public model and method, in one table.

For each model: the global l2 bound (product along the graph), LipSDP-Neuron where the network is a
dense ReLU chain, the local bound (median over inputs of the local/global margin constant at eps),
and the best lower bounds found (Jacobian power iteration for the logit map; pair optimisation for
the margin of the most frequent (prediction, runner-up) pair).  Ratios upper/lower.

    python benchmarks/bench_tightness.py [--data ../shared/data] [--n 32] [--eps 0.1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lipverify  # noqa: E402
from lipverify.attacks.lower import (  # noqa: E402
    jacobian_spectral_lower_bound,
    margin_lipschitz_lower_bound,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("LIPVERIFY_REALDATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--lipsdp-max-hidden", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = Path(args.data)
    from lipverify.models.zoo import default_samples

    xs, ys = default_samples()
    cases = [("builtin:default", lipverify.load(), xs)]
    if (data / "models").is_dir():
        xm = torch.from_numpy(np.load(data / "data/mnist_test_1000.npz")["x"])[: args.n]
        xc = torch.from_numpy(np.load(data / "data/cifar10_test_100.npz")["x"])[: args.n]
        cases += [
            ("mnist-net_256x2", lipverify.load(data / "models/onnx/mnist-net_256x2.onnx"), xm.reshape(-1, 784, 1)),
            ("Convnet_maxpool", lipverify.load(data / "models/onnx/Convnet_maxpool.onnx"), xm),
            ("cifar_base_kw", lipverify.load(data / "models/onnx/cifar_base_kw.onnx", mean="0.485,0.456,0.406",
                                             std="0.225"), xc),
            ("resnet_2b", lipverify.load(data / "models/onnx/resnet_2b.onnx", mean="0.4914,0.4822,0.4465",
                                         std="0.2471,0.2435,0.2616"), xc),
        ]
    print(f"{'model':18s} {'global':>10s} {'LipSDP':>10s} {'jac lower':>10s} {'glob/low':>9s} {'sdp/low':>8s} "
          f"{'K pair':>8s} {'K upper':>9s} {'K lower':>9s} {'K u/l':>7s} {'local/glob':>10s} {'time':>6s}")
    for name, lm, x in cases:
        t0 = time.perf_counter()
        x = x[: args.n]
        glob = lm.bounds("2").global_bound.value
        K = lm.margin_constants("2").K
        sdp = None
        try:
            from lipverify.bounds.lipsdp import lipsdp
            from lipverify.bounds.lipsdp_graph import extract_weights

            w, lo, hi = extract_weights(lm.graph)
            if sum(a.shape[0] for a in w[:-1]) <= args.lipsdp_max_hidden:
                r = lipsdp(w, alpha=lo, beta=hi)
                sdp = r.value if r.sound else None
        except Exception:
            sdp = None
        jl = jacobian_spectral_lower_bound(lm.module, x[:16]).value
        with torch.no_grad():
            lg = lm(x).double()
        top2 = lg.topk(2, dim=1).indices
        pair = Counter(map(tuple, top2.tolist())).most_common(1)[0][0]
        ml = margin_lipschitz_lower_bound(lm.module, x, [pair], steps=150, restarts=2)[0].value
        from lipverify.bounds.local import local_margin_constants

        loc = local_margin_constants(lm.graph, x[:8].double(), args.eps, "2")
        p = torch.tensor(pair)
        ratio = float((loc.K[:, p[0], p[1]] / K[p[0], p[1]]).median())
        ku = float(K[pair])
        print(f"{name:18s} {glob:10.4g} {sdp if sdp else float('nan'):10.4g} {jl:10.4g} {glob / jl:9.2f} "
              f"{(sdp / jl) if sdp else float('nan'):8.2f} {str(pair):>8s} {ku:9.4g} {ml:9.4g} {ku / ml:7.2f} "
              f"{ratio:10.3f} {time.perf_counter() - t0:6.1f}")


if __name__ == "__main__":
    main()
