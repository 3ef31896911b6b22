"""One process against ``torchrun --nproc_per_node 2``, measured side by side in one run.

Each case runs the CLI twice on the same data: one process with two threads, and two ``torchrun``
ranks with one thread each (gloo).  Printed: both wall times (process start included), the speed-up,
and whether the JSON agrees — every field except the timings and notes; per input the prediction,
the certificates and the radius (exactly with ``--precision float64``; with float32 logits the
ranks' batch shapes round differently, so radii agree within the rounding bound and certificates
exactly).

    python benchmarks/bench_sharded.py [--data ../shared/data] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def run(args: list[str], procs: int) -> tuple[float, dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(2 // procs), PYTHONPATH=str(ROOT))
    if procs == 1:
        cmd = [sys.executable, "-m", "lipverify"] + args
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
            "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "lipverify"] + args
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({p.returncode}): {p.stderr[-2000:]}")
    return dt, json.loads(p.stdout)


def agree(a: dict, b: dict, exact: bool) -> str:
    """How the two results compare (``identical``, ``radii within ...``, or the first difference)."""
    skip = {"time_s", "total_time_s", "time_label", "notes", "inputs", "median_radius"}
    for k in sorted(set(a) | set(b)):
        if k not in skip and a.get(k) != b.get(k):
            return f"differs in {k}"
    worst = 0.0
    for ra, rb in zip(a["inputs"], b["inputs"]):
        for k in ("pred", "certified", "certified_at", "label"):
            if ra.get(k) != rb.get(k):
                return f"input {ra.get('index')}: {k} differs"
        x, y = ra.get("radius", 0.0), rb.get("radius", 0.0)
        worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-300))
    if len(a["inputs"]) != len(b["inputs"]):
        return "different numbers of inputs"
    if worst == 0.0:
        return "identical"
    return f"certificates identical, radii within {worst:.1e} (relative)" if not exact else \
        f"radii differ by {worst:.1e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("LIPVERIFY_REALDATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    data = Path(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="lipverify-bench-"))
    try:
        from lipverify.models.zoo import default_samples

        xs, ys = default_samples()
        dflt = tmp / "default.npz"
        np.savez(dflt, x=xs.repeat(40, 1, 1, 1)[:2000].numpy(), y=ys.repeat(40)[:2000].numpy())
        cases = [("builtin:default certify (float32), 2000", ["certify", "--data", str(dflt), "--eps", "0.1,0.3"], False),
                 ("builtin:default certify --precision float64, 2000",
                  ["certify", "--data", str(dflt), "--eps", "0.1,0.3", "--precision", "float64"], True),
                 ("builtin:default attack --strength fast, 64",
                  ["attack", "--data", str(dflt), "--limit", "64", "--eps", "0.5,1.0", "--strength", "fast",
                   "--batch-size", "16"], True)]
        model = data / "models" / "onnx" / "mnist-net_256x2.onnx"
        if model.exists():
            mn = np.load(data / "data" / "mnist_test_1000.npz")
            mnist = tmp / "mnist.npz"
            np.savez(mnist, x=mn["x"][:203], y=mn["y"][:203])
            cases.append(("mnist-net_256x2 certify --method local, 203",
                          ["certify", str(model), "--data", str(mnist), "--eps", "0.02,0.05", "--method", "local"],
                          False))
        print(f"{'case':52s} {'1 process (s)':>13s} {'2 ranks (s)':>11s} {'speed-up':>8s}  result")
        for name, cli, exact in cases:
            cli = cli + ["--json", "--quiet"]
            best1 = best2 = float("inf")
            for _ in range(args.repeats):
                t1, one = run(cli, 1)
                t2, two = run(cli, 2)
                best1, best2 = min(best1, t1), min(best2, t2)
            print(f"{name:52s} {best1:13.1f} {best2:11.1f} {best1 / best2:8.2f}  {agree(one, two, exact)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
