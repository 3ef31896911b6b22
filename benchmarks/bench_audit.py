"""How long a newcomer waits: ``lipverify --help`` and ``lipverify audit`` with the defaults.

Cases, measured side by side in one run (each in its own process, one after the other):

* ``lipverify --help`` and ``--version`` (median of 5), next to ``python -c "import torch"``: the
  command line must not pay for torch before it has work to do;
* ``lipverify audit --data mnist100.npz`` on the built-in model (100 MNIST test images, defaults);
* ``lipverify audit resnet18_mnist.onnx --data mnist100.npz``: torchvision's resnet18 with a 1-channel
  first convolution (11M parameters), trained the normal way for ``--epochs`` (default 1) with plain
  cross-entropy on ``mnist_train_5k`` (shuffled with a fixed seed: the file is sorted by class) and
  exported the standard way (``torch.onnx.export(..., dynamo=False, opset_version=17)``), same 100 images,
  defaults;
* with ``--unbudgeted``: the built-in model again with ``--time-budget none`` (everything as asked:
  the reference the budget trades against).

For each audit: wall time of the process, the time of every step (``report.json``), the attack
strength the budget chose, and the headline line.  Targets of the issue that asked for it: resnet18
under 3 minutes, the built-in model under 30 s, ``--help`` under 1 s, on a 2-core CPU with nothing else
running.

    python benchmarks/bench_audit.py                  # all of it (about 5 minutes on 2 cores)
    python benchmarks/bench_audit.py --skip-resnet    # --help and the built-in model only

Needs the shared data (``LIPVERIFY_REALDATA`` or ``../shared/data``).  Nothing is a timed test; the
numbers go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_finetune_zoo import one_channel  # noqa: E402

LIPVERIFY = [sys.executable, "-m", "lipverify"]


def data_dir() -> Path:
    env = os.environ.get("LIPVERIFY_REALDATA")
    for d in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]:
        if (d / "data" / "mnist_train_5k.npz").exists():
            return d / "data"
    sys.exit("bench_audit: the shared data (mnist_train_5k.npz) is missing: set LIPVERIFY_REALDATA")


def timed(cmd, env=None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, p


def median_time(cmd, k: int = 5) -> float:
    return statistics.median(timed(cmd)[0] for _ in range(k))


def train_resnet18(data: Path, epochs: int, seed: int = 0) -> tuple[nn.Module, float, float]:
    """resnet18 (torchvision, 10 classes, 1-channel stem) trained with cross-entropy; returns the net in
    eval mode, its accuracy on mnist_test_1000 and the training seconds."""
    import torchvision

    torch.manual_seed(seed)
    tr = np.load(data / "mnist_train_5k.npz")
    x, y = torch.from_numpy(tr["x"]).float(), torch.from_numpy(tr["y"]).long()
    if x.max() > 1.5:
        x = x / 255
    x = x.reshape(len(x), 1, 28, 28)
    net = one_channel(torchvision.models.resnet18(num_classes=10))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    train_s = time.perf_counter() - t0
    net.eval()
    te = np.load(data / "mnist_test_1000.npz")
    xt = torch.from_numpy(te["x"]).float().reshape(-1, 1, 28, 28)
    xt = xt / 255 if xt.max() > 1.5 else xt
    with torch.no_grad():
        acc = float((net(xt).argmax(1) == torch.from_numpy(te["y"]).long()).float().mean())
    return net, acc, train_s


def audit(label: str, args: list[str], out: Path) -> dict:
    wall, p = timed(LIPVERIFY + ["audit"] + args + ["--out", str(out)])
    row = {"case": label, "wall_s": wall, "rc": p.returncode}
    if p.returncode != 0:
        row["error"] = (p.stderr.strip().splitlines() or ["?"])[-1]
        return row
    rep = json.loads((out / "report.json").read_text())
    row["steps"] = rep.get("step_times", {})
    row["strength"] = rep.get("strength", "")
    row["n"] = len(rep.get("inputs", []))
    row["headline"] = rep.get("headline", "")
    row["budget"] = (rep.get("plan") or {}).get("budget_s")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--unbudgeted", action="store_true", help="also the built-in model with --time-budget none")
    a = ap.parse_args()
    data = data_dir()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")

    t_help = median_time(LIPVERIFY + ["--help"])
    t_version = median_time(LIPVERIFY + ["--version"])
    t_torch = median_time([sys.executable, "-c", "import torch"])
    print(f"\nlipverify --help     {t_help:6.2f} s   (target < 1 s)")
    print(f"lipverify --version  {t_version:6.2f} s")
    print(f"import torch         {t_torch:6.2f} s   (--help / import torch: {t_help / t_torch:.2f}x)")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        te = np.load(data / "mnist_test_1000.npz")
        x100 = te["x"][:100].astype(np.float32).reshape(100, 1, 28, 28)
        x100 = x100 / 255 if x100.max() > 1.5 else x100
        np.savez(tmp / "mnist100.npz", x=x100, y=te["y"][:100].astype(np.int64))
        d100 = str(tmp / "mnist100.npz")
        rows.append(audit("built-in model, defaults", ["--data", d100], tmp / "a1"))
        if a.unbudgeted:
            rows.append(audit("built-in model, --time-budget none", ["--data", d100, "--time-budget", "none"],
                              tmp / "a2"))
        if not a.skip_resnet:
            net, acc, train_s = train_resnet18(data, a.epochs)
            onnx_path = tmp / "resnet18_mnist.onnx"
            torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(onnx_path), dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
            n_params = sum(p.numel() for p in net.parameters())
            print(f"\nresnet18 (1-channel stem, {n_params / 1e6:.1f}M parameters): {a.epochs} epoch(s) in "
                  f"{train_s:.0f} s, test accuracy {acc:.3f} on mnist_test_1000")
            del net
            rows.append(audit("resnet18, defaults", [str(onnx_path), "--data", d100], tmp / "a3"))

    print(f"\n{'case':36} {'wall s':>7} {'target':>7}  steps (s)")
    for r in rows:
        target = "30" if r["case"].startswith("built-in model, defaults") else "180" if "resnet" in r["case"] else "-"
        if r["rc"]:
            print(f"{r['case']:36} {r['wall_s']:7.1f} {target:>7}  exit {r['rc']}: {r['error']}")
            continue
        steps = ", ".join(f"{k} {v:.1f}" for k, v in r["steps"].items())
        print(f"{r['case']:36} {r['wall_s']:7.1f} {target:>7}  {steps}")
        budget = f"{r['budget']:.0f} s" if r["budget"] else "none"
        print(f"{'':36} {'':15}  n={r['n']}, attack strength {r['strength'] or '-'}, budget {budget}")
        print(f"{'':36} {'':15}  {r['headline']}")


if __name__ == "__main__":
    main()
