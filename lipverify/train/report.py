"""Sound before/after evaluation, export of the fine-tuned model, the report and its plots.

Only :func:`sound_evaluation` produces numbers that the report calls certified: it runs
:meth:`LipModel.certify` (float64 logits, sound margin constants) and :meth:`LipModel.bounds` on a model
loaded by :func:`lipverify.load` — for the "after" column, the *exported ONNX file*, re-imported with
the onnxruntime fidelity check.  Training-time values are labelled as estimates.
"""

from __future__ import annotations

import io
import math
import time

import numpy as np
import torch

from lipverify.certify import repr_eps
from lipverify.certify.rules import certified_at
from lipverify.report.plots import png_bytes, pyplot


def sound_evaluation(lm, x, y, eps_list, norm: str = "2", batch_size: int = 256, method: str = "global",
                     progress=None) -> dict:
    t0 = time.perf_counter()
    res = lm.certify(x, y, eps=eps_list, norm=norm, method=method, batch_size=batch_size, progress=progress)
    b = lm.bounds(norm=norm)
    radii = [c.radius if c.sound else 0.0 for c in res.inputs]
    correct = [c.label == c.pred for c in res.inputs]
    return {
        "n": res.n, "norm": norm, "method": method,
        "clean_accuracy": res.clean_accuracy,
        "vra": {repr_eps(k): v for k, v in res.vra.items()},
        "vra_with_estimates": {repr_eps(k): v for k, v in res.vra_with_estimates.items()},
        "median_radius": res.median_radius,
        "global_bound": b.global_bound.value, "global_bound_sound": b.global_bound.sound,
        "global_bound_method": b.global_bound.method,
        "max_margin_constant": b.margin.max, "margin_method": b.margin.method, "margin_sound": b.margin.sound,
        "sound": bool(b.margin.sound and b.global_bound.sound),
        "time_s": time.perf_counter() - t0,
        "_radii": radii, "_correct": correct,
    }


def local_estimate_vra(lm, x, y, eps_list, norm: str = "2", batch_size: int = 64) -> dict:
    """VRA at each eps if the power-iteration estimates of the masked norms were counted (what the
    ``local`` training loss optimises): correct and ``f_y - f_j > eps K^est_yj`` for all ``j``, with
    ``K^est`` the ``K_estimate`` of :func:`lipverify.bounds.local.local_margin_constants` (clamped to
    the sound local ``K``).  Not a certificate: reported next to the sound VRA to show the gap."""
    from lipverify.bounds.local import local_margin_constants

    x = torch.as_tensor(np.asarray(x), dtype=torch.float64).reshape((-1,) + tuple(lm.input_shape))
    y = torch.as_tensor(np.asarray(y)).long().reshape(-1)
    with torch.no_grad():
        logits = lm.module_double()(x.to(lm.device)).reshape(len(x), -1).cpu()
    pred = logits.argmax(1)
    n = len(y)
    out = {}
    warm: dict = {}
    for e in eps_list:
        ok = torch.zeros(n, dtype=torch.bool)
        for s in range(0, n, batch_size):
            sl = slice(s, min(n, s + batch_size))
            r = local_margin_constants(lm.graph, x[sl].to(lm.device), float(e), norm, warm_start=warm,
                                       domain=lm.effective_domain(), rows=pred[sl], estimate=True)
            Ky = r.K_estimate.cpu()[torch.arange(sl.stop - s), pred[sl]]
            d = logits[sl].gather(1, pred[sl, None]) - logits[sl]
            others = torch.arange(logits.shape[1])[None] != pred[sl, None]
            eps_b = torch.full((len(Ky),), float(e), dtype=torch.float64)
            ok[sl] = (pred[sl] == y[sl]) & certified_at(d, others, Ky, eps_b)
        out[repr_eps(e)] = float(ok.double().mean())
    return out


def public(d: dict | None) -> dict | None:
    return None if d is None else {k: v for k, v in d.items() if not k.startswith("_")}


def export_onnx_bytes(module: torch.nn.Module, input_shape) -> bytes:
    """``torch.onnx.export(..., dynamo=False, opset_version=17)`` with a dynamic batch dimension."""
    from lipverify.importers.onnx import export_to_onnx

    return export_to_onnx(module, tuple(input_shape), None)


