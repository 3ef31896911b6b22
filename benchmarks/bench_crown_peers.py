"""Benchmark: lipverify's certificates against auto_LiRPA's, measured side by side in one run.

For each row of ``bench_crown.ROWS`` (model, norm, eps) on the first ``--n`` test images: the
certified-and-correct counts and seconds per input (one thread, same CPU, same inputs) of

* lipverify: ``certify --method global`` and ``--method local``, CROWN with interval intermediate
  bounds (CROWN-IBP), CROWN and, with ``--alpha``, alpha-CROWN (20 Adam steps), the margins
  ``f_y - f_j`` as the specification;
* auto_LiRPA: IBP, CROWN and, with ``--alpha``, alpha-CROWN (20 iterations), on the same network: the
  ONNX file converted by onnx2torch (not by lipverify), the pixel-space balls mapped through the
  normalisation (:func:`peer_inputs`), the l_inf balls intersected with [0, 1] (``x_L``/``x_U``), the
  same ``C``;

the agreement of the two CROWN bounds: the largest difference between lipverify's and auto_LiRPA's
CROWN lower bounds of the margins, relative to their scale (same algorithm: they should agree to
float32 rounding; lipverify's is in float64 and rounded outwards); and, for every method, how many
margin lower bounds lie above the smallest margin targeted PGD reached on the same ball (50 steps per
margin, :func:`attacked_margins`): any such bound is unsound.

auto_LiRPA pins an older torch than lipverify's, so it runs in a separate Python given by
``--lirpa-python`` (or ``LIPVERIFY_LIRPA_PYTHON``), as a subprocess that runs this file with
``--peer-worker``; it is never imported by lipverify.  That Python needs torch, onnx, onnx2torch and
auto_LiRPA.  Either auto_LiRPA from its repository with the torch it pins, or its last release on
PyPI (0.3) beside lipverify's torch in a second virtual environment that reads lipverify's packages::

    python -m venv .lirpa
    .venv/bin/python -c "import site; print(site.getsitepackages()[0])" \\
        > .lirpa/lib/python3.11/site-packages/lipverify-venv.pth
    .lirpa/bin/pip install --no-deps auto_LiRPA==0.3
    .lirpa/bin/pip install appdirs
    python benchmarks/bench_crown_peers.py --lirpa-python .lirpa/bin/python

(0.3 predates four changes; the worker patches them in its own process: ``_set_opset_version`` moved
out of ``torch.onnx.symbolic_helper``, graph nodes lost ``node[attribute]``, ``Module._named_members``
gained ``remove_duplicate``, and NumPy 2 dropped ``numpy.lib.arraysetops``.)

    python benchmarks/bench_crown_peers.py --lirpa-python .lirpa/bin/python          # every row, 50 inputs
    python benchmarks/bench_crown_peers.py --lirpa-python .lirpa/bin/python --rows 0,1,2 --alpha

Without a peer Python the lipverify columns are printed alone.  Nothing is a timed test; the numbers
go in docs/benchmarks.md and the README.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------
# the peer side: runs in auto_LiRPA's Python, imports nothing from lipverify
# ---------------------------------------------------------------------------------------------------

def _patch_old_lirpa(torch):
    """Let auto_LiRPA 0.3 trace with a newer torch (in this worker process only)."""
    import types

    import torch.onnx.symbolic_helper as helper

    try:
        importlib.import_module("numpy.lib.arraysetops")  # gone in NumPy 2
    except ImportError:
        sys.modules["numpy.lib.arraysetops"] = types.SimpleNamespace(isin=np.isin)

    if not hasattr(helper, "_set_opset_version"):
        try:
            from torch.onnx._globals import GLOBALS
        except ImportError:
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        def _set_opset_version(v):
            GLOBALS.export_onnx_opset_version = v
        helper._set_opset_version = _set_opset_version
    if not hasattr(torch._C.Node, "__getitem__"):
        def _getitem(node, name):
            return getattr(node, node.kindOf(name))(name)  # i, f, s, t, is, ...: the getters
        torch._C.Node.__getitem__ = _getitem


def peer_network(onnx_path):
    """The network as onnx2torch converts the ONNX graph (normalisation is applied to the inputs and the
    input set, see :func:`peer_inputs`)."""
    import onnx2torch

    return onnx2torch.convert(str(onnx_path)).eval()


def peer_inputs(torch, x, eps, norm, mean, std):
    """The ball around ``x`` in the normalised space ``(x - mean) / std`` the network reads, as
    ``(centre, eps', x_L, x_U)``.

    l_inf: the box ``[x - eps, x + eps]`` intersected with [0, 1], mapped element-wise.  l2: the ball of
    radius ``eps / std`` (one ``std`` for every channel; no domain).  Normalising outside auto_LiRPA
    keeps its bound computation on the ONNX graph alone: a ``Sub``/``Div`` layer in front of the
    network gave bounds above the attack's margins at l2 (auto_LiRPA 0.3) and an assertion in its
    patches mode with convolutions.
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.tensor(mean if mean is not None else [0.0]).reshape(shape)
    s = torch.tensor(std if std is not None else [1.0]).reshape(shape)
    centre = (x - m) / s
    if norm == "inf":
        return centre, eps, ((x - eps).clamp(0, 1) - m) / s, ((x + eps).clamp(0, 1) - m) / s
    if s.numel() != 1:
        raise ValueError("an l2 ball through a per-channel std is not a ball; not compared")
    return centre, eps / float(s), None, None


def peer_worker(job: dict) -> dict:
    import torch

    _patch_old_lirpa(torch)
    from auto_LiRPA import BoundedModule, BoundedTensor
    from auto_LiRPA.perturbations import PerturbationLpNorm

    own = BoundedModule.__dict__.get("_named_members")
    if own is not None and "remove_duplicate" not in own.__code__.co_varnames:
        def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
            return own(self, get_members_fn, prefix=prefix, recurse=recurse)
        BoundedModule._named_members = _named_members  # torch >= 2 passes remove_duplicate

    torch.set_num_threads(job["threads"])
    d = np.load(job["data"])
    n = job["n"]
    x = torch.from_numpy(d["x"][:n]).float()
    if x.max() > 1.5:
        x = x / 255
    x = x.reshape(n, *job["input_shape"])
    y = torch.from_numpy(d["y"][:n]).long()
    model = peer_network(job["onnx"])
    eps, norm = job["eps"], job["norm"]
    xn, eps_n, x_lo, x_hi = peer_inputs(torch, x, eps, norm, job["mean"], job["std"])
    m = job["classes"]
    others = torch.stack([torch.tensor([j for j in range(m) if j != int(t)]) for t in y])
    C = torch.zeros(n, m - 1, m)
    C.scatter_(2, y.reshape(n, 1, 1).expand(n, m - 1, 1), 1.0)
    C.scatter_(2, others.unsqueeze(2), -1.0)
    out: dict = {"lower": {}}
    bm = BoundedModule(model, torch.zeros_like(xn[:1]), device="cpu",
                       bound_opts={"optimize_bound_args": {"iteration": 20}})
    with torch.no_grad():
        correct = model(xn).argmax(1) == y
    for method in job["methods"]:
        lows = []
        t0 = time.perf_counter()
        try:
            for s in range(0, n, job["batch"]):
                sl = slice(s, s + job["batch"])
                if norm == "inf":
                    ptb = PerturbationLpNorm(norm=np.inf, eps=eps_n, x_L=x_lo[sl], x_U=x_hi[sl])
                else:
                    ptb = PerturbationLpNorm(norm=2.0, eps=eps_n)
                lb, _ = bm.compute_bounds(x=(BoundedTensor(xn[sl], ptb),), C=C[sl], method=method,
                                          bound_upper=False)
                lows.append(lb.detach())
        except Exception as e:  # one method failing on a model is a result, not the end of the run
            out[method] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            continue
        dt = (time.perf_counter() - t0) / n
        low = torch.cat(lows)
        out[method] = {"count": int(((low > 0).all(1) & correct).sum()), "s_per_input": dt}
        out["lower"][method] = low.double().tolist()
    return out


# ---------------------------------------------------------------------------------------------------
# the lipverify side
# ---------------------------------------------------------------------------------------------------

def run_peer(python: str, job: dict, timeout: float) -> dict | str:
    """The worker's result, or a one-line reason it has none."""
    try:
        r = subprocess.run([python, str(Path(__file__).resolve()), "--peer-worker"], input=json.dumps(job),
                           capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"auto_LiRPA worker failed: {e}"
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return f"auto_LiRPA worker failed (exit {r.returncode}): {tail}"
    return json.loads(lines[-1])


def attacked_margins(lm, x, y, eps, norm, steps=50):
    """``(B, m - 1)`` the smallest margins ``f_y - f_j`` (``j != y``, in order) found by targeted PGD on
    each margin over the ball intersected with [0, 1]: a sound lower bound is never above them."""
    import torch

    net = lm.module_double()
    B, m = x.shape[0], lm.n_classes
    js = torch.stack([torch.tensor([j for j in range(m) if j != int(t)]) for t in y])  # (B, m-1)
    rows = x.double().repeat_interleave(m - 1, 0)
    yi, ji = y.repeat_interleave(m - 1), js.reshape(-1)
    view = (-1,) + (1,) * (x.dim() - 1)
    gen = torch.Generator().manual_seed(0)
    d = (torch.rand(rows.shape, generator=gen, dtype=torch.float64) * 2 - 1) * eps
    if norm == "2":
        d = d / d.flatten(1).norm(dim=1).reshape(view) * eps * 0.5
    best = torch.full((rows.shape[0],), float("inf"), dtype=torch.float64)
    z = (rows + d).clamp(0, 1)
    for it in range(steps + 1):
        z.requires_grad_(True)
        out = net(z)
        marg = out[torch.arange(len(z)), yi] - out[torch.arange(len(z)), ji]
        best = torch.minimum(best, marg.detach())
        if it == steps:
            break
        (g,) = torch.autograd.grad(marg.sum(), z)
        with torch.no_grad():
            step = eps / 8 * (1 - it / steps) + eps / 100
            if norm == "inf":
                delta = (z - step * g.sign() - rows).clamp(-eps, eps)
            else:
                delta = z - step * g / (g.flatten(1).norm(dim=1).reshape(view) + 1e-300) - rows
                nrm = delta.flatten(1).norm(dim=1).reshape(view)
                delta = delta * torch.clamp(eps / (nrm + 1e-300), max=1.0)
            z = (rows + delta).clamp(0, 1)
    return best.reshape(B, m - 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--rows", default=None, help="comma-separated row numbers of bench_crown.ROWS (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--alpha", action="store_true", help="also alpha-CROWN on both sides (slow)")
    ap.add_argument("--lirpa-python", default=os.environ.get("LIPVERIFY_LIRPA_PYTHON"),
                    help="a Python with auto_LiRPA (see the module docstring)")
    ap.add_argument("--batch", type=int, default=10, help="inputs per auto_LiRPA call")
    ap.add_argument("--peer-timeout", type=float, default=3600.0)
    ap.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peer_worker:
        print(json.dumps(peer_worker(json.loads(sys.stdin.read()))), flush=True)
        return

    import torch

    sys.path.insert(0, str(HERE))
    import bench_crown as bc

    if not bc.SHARED.is_dir():
        sys.exit(f"needs the shared data next to the repository ({bc.SHARED})")
    torch.set_num_threads(a.threads)
    rows = bc.ROWS if a.rows is None else [bc.ROWS[int(k)] for k in a.rows.split(",")]
    methods = ["IBP", "CROWN"] + (["alpha-CROWN"] if a.alpha else [])
    print(f"first {a.n} test images, certified-and-correct counts (s/input), {a.threads} thread(s); "
          f"auto_LiRPA: {a.lirpa_python or 'not given (--lirpa-python)'}\n")
    for name, data, kw, norm, eps, *_ in rows:
        lm, x, y = bc.load(name, data, kw, a.n)
        eps_s = f"{'l_inf' if norm == 'inf' else 'l2'} {bc.fmt_eps(eps)}"
        cells = {}
        for method in ("global", "local"):
            t0 = time.perf_counter()
            c = lm.certify(x, y, eps=[eps], norm=norm, method=method)
            cells[method] = (round(c.vra[eps] * a.n), (time.perf_counter() - t0) / a.n)
        cells["crown-ibp"] = bc.crown_count(lm, x, y, eps, norm, "ibp")
        with torch.no_grad():
            pred = lm(x).argmax(1)
        t0 = time.perf_counter()
        low = bc.margin_lower_bounds(lm.graph, x.double(), y, eps, norm, domain=(0.0, 1.0), intermediate="crown")
        cells["crown"] = (int(((low > 0).all(1) & (pred == y)).sum()), (time.perf_counter() - t0) / a.n)
        low = low[torch.arange(lm.n_classes)[None] != y[:, None]].reshape(a.n, -1)  # j != y, in order
        if a.alpha:
            cells["alpha-crown"] = bc.crown_count(lm, x, y, eps, norm, "crown", alpha_steps=20)
        line = "  ".join(f"{k} {v[0]} ({v[1]:.3g})" for k, v in cells.items())
        print(f"{name} {eps_s}\n  lipverify:  {line}", flush=True)
        if not a.lirpa_python:
            continue
        mean = [float(v) for v in kw["mean"].split(",")] if "mean" in kw else None
        std = [float(v) for v in kw["std"].split(",")] if "std" in kw else None
        job = {"onnx": str(bc.ONNX / f"{name}.onnx"), "data": str(data), "n": a.n, "norm": norm, "eps": eps,
               "mean": mean, "std": std, "input_shape": list(lm.input_shape), "classes": lm.n_classes,
               "methods": methods, "threads": a.threads, "batch": a.batch}
        peer = run_peer(a.lirpa_python, job, a.peer_timeout)
        if isinstance(peer, str):
            print(f"  auto_LiRPA: {peer}", flush=True)
            continue
        line = "  ".join(f"{m} failed ({peer[m]['error']})" if "error" in peer[m] else
                         f"{m} {peer[m]['count']} ({peer[m]['s_per_input']:.3g})" for m in methods)
        att = attacked_margins(lm, x, y, eps, norm)
        over = {"lipverify CROWN": int((low > att).sum())}
        for m in methods:
            if m in peer["lower"]:
                over[f"auto_LiRPA {m}"] = int((torch.tensor(peer["lower"][m], dtype=torch.float64) > att).sum())
        if "CROWN" not in peer["lower"]:
            print(f"  auto_LiRPA: {line}", flush=True)
            continue
        ratio = cells["crown"][1] / peer["CROWN"]["s_per_input"]
        theirs = torch.tensor(peer["lower"]["CROWN"], dtype=torch.float64)
        scale = low.abs().amax().clamp_min(1e-12)
        gap = float((theirs - low).amax() / scale)  # > 0: theirs is tighter somewhere
        print(f"  auto_LiRPA: {line}\n  CROWN time ratio (lipverify / auto_LiRPA) {ratio:.2f}x; "
              f"largest (theirs - ours) / max|bound| {gap:+.2e} (float32 rounding: about 1e-6)\n"
              f"  lower bounds above a margin targeted PGD reached (unsound), of {att.numel()}: "
              + ", ".join(f"{k} {v}" for k, v in over.items()), flush=True)


if __name__ == "__main__":
    main()
