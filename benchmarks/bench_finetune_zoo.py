"""Conformance benchmark: certified fine-tuning of the torchvision families, trained the normal way.

For each family (``--families``, default every one below): build it with 10 classes and a 1-channel
first convolution of the same kind (stride, padding and pooling of the stem kept, so 28x28 stays
cheap), pre-train it with plain cross-entropy on ``mnist_train_5k`` (shuffled with a fixed seed: the
file is sorted by class) until ``--pretrain-acc`` on ``mnist_test_1000`` or ``--pretrain-epochs``,
export it to ONNX the standard way (``torch.onnx.export(..., dynamo=False, opset_version=17)``, dynamic
batch), then run ``lipverify finetune`` on it through the CLI with the defaults (``--loss emma --eps 0.3
--epochs E``) and report, side by side with ``lipverify train --arch 6c2f`` on the same data and epochs:

* the pre-trained clean accuracy (float32, mnist_test_1000);
* what ``finetune`` did: its exit code, or the one-line refusal;
* clean accuracy and sound VRA@0.3 after (re-verified on the exported ONNX, from report.json);
* the sound global bound before and after; seconds per epoch; peak memory of the finetune process.

    python benchmarks/bench_finetune_zoo.py --families resnet18,mobilenet_v2 --epochs 20 --threads 2
    python benchmarks/bench_finetune_zoo.py --quick      # two families, 2 epochs: a smoke run

Nothing is a timed test; the numbers go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FAMILIES = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
            "shufflenet_v2_x0_5", "regnet_x_400mf", "regnet_y_400mf", "densenet121", "squeezenet1_1", "mnasnet0_5",
            "googlenet", "convnext_tiny"]


def one_channel(net: nn.Module) -> nn.Module:
    """Replace the first 3-channel convolution by a 1-channel one of the same kind (kernel, stride,
    padding, bias): the rest of the network is the standard one."""
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            new = nn.Conv2d(1, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                            m.bias is not None)
            parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return net
    raise ValueError("no 3-channel convolution")


def build(family: str) -> nn.Module:
    import torchvision

    kw = {"weights": None, "num_classes": 10}
    if family == "googlenet":
        kw.update(aux_logits=False, init_weights=True)
    return one_channel(getattr(torchvision.models, family)(**kw))


def export_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    """``torch.onnx.export`` the way users export: ``dynamo=False``, opset 17, a dynamic batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (example,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "b"}})


def load_mnist(data: Path, seed: int = 0):
    with np.load(data / "data" / "mnist_train_5k.npz") as f:
        x, y = f["x"].astype(np.float32), f["y"].astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    with np.load(data / "data" / "mnist_test_1000.npz") as f:
        xt, yt = f["x"].astype(np.float32), f["y"].astype(np.int64)
    shape = (-1, 1, 28, 28)
    return x[perm].reshape(shape), y[perm], xt.reshape(shape), yt


def accuracy(net, x, y) -> float:
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(torch.from_numpy(x[i:i + 500])).argmax(1) for i in range(0, len(x), 500)])
    return float((pred.numpy() == y).mean())


