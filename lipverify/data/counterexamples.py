"""Counterexample files in the verification competition's format, one per broken VNN-LIB instance.

Each file is the competition's witness format: ``((X_0 v) (X_1 v) ... (Y_0 v) ...)`` with ``X_i`` the
row-major flattening of the model's own input tensor (model-input units, i.e. after any outside
normalisation) and ``Y_j`` the model's outputs on it, so that anyone can re-check the claim with the
specification and the ONNX file alone.  A file is written only after the point was checked here: its
``X_i`` are float32 numbers (what a float32 runtime reads back exactly) inside the specification's
float64 box, and the specification's own output condition (any VNN-LIB form) holds both in
float64 and in float32.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lipverify.data.atomic import atomic_write_text

__all__ = ["check_witnesses", "counterexample_text", "find_counterexamples", "float32_box", "spec_property",
           "write_counterexamples"]


def float32_box(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest box of float32 numbers inside the float64 box ``[lo, hi]`` (each end rounded inwards;
    an end where that would cross the other keeps the nearest float32 value)."""
    lo64, hi64 = lo.to(torch.float64), hi.to(torch.float64)
    lo32, hi32 = lo64.to(torch.float32), hi64.to(torch.float32)
    lo32 = torch.where(lo32.to(torch.float64) < lo64, torch.nextafter(lo32, torch.full_like(lo32, math.inf)), lo32)
    hi32 = torch.where(hi32.to(torch.float64) > hi64, torch.nextafter(hi32, torch.full_like(hi32, -math.inf)), hi32)
    crossed = lo32 > hi32
    return torch.where(crossed, hi64.to(torch.float32), lo32), torch.where(crossed, hi64.to(torch.float32), hi32)


def counterexample_text(x_model: torch.Tensor, y_out: torch.Tensor) -> str:
    """The competition's witness text for one input (model units) and its outputs."""
    xs = x_model.reshape(-1).tolist()
    ys = y_out.reshape(-1).tolist()
    lines = [f"(X_{i} {repr(float(v))})" for i, v in enumerate(xs)]
    lines += [f"(Y_{j} {repr(float(v))})" for j, v in enumerate(ys)]
    return "(" + "\n".join(lines) + ")\n"


def _deepest(z_pix, x_pix, norm, model64, lower, upper, prop):
    """The point found by an attack is often a near-tie; a witness should be unambiguous.  Scan the
    ray from the clean input through it, ``x + t (z - x)`` for ``t`` in [1, 64], each point rounded to
    float32 inside the box, and keep the one whose condition holds by the widest float64 margin."""
    dev = z_pix.device
    lo32, hi32 = (b.to(dev) for b in float32_box(lower, upper))
    x64, d64 = x_pix.to(torch.float64), z_pix.to(torch.float64) - x_pix.to(torch.float64)
    ts = torch.cat([torch.ones(1, dtype=torch.float64), torch.logspace(-3, math.log10(63), 40, dtype=torch.float64) + 1])
    cands = x64 + ts.reshape(-1, *([1] * (x64.dim() - 1))) * d64
    if norm is not None:
        cands = (cands - norm.mean) / norm.std
    cands = torch.maximum(torch.minimum(cands.to(torch.float32), hi32), lo32)
    with torch.no_grad():
        out = model64(cands.to(torch.float64)).reshape(len(ts), -1)
    k = int(prop.slack(out.cpu()).argmin())
    return cands[k: k + 1]


def spec_property(lm, ds, i):
    """The output property of example ``i`` (the robustness of its label when the data has none)."""
    from lipverify.data.properties import OutputProperty

    if ds.properties is not None and ds.properties[i] is not None:
        return ds.properties[i]
    label = int(ds.y[i])
    targets = ds.targets[i] if ds.targets is not None and ds.targets[i] else \
        [j for j in range(int(lm.n_classes)) if j != label]
    return OutputProperty.robustness(label, targets, int(lm.n_classes))


def check_witnesses(lm, ds, points: dict) -> dict:
    """The checked witnesses among candidate points ``{row: z}`` (units of ``ds.x``):
    ``{row: (x in model units, float64 outputs)}``.

    A row counts only when its point, moved along its ray (:func:`_deepest`) and rounded to float32
    inside the specification's box, satisfies the specification's own output condition in float64
    and in float32.  ``lm.module`` maps the units of ``ds.x`` to logits (an outside normalisation in
    front); its inner model is what the specification constrains.
    """
    inner64 = lm.module_double()
    norm = getattr(inner64, "normalize", None)
    model64 = getattr(inner64, "model", inner64)
    model32 = getattr(lm.module, "model", lm.module)
    found = {}
    for i, z in points.items():
        prop = spec_property(lm, ds, i)
        z32 = _deepest(z.reshape(1, *ds.x.shape[1:]).to(lm.device), ds.x[i:i + 1].to(lm.device), norm, model64,
                       ds.lower[i:i + 1], ds.upper[i:i + 1], prop)
        with torch.no_grad():
            out = model64(z32.to(torch.float64)).reshape(1, -1).cpu()
            out32 = model32(z32).reshape(1, -1).cpu().to(torch.float64)
        if bool(prop.is_counterexample(out)[0]) and bool(prop.is_counterexample(out32)[0]):
            found[i] = (z32.to(torch.float64).cpu(), out[0])
    return found


def find_counterexamples(lm, ds, rep) -> dict:
    """The checked witnesses (:func:`check_witnesses`) among the adversarial points of ``rep`` (a
    :class:`lipverify.attacks.evaluate.RobustnessReport`): the radius alone says "misclassified",
    which for a targeted specification is not yet a counterexample."""
    return check_witnesses(lm, ds, {i: rep.x_adv[i] for i in range(rep.n) if math.isfinite(float(rep.radius[i]))})


def write_counterexamples(save_path, ds, found: dict) -> list[str]:
    """Write ``<save stem>_counterexamples/<spec>.counterexample`` for every witness of
    :func:`find_counterexamples`.  Returns the paths written."""
    folder = Path(save_path).with_name(Path(save_path).stem + "_counterexamples")
    written = []
    for i, (z, out) in sorted(found.items()):
        name = Path(ds.names[i]).name
        stem = name[: -len(".vnnlib")] if name.endswith(".vnnlib") else name
        path = folder / (ds.names[i].replace("/", "__")[: -len(name)] + stem + ".counterexample")
        atomic_write_text(path, counterexample_text(z, out))
        written.append(str(path))
    return written
