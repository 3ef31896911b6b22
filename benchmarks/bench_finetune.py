"""Benchmark: certified fine-tuning of a third-party MNIST classifier on a CPU.

Three measurements (none of them is a timed test; numbers depend on the machine and its load):

1. **Step-time overhead.**  One training step with the differentiable GloRo bound (power iteration on
   the model's Lipschitz graph, margin constants, GloRo cross-entropy) against a plain cross-entropy
   step on the same model and batch (``--batch-size``, default 256), median of ``--steps`` steps after a
   warm-up; also EMMA, TRADES and the local-bound loss.  Target: GloRo <= 1.5 x plain.
2. **The headline run.**  ``lipverify finetune`` (the real CLI, in a subprocess, wall time included
   loading, the sound before/after evaluation, export and re-import) on ``kw_mnist.pth`` (Wong-Kolter
   certifiably trained CNN, input 1x28x28, raw pixels) with ``mnist_train_5k.npz``, evaluated on
   ``mnist_test_1000.npz`` at l2 eps = 0.3.  Target: >= 85% VRA within 15 minutes on a 2-core CPU.
3. **Loss comparison.**  GloRo CE vs TRADES vs EMMA with the same recipe and epoch budget, one table
   (``--compare-epochs``, default the headline's 200; ``--skip-compare`` to leave it out).

Recipe (the result of a small search on this machine, all through the CLI): keep the model's ReLUs
(swapping them for MinMax destroys the pretrained features and needs far more epochs), GloRo-TRADES
with lambda ramped 0.1 -> 2, training eps ramped logarithmically to 1.2 x 0.3 over half the run, Adam
lr 3e-3 with warm-up and cosine decay, batch 256, random shifts of 1 pixel, 200 epochs.

The data folder is ``../shared/data`` next to the repository (or ``--realdata`` / ``LIPVERIFY_REALDATA``).

Example::

    python benchmarks/bench_finetune.py --threads 1
    python benchmarks/bench_finetune.py --quick          # a few minutes: shorter runs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

#: the recipe of the headline run (found by a small search on this machine; ReLU kept, see the report)
COMMON = ["--eps-schedule", "log", "--eps-mult", "1.2", "--batch-size", "256", "--lr", "3e-3", "--power-iters", "2",
          "--augment", "crop:1"]
LOSS_ARGS = {"GloRo CE": lambda e: ["--loss", "gloro"],
             "TRADES": lambda e: ["--loss", "trades", "--trades-lambda", f"0.1,2,{e}"],
             "EMMA": lambda e: ["--loss", "emma"]}
HEADLINE = "TRADES"
HEADLINE_EPOCHS = 200


def recipe(loss: str, epochs: int) -> list[str]:
    return COMMON + ["--epochs", str(epochs)] + LOSS_ARGS[loss](epochs)


def realdata_dir(arg: str | None) -> Path:
    for c in (arg, os.environ.get("LIPVERIFY_REALDATA"), str(ROOT.parent / "shared" / "data")):
        if c and (Path(c) / "models").is_dir():
            return Path(c)
    sys.exit("real data folder not found: pass --realdata DIR")


# ------------------------------------------------------------------------------------------------------
# 1. step-time overhead


def step_overhead(data: Path, batch: int, steps: int, threads: int) -> dict:
    import lipverify
    from lipverify.importers.normalize import PixelSpaceModel
    from lipverify.train import surgery
    from lipverify.train.local import LocalBound
    from lipverify.train.loop import TrainConfig, TrainStep
    from lipverify.train.trainable import (
        GloroBound,
        build_trainable_graph,
        select_trainable,
    )

    torch.set_num_threads(threads)
    lm = lipverify.load(str(data / "models" / "pytorch" / "kw_mnist.pth"),
                        arch=f"{ROOT / 'examples' / 'architectures.py'}:kw_mnist", input_shape=(1, 28, 28))
    d = np.load(data / "data" / "mnist_train_5k.npz")
    g = np.random.default_rng(0)
    idx = g.choice(len(d["y"]), batch, replace=False)
    x, y = torch.tensor(d["x"][idx]), torch.tensor(d["y"][idx])

    def setup(loss):
        gm = copy.deepcopy(lm.module.model)
        if loss == "local":
            surgery.swap_relu(gm, "clip", x)
        net = PixelSpaceModel(gm, None)
        graph = build_trainable_graph(gm, (1, 28, 28))
        b = GloroBound(net, graph, power_iters=2)
        select_trainable(net, graph)
        loc = LocalBound(b, gm, None, batch, power_iters=2) if loss == "local" else None
        step = TrainStep(b, TrainConfig(loss=loss), loc)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], 1e-3)
        return net, step, opt

    def plain():
        net, _, opt = setup("gloro")

        def f():
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return f

    def robust(loss):
        _, step, opt = setup(loss)
        ii = torch.arange(batch)

        def f():
            out = step(x, y, 0.3, 1.0, ii)
            opt.zero_grad()
            out[0].backward()
            opt.step()
        return f

    fns = {"plain CE": plain(), "gloro": robust("gloro"), "trades": robust("trades"), "emma": robust("emma"),
           "local": robust("local")}
    for f in fns.values():
        for _ in range(5):
            f()
    times = {k: [] for k in fns}
    # interleave the measurements so that machine load affects every variant alike
    for _ in range(steps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {"batch": batch, "threads": threads, "steps": steps, "median_ms": med,
            "ratio_vs_plain": {k: med[k] / med["plain CE"] for k in med}}


# ------------------------------------------------------------------------------------------------------
# 2./3. CLI runs


def finetune_run(data: Path, out: Path, extra: list[str], threads: int, eps: float) -> dict:
    cmd = [sys.executable, "-m", "lipverify", "finetune", str(data / "models" / "pytorch" / "kw_mnist.pth"),
           "--arch", f"{ROOT / 'examples' / 'architectures.py'}:kw_mnist", "--input-shape", "1,28,28",
           "--data", str(data / "data" / "mnist_train_5k.npz"),
           "--eval-data", str(data / "data" / "mnist_test_1000.npz"),
           "--eps", str(eps), "--out", str(out), "--force", "--threads", str(threads), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"finetune failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    key = f"{eps:.6g}"
    return {"wall_s": wall, "clean_before": rep["before"]["clean_accuracy"], "vra_before": rep["before"]["vra"][key],
            "clean_after": rep["after"]["clean_accuracy"], "vra_after": rep["after"]["vra"][key],
            "bound_before": rep["before"]["global_bound"], "bound_after": rep["after"]["global_bound"],
            "train_s": rep["time_s"]["train"], "per_epoch_s": rep["time_s"]["per_epoch"],
            "epochs": len(rep["history"]), "args": extra, "table": proc.stdout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--realdata", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant for the overhead")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=None, help="override the headline recipe's epochs")
    ap.add_argument("--compare-epochs", type=int, default=HEADLINE_EPOCHS)
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--skip-headline", action="store_true")
    ap.add_argument("--quick", action="store_true", help="short runs (overhead + 30-epoch comparisons)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lipverify_bench_finetune"))
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    a = ap.parse_args()
    data = realdata_dir(a.realdata)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": a.threads}}

    print("== 1. step time: GloRo bound vs plain cross-entropy (kw_mnist, batch "
          f"{a.batch_size}, {a.threads} thread(s)) ==")
    ov = step_overhead(data, a.batch_size, a.steps if not a.quick else 10, a.threads)
    results["overhead"] = ov
    for k, v in ov["median_ms"].items():
        print(f"  {k:<10} {v:8.2f} ms/step   x{ov['ratio_vs_plain'][k]:.2f}")

    epochs = a.epochs or (30 if a.quick else HEADLINE_EPOCHS)
    head = None
    if not a.skip_headline:
        print("\n== 2. headline: lipverify finetune kw_mnist.pth, 5k MNIST train, 1000 test, l2 eps 0.3 ==")
        rec = recipe(HEADLINE, epochs)
        print("  recipe: " + " ".join(rec))
        head = finetune_run(data, work / "headline", rec, a.threads, 0.3)
        results["headline"] = {k: v for k, v in head.items() if k != "table"}
        print(head["table"])
        print(f"  VRA@0.3 {100 * head['vra_before']:.1f}% -> {100 * head['vra_after']:.1f}% (re-verified), clean "
              f"{100 * head['clean_before']:.1f}% -> {100 * head['clean_after']:.1f}%, wall "
              f"{head['wall_s'] / 60:.1f} min ({head['epochs']} epochs, {head['per_epoch_s']:.2f} s/epoch)")

    if not a.skip_compare:
        ce = 30 if a.quick else a.compare_epochs
        print(f"\n== 3. loss comparison: the headline recipe with each loss, {ce} epochs each ==")
        rows = []
        for name in LOSS_ARGS:
            if head is not None and name == HEADLINE and ce == epochs:
                r = head
            else:
                r = finetune_run(data, work / name.replace(" ", "_"), recipe(name, ce), a.threads, 0.3)
            rows.append((name, r))
        results["compare"] = {n: {k: v for k, v in r.items() if k != "table"} for n, r in rows}
        print(f"  {'loss':<10}{'clean':>8}{'VRA@0.3':>10}{'bound':>9}{'train s':>9}{'wall s':>8}")
        for n, r in rows:
            print(f"  {n:<10}{100 * r['clean_after']:>7.1f}%{100 * r['vra_after']:>9.1f}%{r['bound_after']:>9.3g}"
                  f"{r['train_s']:>9.0f}{r['wall_s']:>8.0f}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
