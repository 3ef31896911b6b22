"""ImageNet scale: a ResNet-50 (torchvision, random weights, 224x224, 1000 classes) through the CLI.

1. ``lipverify bounds resnet50.onnx --json`` (the export users run: ``torch.onnx.export(...,
   dynamo=False, opset_version=17)``): wall time and peak resident memory of that process (``wait4``),
   the sound global bound.
2. The margin constants of that run against ``K`` from the materialised affine tail (``T``: 1000 x
   100352, what lipverify computed before; here in the benchmark's own process): the largest relative
   difference.
3. ``lipverify certify`` on a batch of 224x224 inputs: time, peak memory, inputs per second, next to
   float32 inference of the same model in this process.

    python benchmarks/bench_scale.py [--batch 16] [--threads 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_cli(args, env) -> tuple[dict, float, float]:
    """(JSON output, wall seconds, peak RSS in GiB) of ``python -m lipverify ARGS``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "lipverify"] + args, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        text, msg = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"lipverify {' '.join(args)} failed ({proc.returncode}): {msg[-2000:]}")
    return json.loads(text), wall, usage.ru_maxrss / 2 ** 20  # kB -> GiB (Linux)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="224x224 inputs to certify")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", default=None, help="folder for the ONNX file and data (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import torchvision

    import lipverify
    from lipverify.bounds.global_bound import pairwise_distances, tail_matrix

    work = Path(args.keep or tempfile.mkdtemp(prefix="lipverify-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = torchvision.models.resnet50().eval()
    onnx_path = work / "resnet50.onnx"
    if not onnx_path.exists():
        torch.onnx.export(net, (torch.zeros(1, 3, 224, 224),), str(onnx_path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))

    rep, wall, peak = run_cli(["bounds", str(onnx_path), "--json"], env)
    print(f"bounds: sound global l2 bound {rep['global']['value']:.10e} in {wall:.1f} s, peak {peak:.2f} GiB")
    K_cli = torch.tensor(rep["margin"]["K"], dtype=torch.float64)
    print(f"        margin constants: {rep['margin']['method'][:90]}...")

    lm = lipverify.load(str(onnx_path))
    consts = lm.node_constants("2")
    T, h = tail_matrix(lm.graph)
    K_T = pairwise_distances(T, "2") * consts[h].cumulative.value * (1 + 1e-6)
    off = (K_T > 0) & ~torch.eye(len(K_T), dtype=torch.bool)  # K_ii = 0; the Gram bound's diagonal is not
    rel = float(((K_cli - K_T).abs()[off] / K_T[off]).max())
    print(f"        K (last dense layer x ||pooling||) vs K (materialised 1000 x {T.shape[1]} tail): "
          f"max relative difference {rel:.2e}")
    del T, K_T

    x = torch.rand(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = lm.module(x).argmax(1)
        t0 = time.perf_counter()
        lm.module(x)
        t_inf = time.perf_counter() - t0
    data = work / "x224.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    res, wall_c, peak_c = run_cli(["certify", str(onnx_path), "--data", str(data), "--eps", "1e-6", "--json",
                                   "--quiet"], env)
    print(f"certify (CLI): {args.batch} inputs in {wall_c:.1f} s wall (import, constants, certification), "
          f"peak {peak_c:.2f} GiB; certified {sum(r['certified'] for r in res['inputs'])}")
    for note in res["notes"]:
        if "rounding" in note or "float64" in note:
            print(f"         {note}")
    t0 = time.perf_counter()
    lm.margin_constants("2")
    lm.rounded_forward("2")
    t_k = time.perf_counter() - t0
    line = []
    for precision in ("auto", "float64"):
        t0 = time.perf_counter()
        lm.certify(x, y, eps=[1e-6], precision=precision)
        t_c = time.perf_counter() - t0
        line.append(f"{precision} {args.batch / t_c:.2f} inputs/s ({t_inf / t_c:.2f} x inference)")
    print(f"certify (API, constants computed once in {t_k:.1f} s): " + ", ".join(line)
          + f"; float32 inference {args.batch / t_inf:.2f} inputs/s")


if __name__ == "__main__":
    main()
