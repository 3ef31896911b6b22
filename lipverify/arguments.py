"""Arguments the Python API and the command line share: norms, radii, the input box, input arrays.

One parser per kind of argument, so that ``LipModel.certify(norm="L2")`` and ``lipverify certify
--norm L2`` accept the same spellings and mean the same thing:

* :func:`parse_norm`: ``2``, ``"2"``, ``"l2"``, ``"L2"`` -> ``"2"``; ``inf``, ``float("inf")``,
  ``"inf"``, ``"linf"``, ``"Linf"``, ``"l_inf"`` -> ``"inf"`` (:data:`NORM_SPELLINGS`);
* :func:`parse_eps`: radii as a float, a list or tuple, or a comma-separated string with fractions
  (``"8/255,16/255"``); :func:`eps_key`: the one string form of a radius in JSON and CSV output;
* :func:`default_box` / :func:`resolve_box`: the input box of attacks (``[0, 1]`` when every input
  lies in it, else none; ``None`` or ``"none"`` opts out);
* :func:`as_inputs`: ``x`` and ``y`` from NumPy arrays or torch tensors, with their shapes checked.

Radii are Python floats everywhere in results (``res.vra[0.5]``); JSON objects key them by
:func:`eps_key`, the shortest decimal string that reads back as the same float (``"0.5"``, ``"3"``,
``"0.03137254901960784"`` for 8/255), so ``float(key) == eps`` exactly and two different radii never
share a key.

This module imports only :mod:`lipverify.errors` (torch and NumPy when called), so every layer, the
attacks included, may use it.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from lipverify.errors import UserInputError

__all__ = ["NORM_SPELLINGS", "AUTO", "as_inputs", "default_box", "eps_key", "parse_eps", "parse_norm",
           "resolve_box"]

#: accepted spellings per canonical norm (case-insensitive; the numbers 2 and ``float("inf")`` too)
NORM_SPELLINGS = {"2": ("2", "l2", "l_2", "l-2"), "inf": ("inf", "linf", "l_inf", "l-inf", "infinity")}
_NORMS = {s: k for k, v in NORM_SPELLINGS.items() for s in v}
#: the default of ``clip``: the box :func:`default_box` picks from the inputs
AUTO = "auto"


def norm_help() -> str:
    """The accepted spellings, for messages and ``--help``."""
    return "2 (also l2, L2) or inf (also linf, Linf, l_inf, infinity)"


def parse_norm(norm: Any) -> str:
    """The canonical name ``"2"`` or ``"inf"`` of a norm.

    Accepts the numbers ``2`` and ``float("inf")`` (``math.inf``, ``numpy.inf``) and the strings of
    :data:`NORM_SPELLINGS` in any case, with surrounding blanks.

    Warnings
    --------
    Anything else (``1``, ``"l1"``, ``True``) raises :class:`~lipverify.errors.UserInputError` naming
    the accepted spellings.
    """
    if not isinstance(norm, bool):
        if isinstance(norm, (int, float)) or type(norm).__module__ == "numpy":
            try:
                v = float(norm)
            except (TypeError, ValueError):
                v = None
            if v == 2.0:
                return "2"
            if v == math.inf:
                return "inf"
        elif isinstance(norm, str):
            s = norm.strip().lower()
            if s in _NORMS:
                return _NORMS[s]
            if s in ("2.0", "+inf"):
                return "2" if s == "2.0" else "inf"
    raise UserInputError(f"norm must be {norm_help()}; got {norm!r}")


def parse_eps(eps: Any) -> list[float]:
    """Radii as a list of floats (in the order given, duplicates kept).

    ``eps``: None (no radius), a number (int, float, NumPy or 0-d torch scalar), a list, tuple or 1-d
    array of numbers or strings, or a string of comma-separated decimals and fractions
    (``"0.1,36/255"``; ``"8/255"`` is ``8 / 255`` in float64).

    Warnings
    --------
    A radius that is not a finite number ``>= 0`` raises :class:`~lipverify.errors.UserInputError`.
    """
    if eps is None:
        return []
    if hasattr(eps, "tolist") and not isinstance(eps, (str, bytes)):  # numpy / torch
        eps = eps.tolist()
    if isinstance(eps, bool):
        raise UserInputError(f"eps (--eps) must be numbers or fractions like 36/255, got {eps!r}")
    if isinstance(eps, (int, float)):
        parts: list = [eps]
    elif isinstance(eps, (list, tuple, set, frozenset)):
        parts = []
        for p in (sorted(eps) if isinstance(eps, (set, frozenset)) else eps):
            parts.extend(parse_eps(p) if isinstance(p, str) else [p])
    else:
        parts = [p.strip() for p in str(eps).split(",") if p.strip()]
    vals = []
    for part in parts:
        if isinstance(part, bool):
            raise UserInputError(f"eps (--eps) must be numbers or fractions like 36/255, got {part!r}")
        try:
            v = float(Fraction(part)) if isinstance(part, str) else float(part)
        except OverflowError:
            raise UserInputError(f"eps (--eps) values must be finite and >= 0, got {part!r} (too large)") from None
        except (ValueError, ZeroDivisionError, TypeError):
            raise UserInputError(f"eps (--eps) must be numbers or fractions like 36/255, got {part!r}") from None
        if not math.isfinite(v) or v < 0:
            raise UserInputError(f"eps (--eps) values must be finite and >= 0, got {v}")
        vals.append(v)
    return vals


def eps_key(e: Any) -> str:
    """The JSON/CSV key of a radius: the shortest decimal that reads back as the same float64
    (``repr(float(e))``, without the ``.0`` of whole numbers): ``0.5 -> "0.5"``, ``3.0 -> "3"``,
    ``8/255 -> "0.03137254901960784"``; ``float(eps_key(e)) == e``.  Strings (e.g.
    ``"per-example"``) are returned as they are."""
    if isinstance(e, str):
        return e
    s = repr(float(e))
    return s[:-2] if s.endswith(".0") else s


def default_box(x) -> tuple[float, float] | None:
    """The input box used when none is given: ``(0.0, 1.0)`` when every entry of ``x`` lies in
    ``[0, 1]`` (images scaled by 1/255), else None (no box).  ``x``: a tensor or array (an empty one
    gives ``(0.0, 1.0)``)."""
    if hasattr(x, "numel") and x.numel() == 0 or getattr(x, "size", 1) == 0:
        return (0.0, 1.0)
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0.0 and hi <= 1.0:
        return (0.0, 1.0)
    return None


def parse_box(text: str) -> tuple[float, float]:
    """``"LO,HI"`` with finite ``LO < HI``.

    Warnings
    --------
    Anything else raises :class:`~lipverify.errors.UserInputError`."""
    vals = [v.strip() for v in str(text).split(",")]
    try:
        lo, hi = (float(v) for v in vals) if len(vals) == 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UserInputError(f"clip (--clip) must be LO,HI with finite LO < HI, got {text!r}")
    return lo, hi


def resolve_box(clip: Any, x):
    """The input box of an analysis from its ``clip`` argument (API and ``--clip`` alike).

    * ``"auto"`` (the default everywhere): :func:`default_box` of ``x``;
    * ``None`` or ``"none"``: no box (perturbations may leave the data range);
    * ``"LO,HI"`` or ``(lo, hi)`` floats: that box (finite, ``lo < hi``);
    * ``(lo, hi)`` tensors: a per-coordinate box, returned as given.

    Warnings
    --------
    A malformed box raises :class:`~lipverify.errors.UserInputError`.
    """
    if isinstance(clip, str):
        s = clip.strip().lower()
        if s == AUTO:
            return default_box(x)
        if s == "none":
            return None
        return parse_box(clip)
    if clip is None:
        return None
    try:
        lo, hi = clip
    except (TypeError, ValueError):
        raise UserInputError(f"clip must be 'auto', None, 'none' or (lo, hi), got {clip!r}") from None
    if hasattr(lo, "shape") and getattr(lo, "ndim", 0) > 0 or hasattr(hi, "shape") and getattr(hi, "ndim", 0) > 0:
        return lo, hi
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UserInputError(f"clip must be (lo, hi) with finite lo < hi, got {clip!r}")
    return lo, hi


_FLOATS = ("float16", "bfloat16", "float32", "float64")


def as_inputs(x, y=None, input_shape=None, n_classes: int | None = None):
    """``x`` (float32 tensor ``(N, *input_shape)``) and ``y`` (int64 tensor ``(N,)``) from NumPy arrays
    or torch tensors.

    ``x``: any floating dtype.  float32 and float64 are kept as given (certificates speak of the input
    as given: a float64 input float32 cannot represent is decided in float64, never rounded first);
    float16 and bfloat16 are widened to float32 (exactly).  A NumPy array and a torch tensor of the
    same dtype give identical results.  ``y``: any integer dtype, shape ``(N,)`` (or ``(N, 1)``),
    values in ``[0, n_classes)``.  ``y=None`` returns ``(x, None)``.

    Warnings
    --------
    Raises :class:`~lipverify.errors.UserInputError` for: integer ``x`` (uint8 images must be scaled
    by 1/255 first: ``x.astype("float32") / 255``), a shape other than ``(N, *input_shape)``, float
    or boolean labels, a label count other than ``N``, labels outside ``[0, n_classes)``.
    """
    import numpy as np
    import torch

    def tensor(v, what):
        if isinstance(v, torch.Tensor):
            return v.detach()
        if isinstance(v, (np.ndarray, np.generic, list, tuple)):
            a = np.asarray(v)
            if a.dtype == object:
                raise UserInputError(f"{what} must be a numeric array, got an array of Python objects")
            return torch.from_numpy(np.ascontiguousarray(a))
        raise UserInputError(f"{what} must be a NumPy array or a torch tensor, got {type(v).__name__}")

    xt = tensor(x, "x")
    dt = str(xt.dtype).replace("torch.", "")
    if dt not in _FLOATS:
        hint = (" (uint8 images: scale them by 1/255 first, e.g. x.astype('float32') / 255)"
                if dt in ("uint8", "int8", "int16", "int32", "int64") else "")
        raise UserInputError(f"x must be a floating-point array, got dtype {dt}{hint}")
    if xt.dtype not in (torch.float32, torch.float64):
        xt = xt.to(torch.float32)
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if tuple(xt.shape[1:]) != shape:
            one = " (one input: add the batch dimension, x[None])" if tuple(xt.shape) == shape else ""
            raise UserInputError(f"x must have shape (N, {', '.join(map(str, shape))}), got "
                                 f"{tuple(xt.shape)}{one}")
    if y is None:
        return xt, None
    yt = tensor(y, "y")
    if yt.dtype == torch.bool or yt.is_floating_point() or yt.is_complex():
        raise UserInputError(f"y must hold integer class labels, got dtype {str(yt.dtype).replace('torch.', '')}")
    if yt.dim() == 2 and yt.shape[1] == 1:
        yt = yt[:, 0]
    if yt.dim() != 1 or len(yt) != len(xt):
        raise UserInputError(f"y must have shape ({len(xt)},): one label per input, got {tuple(yt.shape)}")
    yt = yt.to(torch.int64)
    if n_classes is not None and len(yt) and (int(yt.min()) < 0 or int(yt.max()) >= n_classes):
        raise UserInputError(f"labels must lie in [0, {n_classes - 1}] (the model has {n_classes} outputs), got "
                             f"values in [{int(yt.min())}, {int(yt.max())}]")
    return xt, yt
