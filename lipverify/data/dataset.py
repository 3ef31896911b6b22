"""The :class:`Dataset` every loader returns, and the checks they share (finite values, labels in
range, fitting the model's input shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lipverify.errors import UserInputError

LAYOUTS = ("nchw", "nhwc")


@dataclass
class Dataset:
    """Labelled examples in the model's input units.

    ``x``: float32 ``(N, *input_shape)``. ``y``: int64 ``(N,)``. ``eps``: float64 ``(N,)`` l-inf radius
    of each example's VNN-LIB box (``None`` for other formats). ``targets``: for VNN-LIB, the classes
    named by each spec's output condition (a counterexample is an input in the box where any of them
    scores at least the label); ``None`` for other formats (and for specs without a label). ``properties``: for VNN-LIB, each
    spec's output condition as an :class:`lipverify.data.properties.OutputProperty` (every form: a
    label's robustness, targeted conjunctions, disjunctions of conjunctions of linear constraints);
    ``y`` is -1 where a spec has no single label. ``names``: one identifier per example.
    ``notes``: things the user should be told (reshapes, transposes, conventions). ``source``: the
    path that was loaded. ``lower``/``upper``: float64 ``(N, *input_shape)`` exact VNN-LIB box, else
    ``None``.
    """

    x: torch.Tensor
    y: torch.Tensor
    eps: torch.Tensor | None
    targets: list[list[int] | None] | None
    names: list[str]
    notes: list[str]
    source: str
    lower: torch.Tensor | None = None
    upper: torch.Tensor | None = None
    properties: list | None = None
    box_map: tuple | None = None  # (mean, std): lower/upper (model units) -> units of x, when they differ

    def box(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The exact VNN-LIB box in the units of ``x`` (float64), or None without one."""
        if self.lower is None or self.upper is None:
            return None
        lo, hi = self.lower.double(), self.upper.double()
        if self.box_map is not None:
            mean, std = (t.double().cpu() for t in self.box_map)
            lo, hi = lo * std + mean, hi * std + mean
        return lo, hi

    @property
    def labelled(self) -> bool:
        """False when some example has no label (a VNN-LIB spec with a general output property; its
        ``y`` is -1 and ``properties`` holds the condition)."""
        return not bool((self.y < 0).any())

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx) -> "Dataset":
        """The examples selected by ``idx`` (an int, a slice, a sequence/array/tensor of indices, or a
        boolean mask of length N), in that order."""
        index = as_index(idx, len(self))
        pos = index.tolist()
        return Dataset(
            x=self.x[index],
            y=self.y[index],
            eps=None if self.eps is None else self.eps[index],
            targets=None if self.targets is None else [self.targets[i] for i in pos],
            names=[self.names[i] for i in pos],
            notes=list(self.notes),
            source=self.source,
            lower=None if self.lower is None else self.lower[index],
            upper=None if self.upper is None else self.upper[index],
            properties=None if self.properties is None else [self.properties[i] for i in pos],
            box_map=self.box_map,
        )


def as_index(idx, n: int) -> torch.Tensor:
    if isinstance(idx, slice):
        return torch.arange(n)[idx]
    if isinstance(idx, (int, np.integer)):
        idx = [int(idx)]
    t = torch.as_tensor(np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx))
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise IndexError(f"boolean mask of shape {tuple(t.shape)} for {n} examples")
        return torch.nonzero(t).flatten()
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise IndexError("subset indices must be integers")
    t = t.to(torch.long).flatten()
    if bool(((t < -n) | (t >= n)).any()):
        raise IndexError(f"subset index out of range for {n} examples")
    return torch.where(t < 0, t + n, t)


def whole_batches(n: int, rank: int, world: int, batch_size: int) -> slice:
    """The slice of ``n`` inputs that rank ``rank`` of ``world`` processes (``torchrun``): a contiguous
    run of whole batches of ``batch_size`` (the last batch may be short), so every rank runs exactly
    the batches one process would run."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    batches = -(-n // batch_size) if n else 0
    lo = (batches * rank) // world
    hi = (batches * (rank + 1)) // world
    return slice(min(lo * batch_size, n), min(hi * batch_size, n))


def fmt_shape(shape) -> str:
    return str(tuple(int(d) for d in shape))


def check_finite(x: np.ndarray, names: list[str], path: Path) -> None:
    bad = ~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise UserInputError(
            f"inputs contain NaN or infinite values ({int(bad.sum())} example(s), first {names[first]})",
            path=str(path),
        )


def check_labels(y: np.ndarray, names: list[str], n_classes: int | None, path: Path) -> None:
    neg = np.flatnonzero(y < 0)
    if neg.size:
        i = int(neg[0])
        raise UserInputError(f"label {int(y[i])} of {names[i]} is negative", path=str(path))
    if n_classes is not None:
        out = np.flatnonzero(y >= n_classes)
        if out.size:
            i = int(out[0])
            raise UserInputError(
                f"label {int(y[i])} of {names[i]} is outside [0, {n_classes}) "
                f"({out.size} label(s) out of range)",
                path=str(path),
            )


def fit_shape(x: np.ndarray, shape: tuple[int, ...], layout: str, path: Path, notes: list[str]) -> np.ndarray:
    """Bring ``x`` (N, ...) to (N, *shape), reshaping row-major or transposing channel-last data."""
    n = x.shape[0]
    per = tuple(x.shape[1:])
    count = math.prod(shape)
    if layout == "nhwc":
        if len(shape) != 3:
            raise UserInputError(
                f"layout 'nhwc' needs a model input of shape (C, H, W); the model input has shape {fmt_shape(shape)}",
                path=str(path),
            )
        c, h, w = shape
        hwc = (h, w, c)
        if per != hwc:
            if len(per) == 1 and per[0] == count:
                notes.append(f"reshaped {fmt_shape(x.shape)} -> {fmt_shape((n, *hwc))} row-major (channel-last)")
                x = x.reshape((n, *hwc))
            else:
                raise UserInputError(
                    f"layout 'nhwc' expects each example to have shape {fmt_shape(hwc)} (or {count} values "
                    f"flat), but the file has {fmt_shape(per)}",
                    path=str(path),
                )
        notes.append(
            f"transposed channel-last {fmt_shape((n, *hwc))} -> channel-first {fmt_shape((n, *shape))} (layout 'nhwc')"
        )
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if per == shape:
        return x
    if math.prod(per) != count:
        raise UserInputError(
            f"each example has shape {fmt_shape(per)} ({math.prod(per)} values) but the model input has "
            f"shape {fmt_shape(shape)} ({count} values)",
            path=str(path),
        )
    if len(shape) == 3 and shape[0] > 1 and per == (shape[1], shape[2], shape[0]):
        raise UserInputError(
            f"examples have shape {fmt_shape(per)}, which looks channel-last for a model input of shape "
            f"{fmt_shape(shape)}; pass layout 'nhwc' to transpose them (a plain reshape would scramble them)",
            path=str(path),
        )
    notes.append(f"reshaped {fmt_shape(x.shape)} -> {fmt_shape((n, *shape))} row-major")
    return x.reshape((n, *shape))


def oneline(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
