"""Device check: every GPU path of lipverify executed once, against the CPU, in one command.

    python benchmarks/device_check.py --device cuda --out device_check.json     # < 5 min on one GPU
    python benchmarks/device_check.py --device cpu --reduced                    # the test suite's form

Prints one JSON summary (and writes it to ``--out``): for each step its checks (``ok``), its wall time
and the peak device memory (``torch.cuda.max_memory_allocated`` on CUDA, the process's peak resident
set elsewhere).  Steps:

``bounds``      import + sound global bound of the public models of ``../shared/data`` (every one found),
                the built-in default and a torchvision resnet18 export, on the CPU and on the device:
                equal to 1e-9 relative (float64 everywhere).
``flags``       every certify / bounds / attack / finetune call is made with TF32 switched *on* and
                cuDNN benchmark on; the flags must be exactly as they were after each call (the
                float64 and rounding-bounded paths switch them off inside, and must restore them).
``certify``     ``--method global`` (1000 MNIST) and ``--method local`` (100 MNIST, 100 CIFAR) on the
                device: every radius equal to the CPU's to 1e-9 relative and every decision identical;
                the float32 path's decisions identical to float64's; certify throughput against float32
                inference of the same model on the same device (the ratio that matters at scale).
``attack``      ``strength=fast`` on 100 inputs: every adversarial point re-checked on the CPU in
                float64 (inside the ball, inside the clip box, misclassified).
``finetune``    ``--loss emma`` 2 epochs, with and without ``--amp``: per-epoch losses close to the CPU
                run's (1e-3 relative in float32, 5% with AMP), the re-verified after-report the same in
                method and soundness.
``train``       ``--arch liresnet-l2w16`` 1 epoch, with and without ``--amp``: the same checks.
``torchrun``    ``finetune`` and ``certify`` under ``torchrun --nproc_per_node 1`` (and 2 where the
                machine has 2 devices): the same numbers as the single process.

Exit status 0 when every check passed, 1 otherwise.  With ``--device cpu`` the device run and the
reference run are both on the CPU: the check then exercises every path (flags, float32 vs float64,
the re-check of attacks, torchrun with gloo) without a second device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
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

import lipverify  # noqa: E402

REL = 1e-9
TIME_KEYS = ("time", "seconds", "wall", "per_epoch", "elapsed", "_s")


# -- helpers -------------------------------------------------------------------------------------------
def shared_data() -> Path | None:
    env = os.environ.get("LIPVERIFY_REALDATA")
    for p in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]:
        if (p / "data" / "mnist_test_1000.npz").is_file():
            return p
    return None


def flags() -> dict:
    return {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_enabled": torch.backends.cudnn.enabled, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


@contextlib.contextmanager
def hostile_flags():
    """TF32 and cuDNN benchmark on, as a user's training script leaves them."""
    old = flags()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old["matmul_tf32"]
        torch.backends.cudnn.allow_tf32 = old["cudnn_tf32"]
        torch.backends.cudnn.benchmark = old["cudnn_benchmark"]