def state_dict_bytes(module: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    sd = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    torch.save(sd, buf)
    return buf.getvalue()


def _fmt_pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def _fmt_num(v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4g}"


def table(before: dict, after: dict, eps_keys: list[str], extra_rows=()) -> str:
    rows = [("clean accuracy", _fmt_pct(before["clean_accuracy"]), _fmt_pct(after["clean_accuracy"]))]
    for e in eps_keys:
        rows.append((f"VRA @ eps={e} (l{before['norm']})", _fmt_pct(before["vra"].get(e)), _fmt_pct(after["vra"].get(e))))
    rows.append(("median certified radius", _fmt_num(before["median_radius"]), _fmt_num(after["median_radius"])))
    rows.append(("global Lipschitz bound", _fmt_num(before["global_bound"]), _fmt_num(after["global_bound"])))
    rows.append(("largest margin constant K", _fmt_num(before["max_margin_constant"]),
                 _fmt_num(after["max_margin_constant"])))
    rows.extend(extra_rows)
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(10, max(len(r[1]) for r in rows) + 2)
    lines = [f"{'':<{w0}}{'before':>{w1}}{'after (re-verified)':>22}"]
    for a, b, c in rows:
        lines.append(f"{a:<{w0}}{b:>{w1}}{c:>22}")
    return "\n".join(lines)


def curves_png(history: list[dict], eps: float) -> bytes:
    """Per-epoch curves: loss; accuracy and VRA estimates; global bound estimate; eps and lr."""
    plt = pyplot()
    ep = [h["epoch"] for h in history]
    mk = "o" if len(ep) <= 30 else None
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    a = ax[0, 0]
    a.plot(ep, [h["loss"] for h in history], marker=mk)
    a.set_title("training loss")
    a.set_xlabel("epoch")
    a = ax[0, 1]
    a.plot(ep, [h["train_accuracy"] for h in history], label="train accuracy")
    a.plot(ep, [h["train_vra_estimate"] for h in history], label=f"train VRA @ {eps:g} (estimate)")
    if history and "eval_vra_estimate" in history[0]:
        a.plot(ep, [h.get("eval_accuracy_estimate") for h in history], label="eval accuracy", ls="--")
        a.plot(ep, [h.get("eval_vra_estimate") for h in history], label=f"eval VRA @ {eps:g} (estimate)", ls="--")
    a.set_ylim(0, 1.02)
    a.set_title("accuracy / VRA (training-time bound: estimates)")
    a.set_xlabel("epoch")
    a.legend(fontsize=8)
    a = ax[1, 0]
    a.plot(ep, [h["global_bound_estimate"] for h in history], marker=mk)
    a.set_yscale("log")
    a.set_title("global Lipschitz bound (power-iteration estimate)")
    a.set_xlabel("epoch")
    a = ax[1, 1]
    a.plot(ep, [h["eps_train"] for h in history], label="training eps", color="tab:green")
    a.set_xlabel("epoch")
    a.set_ylabel("eps")
    b = a.twinx()
    b.plot(ep, [h["lr"] for h in history], label="learning rate", color="tab:red")
    b.set_ylabel("lr")
    a.set_title("schedules (end of epoch)")
    return png_bytes(fig)


def before_after_png(before: dict, after: dict, norm: str, eps_marks=()) -> bytes:
    """Certified accuracy against eps, before and after (sound, from the re-imported model)."""
    plt = pyplot()
    fig, a = plt.subplots(1, 1, figsize=(6, 4))
    tops = []
    for d in (before, after):
        r = np.where(np.array(d["_correct"]), np.array(d["_radii"]), 0.0)
        tops.append(float(r.max()) if len(r) else 0.0)
    top = max(max(tops), max(eps_marks, default=0.0), 1e-6) * 1.1
    grid = np.linspace(0, top, 200)
    for d, lab in ((before, "before"), (after, "after (re-verified)")):
        r = np.where(np.array(d["_correct"]), np.array(d["_radii"]), 0.0)
        a.plot(grid, [(r > e).mean() for e in grid], label=lab)
    for e in eps_marks:
        a.axvline(e, color="grey", ls=":", lw=1)
    a.set_xlabel(f"eps (l{norm})")
    a.set_ylabel("certified accuracy")
    a.set_ylim(0, 1.02)
    a.legend()
    return png_bytes(fig)
