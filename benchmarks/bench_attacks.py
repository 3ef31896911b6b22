"""Benchmark: fast-minimum-norm radius vs. PGD-bisection radius (and the "auto" combination).

For N correctly classified inputs it runs, in one process,

* ``min_norm_radius(method="fmn")``,
* ``min_norm_radius(method="bisection", steps=1000)`` (PGD with 1000 steps at every bisection stage),
* ``min_norm_radius(method="auto")`` (the standard escalation: FMN, FAB-T, DDN, PGD bisection, box search),

and prints each method's time and radii, plus the per-input ratio ``r_fmn / r_pgd1000`` (median, max,
fraction <= 1.02).  All radii are norms of checked adversarial points, i.e. upper bounds on the true
robust radius: *smaller is better* (a ratio below 1 means FMN found a closer adversarial point).

Model: a small CNN trained for ``--train-seconds`` on ``--data`` (an ``.npz`` with ``x`` (N,1,28,28) in
[0,1] and ``y``), or an ONNX model (``--onnx``, converted with onnx2torch) evaluated on ``--data``.
With neither ``--data`` nor ``LIPVERIFY_REALDATA`` set, the project's sibling ``shared/data`` folder is
tried.

Example::

    python benchmarks/bench_attacks.py --data mnist_train_5k.npz --n 50 --norm 2
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
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lipverify.attacks.minnorm import min_norm_radius  # noqa: E402


def _default_data() -> str | None:
    roots = []
    if os.environ.get("LIPVERIFY_REALDATA"):
        roots.append(Path(os.environ["LIPVERIFY_REALDATA"]))
    roots.append(Path(__file__).resolve().parent.parent.parent / "shared" / "data")
    for r in roots:
        for name in ("mnist_train_5k.npz", "mnist_test_1000.npz"):
            p = r / "data" / name
            if p.exists():
                return str(p)
    return None


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seconds: float, seed: int,
          max_steps: int = 0) -> int:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    t0, steps = time.time(), 0
    while (steps < max_steps) if max_steps > 0 else (time.time() - t0 < seconds):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    model.eval()
    return steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help=".npz with x (N,1,28,28) in [0,1] and y")
    ap.add_argument("--onnx", default=None, help="ONNX model (converted with onnx2torch) instead of training")
    ap.add_argument("--input-shape", default=None,
                    help="comma-separated per-example input shape the model expects, e.g. 784,1")
    ap.add_argument("--n", type=int, default=40, help="number of correctly classified inputs to attack")
    ap.add_argument("--norm", default="2", choices=["2", "inf"])
    ap.add_argument("--train-seconds", type=float, default=20.0)
    ap.add_argument("--train-steps", type=int, default=0,
                    help="train for exactly this many Adam steps instead (reproducible model)")
    ap.add_argument("--fmn-steps", type=int, default=300)
    ap.add_argument("--pgd-steps", type=int, default=1000)
    ap.add_argument("--pgd-restarts", type=int, default=1)
    ap.add_argument("--bisection-iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma-separated methods to skip: fmn,bisection,auto")
    args = ap.parse_args(argv)

    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    data = args.data or _default_data()
    if data is None:
        ap.error("--data is required (no default data folder found)")
    arr = np.load(data)
    x_all = torch.from_numpy(np.asarray(arr["x"], dtype=np.float32))
    y_all = torch.from_numpy(np.asarray(arr["y"]).astype(np.int64))

    perm = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(args.seed))
    x_all, y_all = x_all[perm], y_all[perm]  # some files are sorted by class
    n_eval = min(max(4 * args.n, 500), x_all.shape[0] // 2)
    x_eval, y_eval = x_all[:n_eval], y_all[:n_eval]
    if args.onnx:
        import onnx2torch

        net = onnx2torch.convert(args.onnx).eval()
        desc = f"ONNX {Path(args.onnx).name}"
    else:
        net = small_cnn()
        t0 = time.time()
        steps = train(net, x_all[n_eval:], y_all[n_eval:], args.train_seconds, args.seed, args.train_steps)
        desc = f"small CNN trained {time.time() - t0:.0f}s ({steps} Adam steps, batch 128)"
    for p in net.parameters():
        p.requires_grad_(False)

    if args.input_shape:
        shape = tuple(int(s) for s in args.input_shape.split(","))

        def forward(z):
            return net(z.reshape((z.shape[0],) + shape)).reshape(z.shape[0], -1)
    else:
        def forward(z):
            return net(z)

    with torch.no_grad():
        pred = torch.cat([forward(x_eval[k:k + 256]).argmax(1) for k in range(0, n_eval, 256)])
    acc = float((pred == y_eval).float().mean())
    ok = (pred == y_eval).nonzero().reshape(-1)[: args.n]
    x, y = x_eval[ok], y_eval[ok]
    print(f"model: {desc}; clean accuracy {acc:.3f} on {n_eval} held-out inputs; attacking {len(ok)} "
          f"correctly classified inputs, l{args.norm}, clip [0, 1], {torch.get_num_threads()} thread(s)")
    if len(ok) == 0:
        print("nothing to attack")
        return 1

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results = {}
    runs = [
        ("fmn", dict(method="fmn", steps=args.fmn_steps), f"FMN {args.fmn_steps} steps"),
        ("bisection", dict(method="bisection", steps=args.pgd_steps, restarts=args.pgd_restarts,
                           bisection_iters=args.bisection_iters),
         f"PGD-{args.pgd_steps} bisection ({args.pgd_restarts} restart(s), {args.bisection_iters} iters)"),
        ("auto", dict(method="auto"), "auto (standard escalation: FMN, FAB-T, DDN, PGD bisection)"),
    ]
    for name, kw, label in runs:
        if name in skip:
            continue
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.time()
        res = min_norm_radius(forward, x, y, norm=args.norm, clip=(0.0, 1.0), generator=g, **kw)
        dt = time.time() - t0
        # independent re-check: adversarial and inside the box
        with torch.no_grad():
            lg = forward(res.x_adv).double()
        f_y = lg.gather(1, y[:, None]).squeeze(1)
        other = lg.scatter(1, y[:, None], -math.inf).amax(1)
        fin = torch.isfinite(res.radius)
        assert bool(((other >= f_y) | ~fin).all()), f"{name}: unverified adversarial point"
        assert float(res.x_adv.min()) >= 0 and float(res.x_adv.max()) <= 1
        results[name] = (res.radius, dt, label)

    print()
    print(f"{'method':<58} {'time s':>8} {'found':>6} {'median r':>9} {'mean r':>9}")
    for name, (r, dt, label) in results.items():
        fin = r[torch.isfinite(r)]
        med = float(fin.median()) if fin.numel() else math.inf
        mean = float(fin.mean()) if fin.numel() else math.inf
        print(f"{label:<58} {dt:8.1f} {fin.numel():>3}/{len(r):<2} {med:9.4f} {mean:9.4f}")

    def compare(a: str, b: str):
        if a not in results or b not in results:
            return
        ra, rb = results[a][0], results[b][0]
        both = torch.isfinite(ra) & torch.isfinite(rb) & (rb > 0)
        ratio = (ra[both] / rb[both]).numpy()
        if ratio.size == 0:
            print(f"{a}/{b}: no common finite radii")
            return
        print(f"ratio {a}/{b} over {ratio.size} inputs: median {np.median(ratio):.4f}, "
              f"min {ratio.min():.4f}, max {ratio.max():.4f}, fraction <= 1.02: "
              f"{np.mean(ratio <= 1.02):.3f}")

    print()
    compare("fmn", "bisection")
    compare("auto", "bisection")
    compare("auto", "fmn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
