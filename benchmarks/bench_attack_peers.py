"""Benchmark: lipverify's attacks side by side with the public attack libraries, same models and inputs.

For every public model of the third-party data folder (MNIST and CIFAR-10; the CIFAR models with their
outside normalisation, attacked in pixel space) and each norm, on the first ``--n`` correctly
classified test images, box [0, 1]:

* **minimum-norm radius per input**: ``lipverify.attacks.min_norm_radius`` (``--strength``) against the
  best of foolbox FMN (1000 steps), foolbox DDN (1000 steps, l2), foolbox C&W (l2) and torchattacks FAB
  (multi-targeted).  Every peer point is re-checked in float64 (inside the box, misclassified:
  ``max_{i != y} f_i > f_y``); a point that fails counts as "none found".  Printed: the median and max
  of ``r_lipverify / r_best_peer`` and the share of inputs where lipverify is more than 2% larger.
* **robust accuracy at a fixed eps**: ``lipverify.attacks.ensemble_attack`` against torchattacks'
  AutoAttack (standard version), AutoAttack's points re-checked in float64 (inside the ball and the
  box, misclassified), and both times.

The peers are optional (``pip install ".[bench]"``); without them the script says so and only runs
lipverify.  Run with one thread for comparable timings::

    OMP_NUM_THREADS=1 python benchmarks/bench_attack_peers.py --n 40
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lipverify  # noqa: E402
from lipverify.attacks import ensemble_attack, min_norm_radius  # noqa: E402
from lipverify.attacks.verify import Judge  # noqa: E402

MNIST_EPS = {"2": 1.0, "inf": 0.1}
CIFAR_EPS = {"2": 0.25, "inf": 2 / 255}


def _data_root() -> Path | None:
    roots = [Path(os.environ["LIPVERIFY_REALDATA"])] if os.environ.get("LIPVERIFY_REALDATA") else []
    roots.append(Path(__file__).resolve().parent.parent.parent / "shared" / "data")
    for r in roots:
        if (r / "models").is_dir():
            return r
    return None


def _models(root: Path, names):
    arch = str(Path(__file__).resolve().parent.parent / "examples" / "architectures.py")
    table = {
        "mnist-net_256x2": lambda: lipverify.load(root / "models/onnx/mnist-net_256x2.onnx"),
        "Convnet_maxpool": lambda: lipverify.load(root / "models/onnx/Convnet_maxpool.onnx"),
        "kw_mnist": lambda: lipverify.load(root / "models/pytorch/kw_mnist.pth", arch=f"{arch}:kw_mnist",
                                           input_shape="1,28,28"),
        "cifar_base_kw": lambda: lipverify.load(root / "models/onnx/cifar_base_kw.onnx", mean="0.485,0.456,0.406",
                                                std="0.225"),
        "resnet_2b": lambda: lipverify.load(root / "models/onnx/resnet_2b.onnx", mean="0.4914,0.4822,0.4465",
                                            std="0.2471,0.2435,0.2616"),
    }
    for n in names:
        yield n, table[n]()


class _Flat(torch.nn.Module):
    """The model on image-shaped inputs with (B, m) logits, for every library alike."""

    def __init__(self, m, input_shape):
        super().__init__()
        self.m = m
        self.input_shape = tuple(input_shape)

    def forward(self, z):
        out = self.m(z.reshape((z.shape[0],) + self.input_shape))
        return out.reshape(out.shape[0], -1)


def _check64(model64, x, y, z, norm, eps=None):
    """float64 re-check of peer points: in the box, misclassified, (in the ball).  Returns radius or inf."""
    with torch.no_grad():
        lg = model64(z.double())
        lg = lg.reshape(lg.shape[0], -1)
    fy = lg.gather(1, y[:, None]).squeeze(1)
    other = lg.scatter(1, y[:, None], -math.inf).amax(1)
    d = (z.double() - x.double()).flatten(1)
    r = d.norm(dim=1) if norm == "2" else d.abs().amax(dim=1)
    ok = (other > fy) & (z >= 0).flatten(1).all(1) & (z <= 1).flatten(1).all(1)
    if eps is not None:
        ok &= r <= eps
    return torch.where(ok, r, torch.full_like(r, math.inf))


def _peers_min_norm(model, model64, x, y, norm, n_classes):
    out = {}
    try:
        import foolbox as fb
    except ImportError:
        fb = None
    try:
        import torchattacks
    except ImportError:
        torchattacks = None
    if fb is not None:
        fmodel = fb.PyTorchModel(model, bounds=(0, 1))
        crit = fb.criteria.Misclassification(y)
        attacks = {"foolbox FMN-1000": (fb.attacks.L2FMNAttack(steps=1000) if norm == "2"
                                        else fb.attacks.LInfFMNAttack(steps=1000))}
        if norm == "2":
            attacks["foolbox DDN-1000"] = fb.attacks.DDNAttack(steps=1000)
            attacks["foolbox C&W"] = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=9, steps=500)
        for name, atk in attacks.items():
            t0 = time.perf_counter()
            _, z, _ = atk(fmodel, x, crit, epsilons=None)
            out[name] = (_check64(model64, x, y, z, norm), time.perf_counter() - t0)
    if torchattacks is not None:
        t0 = time.perf_counter()
        atk = torchattacks.FAB(model, norm="L2" if norm == "2" else "Linf", eps=(28.0 if norm == "2" else 1.0),
                               steps=100, n_restarts=1, multi_targeted=True, n_classes=n_classes, seed=0)
        z = atk(x, y)
        out["torchattacks FAB"] = (_check64(model64, x, y, z, norm), time.perf_counter() - t0)
    return out


def _autoattack(model, model64, x, y, norm, eps, n_classes):
    try:
        import torchattacks
    except ImportError:
        return None
    t0 = time.perf_counter()
    atk = torchattacks.AutoAttack(model, norm="L2" if norm == "2" else "Linf", eps=eps, version="standard",
                                  n_classes=n_classes, seed=0)
    z = atk(x, y)
    dt = time.perf_counter() - t0
    # AutoAttack clamps to x +- eps in float32, which can leave the ball by a rounding error: repair it the
    # way lipverify repairs its own points, then check
    judge = Judge(model, x, (0.0, 1.0), model64)
    z = judge.snap_into_ball(x, z.detach(), torch.full((len(x),), float(eps), dtype=torch.float64), norm)
    broken = torch.isfinite(_check64(model64, x, y, z, norm, eps=eps))
    return float((~broken).double().mean()), dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--models", default="mnist-net_256x2,Convnet_maxpool,kw_mnist,cifar_base_kw,resnet_2b")
    ap.add_argument("--norms", default="2,inf")
    ap.add_argument("--strength", default="standard")
    ap.add_argument("--no-peers", action="store_true", help="only lipverify")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    root = _data_root()
    if root is None:
        print("third-party data not found (set LIPVERIFY_REALDATA or place ../shared/data): nothing to run")
        return 0
    have = []
    for lib in ("foolbox", "torchattacks"):
        try:
            __import__(lib)
            have.append(lib)
        except ImportError:
            print(f"note: {lib} is not installed (pip install '.[bench]'): its columns are skipped")
    if args.no_peers:
        have = []
    mnist = np.load(root / "data/mnist_test_1000.npz")
    cifar = np.load(root / "data/cifar10_test_100.npz")
    rows = []
    for name, lm in _models(root, args.models.split(",")):
        src = cifar if lm.input_shape[0] == 3 else mnist
        x_all = torch.from_numpy(src["x"][:400]).float()
        y_all = torch.from_numpy(src["y"][:400]).long()
        with torch.no_grad():
            ok = lm(x_all.reshape((-1,) + lm.input_shape)).argmax(1) == y_all
        x, y = x_all[ok][: args.n], y_all[ok][: args.n]
        model = _Flat(lm.module, lm.input_shape).eval()
        model64 = _Flat(lm.module_double(), lm.input_shape).eval()
        for norm in args.norms.split(","):
            eps = (CIFAR_EPS if lm.input_shape[0] == 3 else MNIST_EPS)[norm]
            g = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            ours = min_norm_radius(model, x, y, norm=norm, clip=(0.0, 1.0), strength=args.strength, generator=g,
                                   forward64=model64)
            t_ours = time.perf_counter() - t0
            peers = _peers_min_norm(model, model64, x, y, norm, lm.n_classes) if have else {}
            line = f"{name:16s} l{norm:3s} lipverify min-norm {t_ours:6.1f} s"
            if peers:
                best = torch.stack([r for r, _ in peers.values()]).min(dim=0).values
                ratio = (ours.radius / best).numpy()
                fin = np.isfinite(ratio)
                worse = float(np.mean(~(ratio <= 1.02)))
                line += (f" | ratio vs best peer median {np.median(ratio[fin]):.4f} max {np.max(ratio[fin]):.4f}"
                         f" | >2% worse {100 * worse:.1f}%")
                wins = {k: int((r <= ours.radius * (1 - 0.02)).sum()) for k, (r, _) in peers.items()}
                line += " | peer wins " + ", ".join(f"{k} {v}" for k, v in wins.items())
                line += " | peer times " + ", ".join(f"{k} {t:.1f}s" for k, (_, t) in peers.items())
            print(line, flush=True)
            t0 = time.perf_counter()
            ens = ensemble_attack(model, x, y, eps, norm=norm, clip=(0.0, 1.0), strength=args.strength,
                                  generator=g, forward64=model64)
            t_ens = time.perf_counter() - t0
            # consistency: a min-norm point within eps breaks the input too
            broken = ens.broken | (ours.radius <= eps)
            ra = float((~broken).double().mean())
            aa = _autoattack(model, model64, x, y, norm, eps, lm.n_classes) if "torchattacks" in have else None
            line = f"{name:16s} l{norm:3s} eps {eps:.4g}: robust acc lipverify {ra:.3f} ({t_ens:.1f} s)"
            if aa is not None:
                line += f" vs AutoAttack {aa[0]:.3f} ({aa[1]:.1f} s) | time ratio {t_ens / max(aa[1], 1e-9):.2f}"
            print(line, flush=True)
            rows.append((name, norm, eps, ra, aa))
    return 0


if __name__ == "__main__":
    sys.exit(main())
