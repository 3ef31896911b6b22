"""Benchmark: ``lipverify train`` on the MNIST subset, per architecture, side by side in one run.

For each architecture: training time per epoch, the re-verified clean accuracy and certified accuracy
on MNIST test images, and the step time of the training objective against a plain cross-entropy step
of the same network (the cost of the bound).  Also the LiResNet block constant from the fused kernel
against the triangle-inequality bound ``1 + ||s beta K||``.

Run::

    python benchmarks/bench_train.py                 # the issue's small versions (tens of minutes)
    python benchmarks/bench_train.py --quick         # a few epochs each
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "data"


def _run_train(arch, eps, epochs, extra, out):
    cmd = [sys.executable, "-m", "lipverify", "train", "--arch", arch, "--data", str(DATA / "mnist_train_5k.npz"),
           "--eval-data", str(DATA / "mnist_test_1000.npz"), "--eps", str(eps), "--epochs", str(epochs),
           "--out", str(out), "--quiet", "--json", "--force", "--threads", "2"] + extra
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"arch": arch, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
    rep = json.loads(r.stdout)
    hist = rep.get("history", [])
    per_epoch = sum(h["time_s"] for h in hist) / max(len(hist), 1)
    after = rep["after"]
    key = next(iter(after["vra"]))
    return {"arch": arch, "eps": eps, "epochs": epochs, "clean": after["clean_accuracy"], "certified": after["vra"][key],
            "epoch_s": per_epoch, "wall_s": wall}


def _median_time(fn, n: int = 10) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def _step_ratio(arch, eps):
    """Training-objective step time / plain CE step time of the same network (median of 10)."""
    from lipverify.train.train import build_architecture

    if arch.startswith("linf-dist"):
        from lipverify.models.linf_dist import LinfDistNet
        from lipverify.train.linf import linf_hinge_loss

        d, w = (int(v) for v in arch.split("-")[-1].split("x"))
        net = LinfDistNet(784, d, w, 10).train()
        dense = torch.nn.Sequential(torch.nn.Flatten(), *[m for k in range(d) for m in
                                    (torch.nn.Linear(784 if k == 0 else w, w if k < d - 1 else 10), torch.nn.ReLU())][:-1])
        x, y = torch.rand(256, 1, 28, 28), torch.randint(0, 10, (256,))
        s = torch.zeros((), requires_grad=True)

        def ours():
            linf_hinge_loss(net(x), y, s.exp(), 3 * eps, 0.05).backward()

        def plain():
            F.cross_entropy(dense(x), y).backward()
        name = "l-inf distance net vs a dense ReLU net of the same widths"
    else:
        import lipverify
        from lipverify.train.losses import robust_loss
        from lipverify.importers.normalize import PixelSpaceModel
        from lipverify.train.trainable import GloroBound, build_trainable_graph

        mod, family, shape = build_architecture(arch, (1, 28, 28))
        lm = lipverify.load(mod, input_shape=shape)
        import copy

        from lipverify.importers.fx import trace_module

        gm = trace_module(copy.deepcopy(mod))
        pnet = PixelSpaceModel(gm, None)
        graph = build_trainable_graph(gm, shape, None, torch.device("cpu"))
        bound = GloroBound(pnet, graph, power_iters=2, seed=0)
        x, y = torch.rand(256, *shape), torch.randint(0, 10, (256,))
        loss = "emma" if family == "liresnet" else "gloro"

        def ours():
            bound.power_step()
            robust_loss(loss, bound(x), y, bound.margin_constants(), eps, 1.0).backward()

        def plain():
            F.cross_entropy(pnet(x), y).backward()
        name = f"{loss} step vs cross-entropy step"
        del lm

    med = _median_time
    med(ours), med(plain)  # warm up
    return med(ours) / med(plain), name


def _block_ratio():
    from lipverify.graph.operator_norms import conv_norm2_fft
    from lipverify.models.zoo import ScaledResidualConv

    torch.manual_seed(0)
    blk = ScaledResidualConv(32, 1 / math.sqrt(6))
    with torch.no_grad():
        blk.conv.weight.mul_(3.0)
    fused = conv_norm2_fft(blk.merged_kernel().double(), (16, 16), 1, 1)
    k = blk.conv.weight.detach().double() * blk.scale
    naive = 1 + conv_norm2_fft(k, (16, 16), 1, 1)
    return fused, naive


def _power_step_times(arch, shape):
    """Median time of one training power step with the LiResNet blocks one at a time / batched."""
    import copy

    from lipverify.importers.fx import trace_module
    from lipverify.importers.normalize import PixelSpaceModel
    from lipverify.train.train import build_architecture
    from lipverify.train.trainable import GloroBound, build_trainable_graph

    torch.manual_seed(0)
    mod, _, shape = build_architecture(arch, shape)
    gm = trace_module(copy.deepcopy(mod))
    graph = build_trainable_graph(gm, shape, None, torch.device("cpu"))
    bound = GloroBound(PixelSpaceModel(gm, None), graph, power_iters=2, seed=0, init_iters=3)

    med = _median_time
    batched = med(bound.power_step)
    grouped = bound._power_groups
    bound._power_groups = lambda: [[i] for i in bound.live]
    separate = med(bound.power_step)
    bound._power_groups = grouped
    return separate, batched


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of every run (default 20; 3 with --quick)")
    ap.add_argument("--only", default=None, help="comma-separated run names, e.g. linf-0.1,liresnet,6c2f")
    args = ap.parse_args(argv)
    if not (DATA / "mnist_train_5k.npz").exists():
        print(f"needs {DATA}/mnist_train_5k.npz")
        return 2
    ep = args.epochs or (3 if args.quick else 20)
    named = {"linf-0.1": ("linf-dist-4x256", 0.1, max(ep, 30 if not args.quick else ep), ["--batch-size", "256"]),
             "linf-0.3": ("linf-dist-4x256", 0.3, max(ep, 30 if not args.quick else ep), ["--batch-size", "256"]),
             "liresnet": ("liresnet-l6w32", 1.58, ep, ["--input-shape", "1,28,28"]),
             "6c2f": ("6c2f", 1.58, ep, ["--input-shape", "1,28,28", "--loss", "emma"]),
             "2c2f-0.3": ("2c2f", 0.3, ep, []),
             "4c3f-minmax": ("4c3f-minmax", 1.58, ep, [])}
    runs = [named[k] for k in (args.only.split(",") if args.only else named)]
    print(f"{'architecture':18s} {'eps':>6s} {'epochs':>6s} {'clean':>7s} {'certified':>9s} {'s/epoch':>8s} "
          f"{'step / plain step':>18s}")
    with tempfile.TemporaryDirectory() as tmp:
        for k, (arch, eps, epochs, extra) in enumerate(runs):
            r = _run_train(arch, eps, epochs, extra, Path(tmp) / f"r{k}")
            if "error" in r:
                print(f"{arch:18s} {eps:6g} ERROR {r['error']}")
                continue
            try:
                ratio, _ = _step_ratio(arch, eps)
            except Exception as exc:  # the step-time probe is informative only
                ratio = float("nan")
                print(f"  (step ratio not measured: {exc})")
            print(f"{arch:18s} {eps:6g} {epochs:6d} {100 * r['clean']:6.1f}% {100 * r['certified']:8.1f}% "
                  f"{r['epoch_s']:8.1f} {ratio:18.2f}")
    for arch, shape in (("liresnet-l6w32", (1, 28, 28)), ("liresnet-l12w64", (3, 32, 32))):
        sep, bat = _power_step_times(arch, shape)
        print(f"{arch}: power step (2 iterations, every live operator) {1e3 * sep:.1f} ms one block at a time, "
              f"{1e3 * bat:.1f} ms with the blocks batched (x{sep / bat:.2f})")
    fused, naive = _block_ratio()
    print(f"\nLiResNet block (32 channels, 16x16, s = 1/sqrt 6, kernel x3): fused-kernel constant {fused:.4f}, "
          f"1 + ||s K|| = {naive:.4f}, ratio {fused / naive:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