def pretrain(net, x, y, xt, yt, target: float, max_epochs: int, seed: int = 0):
    """Plain cross-entropy, Adam 1e-3, batch 128, until ``target`` test accuracy or ``max_epochs``."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    acc, t0 = 0.0, time.perf_counter()
    for epoch in range(max_epochs):
        net.train()
        order = torch.randperm(len(y))
        for i in range(0, len(y), 128):
            idx = order[i:i + 128]
            loss = F.cross_entropy(net(torch.from_numpy(x[idx.numpy()])), torch.from_numpy(y[idx.numpy()]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = accuracy(net, xt, yt)
        if acc >= target:
            break
    return acc, epoch + 1, time.perf_counter() - t0


def run_cli(args, threads: int, timeout: float) -> tuple[int, str, float, float]:
    """Exit code, stderr's last line, wall seconds, peak memory (GiB) of a lipverify command."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    # the child reports its own peak resident memory when it exits
    boot = ("import atexit, resource, runpy, sys; atexit.register(lambda: print('PEAK_KIB', resource.getrusage("
            "resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); sys.argv = ['lipverify'] + sys.argv[1:]; "
            "runpy.run_module('lipverify', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", boot, *map(str, args), "--threads", str(threads), "--quiet"],
                       capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    peak = next((int(ln.split()[1]) / (1 << 20) for ln in lines if ln.startswith("PEAK_KIB")), float("nan"))
    said = [ln for ln in lines if ln.startswith("lipverify: ")]  # the refusal or the divergence line
    return p.returncode, (said[-1] if said else ""), time.perf_counter() - t0, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--pretrain-acc", type=float, default=0.95)
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=7200)
    ap.add_argument("--quick", action="store_true", help="resnet18 and mobilenet_v2, 2 epochs, eval on 300")
    ap.add_argument("--finetune-args", default="",
                    help="extra finetune options, e.g. \"--residual-scale 0.1 --lr 3e-4 --batch-size 64 "
                         "--warm-start-epochs 6 --warm-start-weight 1\" (default: none, the defaults are measured)")
    args = ap.parse_args()
    if args.quick:
        args.families, args.epochs, args.eval_limit = "resnet18,mobilenet_v2", 2, 300
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    x, y, xt, yt = load_mnist(data)
    work = Path(tempfile.mkdtemp(prefix="bench_finetune_zoo."))
    train_npz = work / "train.npz"
    np.savez(train_npz, x=x, y=y)
    test_npz = data / "data" / "mnist_test_1000.npz"
    common = ["--data", train_npz, "--eval-data", test_npz, "--eval-limit", args.eval_limit, "--eps", "0.3",
              "--epochs", args.epochs]
    rows = []
    for fam in [f for f in args.families.split(",") if f]:
        torch.manual_seed(0)
        net = build(fam)
        acc0, ep0, t_pre = pretrain(net, x, y, xt, yt, args.pretrain_acc, args.pretrain_epochs)
        path = work / f"{fam}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net.eval(), torch.zeros(1, 1, 28, 28), str(path), dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}})
        out = work / f"ft_{fam}"
        rc, last, wall, peak = run_cli(["finetune", path, *common, "--out", out, "--loss", "emma",
                                        *shlex.split(args.finetune_args)], args.threads,
                                       args.timeout)
        row = {"family": fam, "pretrained_acc": acc0, "pretrain_epochs": ep0, "pretrain_s": t_pre, "exit": rc,
               "message": last, "wall_s": wall, "peak_gib": peak}
        rep = out / "report.json"
        if rep.is_file():
            r = json.loads(rep.read_text())
            row.update(clean_after=r["after"]["clean_accuracy"], vra_after=r["after"]["vra"].get("0.3"),
                       bound_before=r["before"]["global_bound"], bound_after=r["after"]["global_bound"],
                       s_per_epoch=r["time_s"]["per_epoch"], conversion=r.get("conversion"), recipe=r.get("recipe"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    # the reference: a certifiable architecture trained from scratch on the same data and epochs
    rc, last, wall, peak = run_cli(["train", "--arch", "6c2f", "--input-shape", "1,28,28", *common, "--out",
                                    work / "train_6c2f"], args.threads,
                                   args.timeout)
    ref = {"family": "train --arch 6c2f", "exit": rc, "message": last, "wall_s": wall, "peak_gib": peak}
    rep = work / "train_6c2f" / "report.json"
    if rep.is_file():
        r = json.loads(rep.read_text())
        ref.update(clean_after=r["after"]["clean_accuracy"], vra_after=r["after"]["vra"].get("0.3"),
                   bound_after=r["after"]["global_bound"], s_per_epoch=r["time_s"]["per_epoch"])
    rows.append(ref)
    print(json.dumps(ref), flush=True)

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def num(v):
        return "-" if v is None else f"{v:.3g}"

    print("\n| family | pre-trained | exit | clean after | VRA@0.3 after | bound before -> after | s/epoch | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {pct(r.get('pretrained_acc'))} | {r['exit']} | {pct(r.get('clean_after'))} | "
              f"{pct(r.get('vra_after'))} | {num(r.get('bound_before'))} -> {num(r.get('bound_after'))} | "
              f"{num(r.get('s_per_epoch'))} | {r['peak_gib']:.2f} |")
        if r["exit"] not in (0,):
            print(f"|   | {r['message'][:200]} | | | | | | |")


if __name__ == "__main__":
    main()
