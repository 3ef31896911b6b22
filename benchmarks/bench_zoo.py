"""Benchmark: the ecosystem's classification architectures through lipverify, exported the standard way.

Every torchvision classification family (and, when timm is installed, a sample of timm's) is built at
random initialisation with 10 classes, exported with ``torch.onnx.export(..., dynamo=False,
opset_version=17, dynamic_axes={"x": {0: "b"}})`` and, with ``--formats``, ``torch.export`` (``.pt2``)
and a state dict with ``--arch``.  Each model runs in its own process, which reports:

* import time (``lipverify.load``: normalisation, conversion, fidelity check, graph check), bound time
  (sound l2 bounds and margin constants), peak resident memory of the process;
* the sound global bound, the largest Jacobian spectral norm at 2 sampled inputs (autograd and exact
  SVD, a proven lower bound of the Lipschitz constant) and their ratio;
* the outcome: ``bounded`` (a global constant), ``bounded on [0,1]`` (products or normalisations
  bounded on the input domain), or ``refused`` with the op types lipverify cannot bound (exit 2 in the CLI),
  ``ERROR`` (an internal error: a bug), or ``no-export`` when the exporter itself fails on the
  architecture at this input size (before lipverify runs).

Run::

    python benchmarks/bench_zoo.py --size 64                # torchvision, ONNX
    python benchmarks/bench_zoo.py --formats onnx,pt2,state_dict --timm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TORCHVISION = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small",
               "efficientnet_b0", "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_x_400mf", "regnet_y_400mf",
               "googlenet", "mnasnet0_5", "densenet121", "convnext_tiny", "vgg11", "alexnet", "inception_v3",
               "vit_b_16", "swin_t", "maxvit_t"]
TIMM = ["resnet18", "resnet26d", "seresnext26d_32x4d", "efficientnet_b0", "mobilenetv3_small_100", "mixnet_s",
        "rexnet_100", "ghostnet_100", "dla34", "dpn68", "cspresnet50", "regnety_002", "convnext_atto", "repvgg_a0",
        "hrnet_w18_small", "res2net50_14w_8s", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
        # weight-standardised convolutions (a BatchNormalization over the weights, folded at import)
        "nf_resnet26", "nfnet_l0", "resnetv2_50x1_bit"]

CHILD = r'''
import json, resource, sys, time, warnings, copy
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(int(sys.argv[5]))
src, name, fmt, size, _ = sys.argv[1:6]
size = int(size)
out = {"name": f"{src}:{name}", "format": fmt}
try:
    torch.manual_seed(0)
    if src == "torchvision":
        import torchvision
        kw = {"num_classes": 10}
        if name in ("googlenet", "inception_v3"):
            kw.update(aux_logits=False, init_weights=False)
        if name.startswith("vit_"):
            kw.update(image_size=size)
        net = getattr(torchvision.models, name)(**kw).eval()
    else:
        import timm
        kw = {"num_classes": 10, "pretrained": False}
        if "patch16" in name:
            kw["img_size"] = size
        net = timm.create_model(name, **kw).eval()
    x = torch.rand(1, 3, size, size)
    import tempfile, os
    d = tempfile.mkdtemp()
    import lipverify
    from lipverify.errors import UserInputError
    t0 = time.perf_counter()
    if fmt == "onnx":
        path = os.path.join(d, "m.onnx")
        torch.onnx.export(net, (x,), path, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "b"}})
        load = lambda: lipverify.load(path)
    elif fmt == "pt2":
        ep = torch.export.export(net, (torch.rand(2, 3, size, size),),
                                 dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=1024)}})
        path = os.path.join(d, "m.pt2")
        torch.export.save(ep, path)
        load = lambda: lipverify.load(path)
    else:
        path = os.path.join(d, "m.pth")
        torch.save(net.state_dict(), path)
        arch = os.path.join(d, "arch.py")
        if src == "torchvision":
            code = f"import torchvision\ndef build():\n    return torchvision.models.{name}(**{kw!r})\n"
        else:
            code = f"import timm\ndef build():\n    return timm.create_model({name!r}, **{kw!r})\n"
        open(arch, "w").write(code)
        load = lambda: lipverify.load(path, arch=f"{arch}:build", input_shape=(3, size, size))
    out["export_s"] = time.perf_counter() - t0
    out["exported"] = True
    t0 = time.perf_counter()
    try:
        lm = load()
        out["import_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = lm.bounds("2")
        out["bound_s"] = time.perf_counter() - t0
        out["bound"] = rep.global_bound.value
        out["outcome"] = "bounded" if rep.domain is None else "bounded on [0,1]"
        m64 = lm.module_double()
        best = 0.0
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            z = torch.rand((1,) + lm.input_shape, generator=g, dtype=torch.float64)
            jac = torch.autograd.functional.jacobian(lambda t: m64(t).reshape(-1), z).reshape(-1, z.numel())
            best = max(best, float(torch.linalg.matrix_norm(jac, ord=2)))
        out["lower"] = best
        out["sound_ok"] = rep.global_bound.value >= best * (1 - 1e-6)
    except UserInputError as exc:
        out["import_s"] = time.perf_counter() - t0
        out["outcome"] = "refused"
        out["detail"] = str(exc)[:400]
except Exception as exc:
    # before lipverify ran, a failure is the exporter's (or the architecture's at this input size)
    out["outcome"] = "ERROR" if out.get("exported") else "no-export"
    out["detail"] = f"{type(exc).__name__}: {str(exc)[:300]}"
out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--formats", default="onnx")
    ap.add_argument("--models", default=None, help="comma-separated torchvision names (default: all families)")
    ap.add_argument("--timm", action="store_true", help="also a sample of timm's architectures")
    ap.add_argument("--timm-models", default=None, help="comma-separated timm names (default: the sample)")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    root = str(Path(__file__).resolve().parent.parent)
    jobs = [("torchvision", n) for n in (args.models.split(",") if args.models else TORCHVISION)]
    if args.timm:
        try:
            import timm  # noqa: F401

            jobs += [("timm", n) for n in (args.timm_models.split(",") if args.timm_models else TIMM)]
        except ImportError:
            print("note: timm is not installed (pip install '.[bench]'): its models are skipped")
    rows = []
    print(f"{'model':34s} {'fmt':10s} {'outcome':16s} {'import s':>8s} {'bound s':>8s} {'peak MB':>8s} "
          f"{'bound':>10s} {'lower':>10s} {'ratio':>8s}  detail")
    for src, name in jobs:
        for fmt in args.formats.split(","):
            env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
            t0 = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, "-c", CHILD, src, name, fmt, str(args.size), str(args.threads)],
                                   capture_output=True, text=True, timeout=args.timeout, env=env)
                line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
                r = json.loads(line[7:]) if line else {"name": f"{src}:{name}", "format": fmt, "outcome": "ERROR",
                                                         "detail": (p.stderr or p.stdout)[-300:]}
            except subprocess.TimeoutExpired:
                r = {"name": f"{src}:{name}", "format": fmt, "outcome": "TIMEOUT",
                     "detail": f"> {args.timeout} s"}
            r["wall_s"] = time.perf_counter() - t0
            rows.append(r)
            ratio = r["bound"] / r["lower"] if r.get("lower") else float("nan")
            detail = r.get("detail", "") if not r["outcome"].startswith("bounded") else ("" if r.get("sound_ok") else "BOUND < LOWER")
            if r["outcome"] == "refused" and "cannot bound" in detail:
                import re

                ops = sorted(set(re.findall(r"(?:soundly: |\), )([^(]+?) \(node", detail)))
                detail = "cannot bound: " + "; ".join(ops)
            print(f"{r['name']:34s} {fmt:10s} {r['outcome']:16s} {r.get('import_s', float('nan')):8.1f} "
                  f"{r.get('bound_s', float('nan')):8.1f} {r.get('peak_mb', float('nan')):8.0f} "
                  f"{r.get('bound', float('nan')):10.3g} {r.get('lower', float('nan')):10.3g} {ratio:8.3g}  "
                  f"{detail[:200]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"{sum(r['outcome'] == 'no-export' for r in rows)} could not be exported at this size")
    bad = [r for r in rows if r["outcome"] in ("ERROR", "TIMEOUT") or (r["outcome"].startswith("bounded") and not r["sound_ok"])]
    print(f"\n{len(rows)} runs: {sum(r['outcome'] == 'bounded' for r in rows)} bounded, "
          f"{sum(r['outcome'] == 'bounded on [0,1]' for r in rows)} bounded on the domain, "
          f"{sum(r['outcome'] == 'refused' for r in rows)} refused, {len(bad)} errors/timeouts/unsound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
