"""What the checks on third-party files cost, side by side with the library calls they guard, in one run.

For each file kind, prints the time of lipverify's checks next to the time of the plain library load
they run before (best of ``--repeat``), and the ratio checks / load:

* ONNX (the public models of the data folder, and torchvision's resnet18 exported the usual way):
  reading with the external-data and tensor checks plus the memory estimate from shape inference,
  against ``onnx.load`` + an onnxruntime session + the conversion to torch (normalisation and
  onnx2torch);
* ``.pt2`` (resnet18 through ``torch.export``): the archive inspection against ``torch.export.load``;
* ``.npz`` (MNIST test images, or a random set of the same size): ``load_data`` (headers first, sizes
  checked, then the arrays) against ``numpy.load`` of the same arrays;
* VNN-LIB (every competition spec of the data folder, and a synthetic file of 10^6 assertions):
  lipverify's linear-time parser; the plain read of the bytes is the reference.

    python benchmarks/bench_safety.py [--data ../shared/data] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lipverify.data import load_data  # noqa: E402
from lipverify.data.vnnlib import parse_vnnlib, read_text  # noqa: E402
from lipverify.importers.onnx_memory import estimate_memory  # noqa: E402
from lipverify.importers.onnx_safety import read_model  # noqa: E402
from lipverify.importers.pt2_check import inspect_pt2  # noqa: E402


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def row(name, checks, load, what):
    print(f"{name:28s} {checks * 1e3:10.1f} {load * 1e3:10.1f} {checks / load:8.3f}  {what}")


def onnx_case(path: Path, shape, repeat):
    import onnx
    import onnxruntime as ort

    from lipverify.importers.onnx import convert_onnx

    def checks():
        model, _, _ = read_model(path)
        estimate_memory(model, None, shape, str(path), [(2, "import", True), (8, "fidelity", False)])

    def plain():
        m = onnx.load(str(path))
        so = ort.SessionOptions()
        so.log_severity_level = 4
        ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert_onnx(m, path)

    row(path.name, best(checks, repeat), best(plain, repeat), "checks vs onnx.load + ort session + conversion")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    data = Path(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="bench_safety."))
    print(f"{'file':28s} {'checks ms':>10s} {'load ms':>10s} {'ratio':>8s}")

    # ONNX
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    r18 = tmp / "resnet18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 3, 64, 64), str(r18), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "b"}})
    onnx_case(r18, (3, 64, 64), args.repeat)
    shapes = {"mnist-net_256x2.onnx": (1, 28, 28), "cifar_base_kw.onnx": (3, 32, 32),
              "Convnet_maxpool.onnx": (1, 28, 28), "resnet_2b.onnx": (3, 32, 32)}
    for name, shape in shapes.items():
        p = data / "models" / "onnx" / name
        if p.is_file():
            try:
                onnx_case(p, shape, args.repeat)
            except Exception as exc:  # a model whose declared shape differs: say so, go on
                print(f"{name:28s} skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:60]})")

    # .pt2
    ep = torch.export.export(net, (torch.zeros(2, 3, 64, 64),),
                             dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=1024)}})
    pt2 = tmp / "resnet18.pt2"
    torch.export.save(ep, str(pt2))
    raw = pt2.read_bytes()
    row("resnet18.pt2", best(lambda: inspect_pt2(raw, pt2), args.repeat),
        best(lambda: torch.export.load(io.BytesIO(raw)), args.repeat), "inspection vs torch.export.load")

    # .npz
    npz = data / "data" / "mnist_test_1000.npz"
    if not npz.is_file():
        npz = tmp / "mnist_like.npz"
        np.savez(npz, x=np.random.rand(1000, 1, 28, 28).astype(np.float32), y=np.arange(1000) % 10)

    def np_plain():
        with np.load(npz) as f:
            return f["x"].astype(np.float32), f["y"]

    row(npz.name, best(lambda: load_data(npz, (1, 28, 28)), args.repeat), best(np_plain, args.repeat),
        "load_data vs numpy.load (both decompress every array)")

    # VNN-LIB
    specs = sorted((data / "vnnlib").rglob("*.vnnlib")) if (data / "vnnlib").is_dir() else []
    if specs:
        def parse_all():
            for s in specs:
                parse_vnnlib(s, read_text(s))

        def read_all():
            for s in specs:
                s.read_bytes().decode()

        row(f"{len(specs)} competition specs", best(parse_all, args.repeat), best(read_all, args.repeat),
            "parse vs reading the bytes")
    big = tmp / "big.vnnlib"
    n = 10 ** 6
    lines = ["(declare-const X_0 Real)", "(declare-const Y_0 Real)", "(declare-const Y_1 Real)"]
    lines += ["(assert (<= X_0 0.5))"] * (n // 2) + ["(assert (>= X_0 0.25))"] * (n // 2)
    lines.append("(assert (>= Y_1 Y_0))")
    big.write_text("\n".join(lines))
    row("10^6 asserts", best(lambda: parse_vnnlib(big, read_text(big)), 1),
        best(lambda: big.read_bytes().decode(), 1), "parse vs reading the bytes")
    for f in tmp.iterdir():
        os.unlink(f)
    tmp.rmdir()


if __name__ == "__main__":
    main()