class Step:
    """One step of the check: its checks, time and peak memory."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        self.checks: list[dict] = []
        self.info: dict = {}

    def check(self, what: str, ok: bool, **detail) -> bool:
        self.checks.append({"check": what, "ok": bool(ok), **detail})
        return bool(ok)

    def call(self, what: str, fn, *a, **kw):
        """``fn(*a, **kw)`` under hostile flags; the flags must be restored exactly."""
        with hostile_flags():
            before = flags()
            out = fn(*a, **kw)
            after = flags()
        self.check(f"flags restored after {what}", before == after,
                   **({} if before == after else {"before": before, "after": after}))
        return out

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, et, ev, tb):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's, cumulative
        self.info.update(seconds=round(time.perf_counter() - self.t0, 3), peak_memory_mib=round(peak / 2 ** 20, 1))
        if et is not None and issubclass(et, Exception):
            self.checks.append({"check": "ran without an exception", "ok": False,
                                "error": f"{et.__name__}: {ev}"[:500]})
            return True  # record the failure and go on with the next step (Ctrl-C still stops)
        return False

    def has_data(self, data) -> bool:
        """False (a failed check) when the shared data folder is missing."""
        return data is not None or self.check("shared data present", False,
                                               why="../shared/data not found (set LIPVERIFY_REALDATA)")

    def to_dict(self) -> dict:
        return {"step": self.name, "ok": all(c["ok"] for c in self.checks) and bool(self.checks),
                **self.info, "checks": self.checks}


def rel_close(a: float, b: float, rel: float = REL) -> bool:
    if a == b:
        return True
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(a - b) <= rel * max(abs(a), abs(b))


def strip_times(v):
    """A JSON value without its timings (which differ between runs)."""
    if isinstance(v, dict):
        return {k: strip_times(x) for k, x in v.items() if not any(t in k for t in TIME_KEYS)}
    if isinstance(v, list):
        return [strip_times(x) for x in v]
    return v


def json_diff(a, b, path="", rel=REL, out=None) -> list[str]:
    out = [] if out is None else out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in one")
            else:
                json_diff(a[k], b[k], f"{path}/{k}", rel, out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            json_diff(x, y, f"{path}[{i}]", rel, out)
    elif isinstance(a, float) and isinstance(b, float):
        if not rel_close(a, b, rel):
            out.append(f"{path}: {a!r} vs {b!r}")
    elif a != b:
        out.append(f"{path}: {a!r} vs {b!r}")
    return out


def npz(path: Path, n: int):
    with np.load(path) as f:
        return torch.from_numpy(f["x"][:n].astype(np.float32)), torch.from_numpy(f["y"][:n].astype(np.int64))


def tv_resnet18(work: Path) -> Path | None:
    try:
        import torchvision
    except ImportError:
        return None
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    net.eval()
    p = work / "resnet18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(p), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "b"}})
    return p


# -- steps ---------------------------------------------------------------------------------------------
def step_bounds(dev, data, work, reduced, results):
    models = [(lipverify.BUILTIN_DEFAULT, {})]
    if data is not None:
        onnx = data / "models" / "onnx"
        models += [(onnx / "mnist-net_256x2.onnx", {}), (onnx / "Convnet_maxpool.onnx", {})]
        if not reduced:
            models += [(onnx / "cifar_base_kw.onnx", {"mean": "0.485,0.456,0.406", "std": "0.225"}),
                       (onnx / "resnet_2b.onnx", {"mean": "0.4914,0.4822,0.4465", "std": "0.2471,0.2435,0.2616"})]
    r18 = None if reduced else tv_resnet18(work)
    if r18 is not None:
        models.append((r18, {}))
    with Step("bounds", dev) as st:
        vals = {}
        for src, kw in models:
            name = Path(str(src)).name
            kw = {k: [float(t) for t in v.split(",")] for k, v in kw.items()}
            cpu = lipverify.load(str(src), device="cpu", **kw)
            b_cpu = st.call(f"bounds {name} (cpu)", cpu.bounds)
            gpu = lipverify.load(str(src), device=str(dev), **kw)
            b_dev = st.call(f"bounds {name} ({dev})", gpu.bounds)
            a, b = b_cpu.global_bound.value, b_dev.global_bound.value
            vals[name] = {"cpu": a, "device": b}
            st.check(f"global bound of {name} equal on cpu and {dev}", rel_close(a, b), cpu=a, device=b)
            st.check(f"global bound of {name} is sound", bool(b_dev.global_bound.sound))
            ka = float(torch.as_tensor(cpu.margin_constants().K).max())
            kb = float(torch.as_tensor(gpu.margin_constants().K).max())
            st.check(f"margin constants of {name} equal on cpu and {dev}", rel_close(ka, kb), cpu=ka, device=kb)
        st.info["bounds"] = vals
    results.append(st.to_dict())


def _infer_throughput(lm, x, reps=3) -> float:
    """Inputs per second of float32 inference of the imported network on its device."""
    m = lm.module
    with torch.no_grad():
        xb = x.to(lm.device)
        m(xb[:8])
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            m(xb)
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)
    return reps * len(x) / max(time.perf_counter() - t0, 1e-9)


def _compare_certs(st, what, a, b):
    same_dec = bool(torch.equal(a.certified.cpu(), b.certified.cpu())) and bool(torch.equal(a.pred.cpu(), b.pred.cpu()))
    st.check(f"{what}: every decision identical", same_dec)
    ra, rb = a.radius.double().cpu(), b.radius.double().cpu()
    both = torch.isfinite(ra) & torch.isfinite(rb)
    worst = float(((ra - rb).abs() / torch.maximum(ra.abs(), rb.abs()).clamp_min(1e-300))[both].max()) if both.any() else 0.0
    st.check(f"{what}: radii equal to {REL:g} relative", worst <= REL and bool(torch.equal(torch.isfinite(ra), torch.isfinite(rb))),
             worst_relative=worst)
    st.check(f"{what}: same methods", [a.method_code.tolist(), a.sound.tolist()] == [b.method_code.tolist(), b.sound.tolist()])


def step_certify(dev, data, reduced, results):
    with Step("certify", dev) as st:
        if not st.has_data(data):
            results.append(st.to_dict())
            return
        n_g, n_l = (100, 20) if reduced else (1000, 100)
        xm, ym = npz(data / "data" / "mnist_test_1000.npz", n_g)
        cases = [("mnist kw (built-in)", lipverify.BUILTIN_DEFAULT, {}, xm, ym, 0.3)]
        if not reduced:
            xc, yc = npz(data / "data" / "cifar10_test_100.npz", n_l)
            cases.append(("cifar_base_kw", data / "models" / "onnx" / "cifar_base_kw.onnx",
                          {"mean": [0.485, 0.456, 0.406], "std": [0.225]}, xc, yc, 36 / 255))
        for label, src, kw, x, y, eps in cases:
            cpu = lipverify.load(str(src), device="cpu", **kw)
            gpu = lipverify.load(str(src), device=str(dev), **kw)
            x = x.reshape((len(x),) + tuple(cpu.input_shape))
            methods = [("global", x, y)] + [("local", x[:n_l], y[:n_l])]
            for method, xs, ys in methods:
                c64 = st.call(f"certify {method} {label} float64 (cpu)", cpu.certify, xs, ys, eps=[eps],
                              method=method, precision="float64")
                t0 = time.perf_counter()
                d64 = st.call(f"certify {method} {label} float64 ({dev})", gpu.certify, xs, ys, eps=[eps],
                              method=method, precision="float64")
                t64 = time.perf_counter() - t0
                t0 = time.perf_counter()
                d32 = st.call(f"certify {method} {label} float32 ({dev})", gpu.certify, xs, ys, eps=[eps],
                              method=method, precision="float32")
                t32 = time.perf_counter() - t0
                _compare_certs(st, f"{method} {label}: cpu vs {dev} (float64)", c64, d64)
                same = bool(torch.equal(d32.certified.cpu(), d64.certified.cpu())) and bool(
                    torch.equal(d32.pred.cpu(), d64.pred.cpu()))
                st.check(f"{method} {label}: float32 path decisions identical to float64", same)
                st.check(f"{method} {label}: VRA is sound-only and equal", d32.vra == d64.vra == c64.vra,
                         vra=d64.vra)
                ips = _infer_throughput(gpu, xs)
                st.info[f"{method} {label}"] = {
                    "n": len(ys), "vra": d64.vra, "certify_float64_per_s": len(ys) / t64,
                    "certify_float32_per_s": len(ys) / t32, "float32_inference_per_s": ips,
                    "inference_over_certify_float32": ips / (len(ys) / t32)}
    results.append(st.to_dict())


def step_attack(dev, data, reduced, results):
    with Step("attack", dev) as st:
        if not st.has_data(data):
            results.append(st.to_dict())
            return
        n = 30 if reduced else 100
        x, y = npz(data / "data" / "mnist_test_1000.npz", n)
        gpu = lipverify.load(lipverify.BUILTIN_DEFAULT, device=str(dev))
        x = x.reshape((n,) + tuple(gpu.input_shape))
        eps = 1.0
        rep = st.call("attack fast", gpu.attack, x, y, eps=[eps], norm="2", clip=(0.0, 1.0), strength="fast")
        cpu64 = lipverify.load(lipverify.BUILTIN_DEFAULT, device="cpu").module_double()
        xa = rep.x_adv.detach().cpu().double()
        broken = torch.isfinite(rep.radius.cpu()) & (rep.radius.cpu() > 0)
        with torch.no_grad():
            pred = cpu64(xa).argmax(-1)
        dist = (xa - x.double()).reshape(n, -1).norm(dim=1)
        ok_cls = bool((pred[broken] != y[broken]).all())
        ok_ball = bool((dist[broken] <= rep.radius.cpu()[broken] * (1 + 1e-12) + 1e-12).all())
        ok_box = bool(((xa >= 0) & (xa <= 1)).all())
        st.check("every adversarial point misclassified by the float64 model on the cpu", ok_cls,
                 n_points=int(broken.sum()))
        st.check("every adversarial point within its reported radius", ok_ball)
        st.check("every adversarial point inside the clip box [0, 1]", ok_box)
        st.info.update(n=n, broken=int(broken.sum()), robust_accuracy=rep.to_dict().get("robust_accuracy"))
    results.append(st.to_dict())


def _job(kind: str, dev: str, out: Path, data: Path, amp: bool, epochs: int, limit: int, eval_limit: int) -> dict:
    """One finetune / train run through the Python API; the report."""
    common = dict(eval_data=str(data / "data" / "mnist_test_1000.npz"), eval_limit=eval_limit, limit=limit,
                  epochs=epochs, batch_size=64, device=dev, amp=amp, quiet=True, threads=None, force=True)
    echo = lambda msg: None  # noqa: E731
    train_npz = data / "data" / "mnist_train_5k.npz"
    if kind == "finetune":
        from lipverify.train.finetune import finetune

        return finetune(str(train_npz), "0.3", str(out), echo=echo, loss="emma", **common)
    from lipverify.train.train import train

    return train("liresnet-l2w16", str(train_npz), "0.3", str(out), input_shape=(1, 28, 28), echo=echo, **common)


def step_training(kind, dev, data, work, reduced, results):
    with Step(kind, dev) as st:
        if not st.has_data(data):
            results.append(st.to_dict())
            return
        epochs = 1 if kind == "train" else 2
        limit, eval_limit = (128, 32) if reduced else (1024, 200)
        for amp in (False, True):
            tag = f"{kind}{' --amp' if amp else ''}"
            ref = st.call(f"{tag} (cpu)", _job, kind, "cpu", work / f"{kind}_cpu_{amp}", data, False, epochs, limit,
                          eval_limit)
            t0 = time.perf_counter()
            got = st.call(f"{tag} ({dev})", _job, kind, str(dev), work / f"{kind}_dev_{amp}", data, amp, epochs,
                          limit, eval_limit)
            wall = time.perf_counter() - t0
            la = [h["loss"] for h in ref["history"]]
            lb = [h["loss"] for h in got["history"]]
            tol = 0.05 if amp else 1e-3  # AMP: float16 on CUDA, bfloat16 autocast on the CPU
            close = len(la) == len(lb) and all(rel_close(a, b, tol) for a, b in zip(la, lb))
            st.check(f"{tag}: per-epoch losses within {tol:g} of the cpu run", close, cpu=la, device=lb)
            meth = [(r["after"].get("method"), r["after"].get("sound")) for r in (ref, got)]
            st.check(f"{tag}: after-report re-verified the same way", meth[0] == meth[1] and bool(meth[1][1]),
                     cpu=meth[0], device=meth[1])
            st.check(f"{tag}: did not diverge", not got.get("diverged"), divergence=got.get("divergence"))
            st.info[tag] = {"wall_s": round(wall, 2), "s_per_epoch": got["time_s"].get("per_epoch"),
                            "cpu_s_per_epoch": ref["time_s"].get("per_epoch"),
                            "clean_after": got["after"].get("clean_accuracy"), "vra_after": got["after"].get("vra")}
    results.append(st.to_dict())


def _cli(args: list, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=str(ROOT))


def step_torchrun(dev, data, work, reduced, results):
    with Step("torchrun", dev) as st:
        if not st.has_data(data):
            results.append(st.to_dict())
            return
        n_dev = torch.cuda.device_count() if dev.type == "cuda" else 1
        procs = [1] + ([2] if n_dev >= 2 else [])
        mn = data / "data" / "mnist_test_1000.npz"
        n = 64 if reduced else 1000
        cert = ["-m", "lipverify", "certify", lipverify.BUILTIN_DEFAULT, "--data", mn, "--limit", n, "--eps", "0.3",
                "--device", str(dev), "--json", "--quiet", "--precision", "float64"]
        single = _cli(cert)
        st.check("certify (single process) ran", single.returncode == 0, stderr=single.stderr[-400:])
        ft = ["finetune", lipverify.BUILTIN_DEFAULT, "--data", data / "data" / "mnist_train_5k.npz", "--limit",
              128 if reduced else 1024, "--eval-data", mn, "--eval-limit", 32 if reduced else 200, "--eps", "0.3",
              "--epochs", 1, "--batch-size", 64, "--device", str(dev), "--quiet", "--loss", "emma", "--force"]
        ft1 = _cli(["-m", "lipverify", *ft, "--out", work / "tr_single"])
        st.check("finetune (single process) ran", ft1.returncode == 0, stderr=ft1.stderr[-400:])
        for p in procs:
            run = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", p]
            got = _cli(run + cert)
            ok = got.returncode == 0 and single.returncode == 0
            diff = (json_diff(strip_times(json.loads(single.stdout)), strip_times(json.loads(got.stdout)))
                    if ok else ["did not run"])
            st.check(f"certify under torchrun --nproc_per_node {p}: same JSON", ok and not diff, diff=diff[:5],
                     stderr=got.stderr[-400:] if got.returncode else "")
            out = work / f"tr_{p}"
            got = _cli(run + ["-m", "lipverify", *ft, "--out", out])
            ok = got.returncode == 0 and ft1.returncode == 0
            if ok:
                a = json.loads((work / "tr_single" / "report.json").read_text())
                b = json.loads((out / "report.json").read_text())
                keys = ("before", "after") + (("history",) if p == 1 else ())
                diff = json_diff(strip_times({k: a[k] for k in keys}), strip_times({k: b[k] for k in keys}),
                                 rel=REL if p == 1 else 1e-3)
            else:
                diff = ["did not run"]
            st.check(f"finetune under torchrun --nproc_per_node {p}: same report", ok and not diff, diff=diff[:5],
                     stderr=got.stderr[-400:] if got.returncode else "")
    results.append(st.to_dict())


STEPS = ("bounds", "certify", "attack", "finetune", "train", "torchrun")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (cuda when there is one)")
    ap.add_argument("--reduced", action="store_true", help="the test suite's form: fewer inputs, fewer models")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    ap.add_argument("--out", default=None, help="also write the JSON summary here")
    args = ap.parse_args(argv)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        print(f"device_check: --device {name}: this machine has no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device(name)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"device_check: unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}", file=sys.stderr)
        return 2
    data = shared_data()
    results: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lipverify_device_check.") as tmp:
        work = Path(tmp)
        for s in steps:
            print(f"device_check: {s} ...", file=sys.stderr, flush=True)
            if s == "bounds":
                step_bounds(dev, data, work, args.reduced, results)
            elif s == "certify":
                step_certify(dev, data, args.reduced, results)
            elif s == "attack":
                step_attack(dev, data, args.reduced, results)
            elif s in ("finetune", "train"):
                step_training(s, dev, data, work, args.reduced, results)
            elif s == "torchrun":
                step_torchrun(dev, data, work, args.reduced, results)
    summary = {
        "ok": all(r["ok"] for r in results),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "reduced": bool(args.reduced),
        "shared_data": data is not None, "seconds": round(time.perf_counter() - t0, 1),
        "failed": [f"{r['step']}: {c['check']}" for r in results for c in r["checks"] if not c["ok"]],
        "steps": results,
    }
    text = json.dumps(summary, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
