"""Counterexample files in the verification competition's format, one per broken VNN-LIB instance.

Each file is the competition's witness format: ``((X_0 v) (X_1 v) ... (Y_0 v) ...)`` with ``X_i`` the
row-major flattening of the model's own input tensor (model-input units, i.e. after any outside
normalisation) and ``Y_j`` the model's outputs on it, so that anyone can re-check the claim with the
specification and the ONNX file alone.  A file is written only after the point was checked here in
float64: inside the specification's box and satisfying its output condition (some named target scores
at least the label).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lipverify.io_utils import atomic_write_text

__all__ = ["counterexample_text", "write_counterexamples"]


def counterexample_text(x_model: torch.Tensor, y_out: torch.Tensor) -> str:
    """The competition's witness text for one input (model units) and its outputs."""
    xs = x_model.reshape(-1).tolist()
    ys = y_out.reshape(-1).tolist()
    lines = [f"(X_{i} {repr(float(v))})" for i, v in enumerate(xs)]
    lines += [f"(Y_{j} {repr(float(v))})" for j, v in enumerate(ys)]
    return "(" + "\n".join(lines) + ")\n"


def write_counterexamples(save_path, lm, ds, rep) -> list[str]:
    """Write ``<save stem>_counterexamples/<spec>.counterexample`` for every instance broken in ``rep``.

    Returns the paths written.  ``lm.module`` maps pixels to logits (an outside normalisation in front);
    its inner model is what the specification constrains.
    """
    folder = Path(save_path).with_name(Path(save_path).stem + "_counterexamples")
    inner64 = lm.module_double()
    norm = getattr(inner64, "normalize", None)
    model64 = getattr(inner64, "model", inner64)
    written = []
    for i in range(rep.n):
        if not math.isfinite(float(rep.radius[i])) or float(rep.radius[i]) == 0 and bool(rep.correct[i]):
            continue
        z = rep.x_adv[i:i + 1].to(torch.float64).to(lm.device)
        if norm is not None:
            z = (z - norm.mean) / norm.std
        z = torch.maximum(torch.minimum(z, ds.upper[i:i + 1].to(z)), ds.lower[i:i + 1].to(z))
        with torch.no_grad():
            out = model64(z).reshape(-1).cpu()
        label = int(ds.y[i])
        targets = ds.targets[i] if ds.targets is not None and ds.targets[i] else \
            [j for j in range(out.numel()) if j != label]
        if not any(float(out[t]) >= float(out[label]) for t in targets):
            continue
        name = Path(ds.names[i]).name
        stem = name[: -len(".vnnlib")] if name.endswith(".vnnlib") else name
        path = folder / (ds.names[i].replace("/", "__")[: -len(name)] + stem + ".counterexample")
        atomic_write_text(path, counterexample_text(z.cpu(), out))
        written.append(str(path))
    return written
