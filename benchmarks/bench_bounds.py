"""Sound global bound vs power iteration (tol 1e-5), side by side in one run.

For every public real model (when the data folder is present) and a CIFAR-sized 6C2F conv net with
random weights, prints: time of the sound per-layer bounds, time of power iteration run to a 1e-5
relative tolerance, the two global values, and the ratios sound/power (value and time).

    python benchmarks/bench_bounds.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lipverify  # noqa: E402
from lipverify.bounds.global_bound import propagate  # noqa: E402
from lipverify.models import zoo  # noqa: E402


def measure(lm, norm="2"):
    t0 = time.perf_counter()
    sound = propagate(lm.graph, norm, "sound")
    t_sound = time.perf_counter() - t0
    for n in lm.graph.nodes:  # fresh power iteration (no warm start)
        if n.kind == "linear":
            n.op._u.clear()
    t0 = time.perf_counter()
    power = propagate(lm.graph, norm, "power", power_tol=1e-5)
    t_power = time.perf_counter() - t0
    return sound[lm.graph.output].cumulative.value, t_sound, power[lm.graph.output].cumulative.value, t_power


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("LIPVERIFY_REALDATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    models = []
    if (data / "models").is_dir():
        for f in sorted((data / "models" / "onnx").glob("*.onnx")):
            models.append((f.name, lambda f=f: lipverify.load(f)))
        arch = str(ROOT / "examples" / "architectures.py")
        for name, fn in (("kw_mnist.pth", "kw_mnist"), ("cifar_base_kw.pth", "cifar_base_kw"),
                         ("spectral_NOR_MLP_B.pth", "spectral_nor_mlp_b")):
            shape = (3, 32, 32) if "cifar" in name else (1, 28, 28)
            models.append((name, lambda name=name, fn=fn, shape=shape: lipverify.load(
                data / "models" / "pytorch" / name, arch=f"{arch}:{fn}", input_shape=shape)))
    else:
        print(f"(real data not found at {data}: only the synthetic model is measured)")
    torch.manual_seed(0)
    models.append(("6C2F random (CIFAR 3x32x32)", lambda: lipverify.load(zoo.c6f2(in_ch=3, in_size=32), input_shape=(3, 32, 32))))
    models.append(("builtin:default (2C2F MNIST)", lambda: lipverify.load()))
    hdr = f"{'model':32s} {'sound':>12s} {'t_sound':>8s} {'power':>12s} {'t_power':>8s} {'sound/power':>11s} {'t ratio':>8s}"
    print(hdr)
    print("-" * len(hdr))
    for name, make in models:
        lm = make()
        s, ts, p, tp = measure(lm)
        print(f"{name:32s} {s:12.5g} {ts:8.3f} {p:12.5g} {tp:8.3f} {s / p:11.5f} {ts / tp:8.3f}")


if __name__ == "__main__":
    main()
