"""Verification-competition specifications: an l-inf box and an output condition per file.

VNN-LIB robustness specifications
    A single ``.vnnlib`` (or ``.vnnlib.gz``) file, or a folder of them (searched recursively, sorted by
    relative path; one example per file). A file declares inputs ``X_i`` and outputs ``Y_j`` as
    ``Real``, bounds each input from both sides with ``(assert (<= X_i v))`` / ``(assert (>= X_i v))``
    (or with the constant first, ``(assert (<= v X_i))``), and states the output condition of a
    *counterexample*. ``X_i`` indexes the row-major flattening of the model's input tensor. Two
    output conditions are understood:

    * untargeted: ``(assert (or (and (>= Y_1 Y_0)) (and (>= Y_2 Y_0)) ...))`` -- a counterexample is
      any input in the box where one of the listed classes scores at least the label (here 0). The
      mirrored ``(<= Y_0 Y_1)`` and disjuncts without the ``and`` wrapper mean the same.
    * targeted: a single ``(assert (>= Y_t Y_l))`` or ``(assert (<= Y_l Y_t))`` -- label ``l``,
      target ``t``.

    The box is an l-inf ball around a clean input, clipped to the valid input range, so its midpoint
    is not the clean input where it was clipped. The clean input is recovered per dimension: ``eps``
    is the largest half-width; a dimension whose width is ``2*eps`` gives its midpoint; one whose
    lower bound sits at the range minimum (the smallest lower bound) gives ``ub - eps``; any other
    gives ``lb + eps``. For channel-first inputs ``(C, H, W)`` the rule is applied per channel, so
    that boxes built with per-channel radii (normalisation with a per-channel std outside the
    network) and per-channel valid ranges are recovered exactly; ``eps`` reported per example is
    the largest radius over all channels, and ``lower``/``upper`` keep the exact box.

Every file may come from a stranger: it is read only if it is a regular file (a device, FIFO or
socket is refused by what it is, also behind a symbolic link), of at most
:data:`~lipverify.limits.MAX_SPEC_BYTES` on disk and after ``.gz`` decompression (a bomb is refused
after that many bytes of output); in a folder, files and sub-folders reached through symbolic links
that leave the folder are refused (:mod:`lipverify.data.files`). The text is parsed without recursion
and in time linear in its size (:mod:`lipverify.data.vnnlib_parse`). The declared variables are
compared with the model's input size and class count before anything sized by them is allocated,
and the memory of the boxes and of the constraint matrix is checked against the memory limit
(:func:`lipverify.limits.check_alloc`) before it is allocated.

Warnings
--------
Every problem raises :class:`~lipverify.errors.UserInputError` naming the file, on one line: a
missing, empty, special, oversized or non-text file, a ``.gz`` that is not gzip or decompresses past
the limit, a symbolic link leaving the folder, a syntax error or an unsupported form (see
:mod:`lipverify.data.vnnlib_parse`), more declared inputs/outputs than the model has (or fewer), gaps
in the numbering, bounds or output conditions on undeclared variables, a missing or non-finite bound,
an empty box, no output condition, and a spec or folder of specs too large for the memory limit.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lipverify.data.dataset import Dataset, check_labels, fmt_shape
from lipverify.data.files import walk_files
from lipverify.data.properties import OutputProperty
from lipverify.data.vnnlib_parse import scan
from lipverify.errors import UserInputError
from lipverify.limits import MAX_CLASSES, MAX_SPEC_BYTES, check_alloc, gunzip_capped, read_capped

SPEC_SUFFIXES = (".vnnlib", ".vnnlib.gz")


def is_spec_name(name: str) -> bool:
    return name.lower().endswith(SPEC_SUFFIXES)


def vnnlib_files(folder: Path) -> list[Path]:
    """The ``.vnnlib``/``.vnnlib.gz`` files under ``folder``, sorted by relative path; special files
    and symbolic links leaving the folder are refused (:func:`lipverify.data.files.walk_files`)."""
    return walk_files(folder, is_spec_name, "VNN-LIB file")


def read_text(path: Path) -> str:
    """The text of a spec: a regular file of at most ``MAX_SPEC_BYTES``, decompressed (to at most
    ``MAX_SPEC_BYTES``) when its name ends in ``.gz``."""
    raw = read_capped(path, MAX_SPEC_BYTES, "VNN-LIB file")
    if path.name.lower().endswith(".gz"):
        raw = gunzip_capped(raw, MAX_SPEC_BYTES, path, "VNN-LIB file")
    if not raw.strip():
        raise UserInputError("the file is empty", path=str(path))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserInputError("not a text file (VNN-LIB is plain text)", path=str(path)) from None


class _Spec:
    __slots__ = ("n_x", "n_y", "lb", "ub", "label", "targets", "prop")


def parse_vnnlib(path: Path, text: str, shape: tuple[int, ...] | None = None,
                 n_classes: int | None = None) -> _Spec:
    """Parse a spec's ``text``: its box and its output property.

    ``shape`` (the model's input shape) and ``n_classes``, when given, bound the declared variables:
    a spec declaring more inputs or outputs than the model has is refused before anything sized by
    them is allocated (fewer are refused by :func:`load_vnnlib`). Without them the box and the
    constraint matrix are still checked against the memory limit.

    Warnings
    --------
    Raises :class:`~lipverify.errors.UserInputError` naming ``path`` for every problem the module
    docstring lists (syntax, declarations past the model's sizes, gaps, undeclared variables,
    missing or non-finite bounds, an empty box, no output condition, memory).
    """
    path = Path(path)
    where = str(path)
    max_x = None if shape is None else math.prod(shape)
    max_y = MAX_CLASSES if n_classes is None else n_classes

    def declare(kind: str, i: int) -> None:  # refused on the first declaration past the model's sizes
        if kind == "X" and max_x is not None and i >= max_x:
            raise UserInputError(f"the spec declares X_{i} (at least {i + 1} inputs) but the model input has shape "
                                 f"{fmt_shape(shape)} ({max_x} values)", path=where)
        if kind == "Y" and i >= max_y:
            model = f"the model has {n_classes} classes" if n_classes is not None else \
                f"at most {MAX_CLASSES} outputs are supported"
            raise UserInputError(f"the spec declares Y_{i} (at least {i + 1} outputs) but {model}", path=where)

    s = scan(text, path, declare)
    if not s.xs:
        raise UserInputError("declares no input variables (declare-const X_i Real)", path=where)
    if not s.ys:
        raise UserInputError("declares no output variables (declare-const Y_j Real)", path=where)
    n_x, n_y = max(s.xs) + 1, max(s.ys) + 1
    if s.max_y >= n_y:
        raise UserInputError(f"output condition uses undeclared output Y_{s.max_y}", path=where)
    if len(s.xs) != n_x:
        raise UserInputError(f"input variables are not numbered X_0 .. X_{n_x - 1} without gaps", path=where)
    if len(s.ys) != n_y:
        raise UserInputError(f"output variables are not numbered Y_0 .. Y_{n_y - 1} without gaps", path=where)

    idx = np.frombuffer(s.bound_idx, dtype=np.int64) if len(s.bound_idx) else np.zeros(0, np.int64)
    val = np.frombuffer(s.bound_val, dtype=np.float64) if len(s.bound_val) else np.zeros(0)
    upper = np.frombuffer(bytes(s.bound_upper), dtype=np.uint8).astype(bool)
    if idx.size and int(idx.max()) >= n_x:
        raise UserInputError(f"bound on undeclared input X_{int(idx.max())}", path=where)
    if not np.isfinite(val).all():
        raise UserInputError("an input bound is not a finite number", path=where)
    check_alloc(4 * 8 * n_x, "the input box of the spec", where)
    lb = np.full(n_x, -np.inf)
    ub = np.full(n_x, np.inf)
    np.maximum.at(lb, idx[~upper], val[~upper])
    np.minimum.at(ub, idx[upper], val[upper])
    for arr, side in ((lb, "lower"), (ub, "upper")):
        missing = np.flatnonzero(~np.isfinite(arr))
        if missing.size:
            more = f" and {missing.size - 1} more" if missing.size > 1 else ""
            raise UserInputError(f"no {side} bound for X_{int(missing[0])}{more}", path=where)
    empty = np.flatnonzero(lb > ub)
    if empty.size:
        i = int(empty[0])
        raise UserInputError(f"empty box: X_{i} has lower bound {lb[i]!r} above upper bound {ub[i]!r}", path=where)
    if s.dnf is None:
        raise UserInputError("no output condition (assert over Y_j)", path=where)

    prop = _property(s, n_y, where)
    spec = _Spec()
    spec.n_x, spec.n_y, spec.lb, spec.ub, spec.label, spec.targets = n_x, n_y, lb, ub, prop.label, prop.targets
    spec.prop = prop
    return spec


def _property(s, n_y: int, where: str) -> OutputProperty:
    """The :class:`OutputProperty` of a scan: rows numbered in order of first use in the DNF."""
    order: dict[int, int] = {}
    disjuncts = []
    for conj in s.dnf:
        ids = set()
        for r in conj:
            k = order.get(r)
            if k is None:
                k = order[r] = len(order)
            ids.add(k)
        disjuncts.append(sorted(ids))
    m = len(order)
    check_alloc(8.0 * m * (n_y + 1), f"the {m} x {n_y} constraint matrix of the output condition", where)
    C = np.zeros((m, n_y))
    d = np.empty(m)
    rows_i, cols, vals = [], [], []
    for r, k in order.items():
        key = s.rows[r]  # (d, j1, c1, j2, c2, ...)
        d[k] = key[0]
        for t in range(1, len(key), 2):
            rows_i.append(k)
            cols.append(key[t])
            vals.append(key[t + 1])
    C[rows_i, cols] = vals
    return OutputProperty.from_rows(C, d, disjuncts)


def recover_clean_input(lb: np.ndarray, ub: np.ndarray, shape: tuple[int, ...]):
    """Clean input from a clipped l-inf box: returns (x float64 flat, eps, per-group radii)."""
    scale = max(1.0, float(np.abs(lb).max()), float(np.abs(ub).max()))
    half = (ub - lb) / 2.0
    eps_all = float(half.max())
    # bounds are usually float32 values: allow their rounding, but never a sizeable part of the radius
    tol = min(4e-6 * scale + 1e-4 * eps_all, 0.05 * eps_all)
    groups = shape[0] if (len(shape) == 3 and shape[0] > 1 and lb.size % shape[0] == 0) else 1
    x = np.empty_like(lb)
    radii = []
    for g_lb, g_ub, g_half, g_x in zip(
        lb.reshape(groups, -1), ub.reshape(groups, -1), half.reshape(groups, -1), x.reshape(groups, -1)
    ):
        eps = float(g_half.max())
        lo = float(g_lb.min())
        if eps < eps_all - tol:
            # Either this channel has its own smaller radius, or every one of its dimensions was
            # clipped (e.g. a constant channel at the range edge). In the latter case the widest
            # dimensions all touch the channel's range edge: keep the overall radius then.
            full = g_half >= eps - tol
            if (g_lb[full] <= lo + tol).all() or (g_ub[full] >= float(g_ub.max()) - tol).all():
                eps = eps_all
        radii.append(eps)
        full = np.abs(g_half - eps) <= tol
        at_min = g_lb <= lo + tol
        g_x[:] = np.where(full, (g_lb + g_ub) / 2.0, np.where(at_min, g_ub - eps, g_lb + eps))
    np.clip(x, lb, ub, out=x)
    return x, eps_all, radii


def load_vnnlib(source: Path, files: list[Path], shape, layout, n_classes, limit) -> Dataset:
    """One example per spec file (module docstring); ``limit`` keeps the first files. The boxes of
    all files are checked against the memory limit before the first file is read.

    Warnings
    --------
    Raises :class:`~lipverify.errors.UserInputError` naming the file for anything
    :func:`read_text` or :func:`parse_vnnlib` refuses, a spec whose inputs or outputs do not match
    the model, labels outside ``[0, n_classes)``, and boxes too large for the memory limit.
    """
    if limit is not None:
        files = files[:limit]
    if not files:  # pragma: no cover - callers pass at least one file
        raise UserInputError("the data set is empty (0 examples)", path=str(source))
    count = math.prod(shape)
    n = len(files)
    # per example: lower/upper float64, the clean input in float64 and float32, the bounds being merged
    check_alloc(float(n) * count * (8 + 8 + 8 + 4) + 4 * 8 * count,
                f"the boxes of {n} VNN-LIB spec(s) of {count} inputs each", str(source))
    notes: list[str] = []
    if layout != "nchw":
        notes.append("layout ignored for VNN-LIB: X_i always follows the model's own input layout")
    lower = np.empty((n, count))
    upper = np.empty((n, count))
    xs = np.empty((n, count), dtype=np.float32)
    eps_list, labels, targets, names, props = [], [], [], [], []
    per_channel: dict[tuple, int] = {}
    for k, f in enumerate(files):
        spec = parse_vnnlib(f, read_text(f), shape, n_classes)
        if spec.n_x != count:
            raise UserInputError(
                f"the spec declares {spec.n_x} inputs but the model input has shape {fmt_shape(shape)} "
                f"({count} values)",
                path=str(f),
            )
        if n_classes is not None and spec.n_y != n_classes:
            raise UserInputError(
                f"the spec declares {spec.n_y} outputs but the model has {n_classes} classes", path=str(f)
            )
        x, eps, radii = recover_clean_input(spec.lb, spec.ub, shape)
        if len(radii) > 1 and max(radii) - min(radii) > 1e-3 * max(radii):
            key = tuple(float(f"{r:.6g}") for r in radii)
            per_channel[key] = per_channel.get(key, 0) + 1
        xs[k] = x
        lower[k] = spec.lb
        upper[k] = spec.ub
        eps_list.append(eps)
        labels.append(-1 if spec.label is None else spec.label)
        targets.append(spec.targets)
        props.append(spec.prop)
        names.append(f.name if f == source else f.relative_to(source).as_posix())
    for key, k in per_channel.items():
        notes.append(
            f"{k} spec(s) use per-channel l-inf radii {list(key)} (model input units); eps is the "
            "largest, lower/upper hold the exact box"
        )
    y = np.asarray(labels, dtype=np.int64)
    if n_classes is not None:
        labelled = y >= 0
        check_labels(y[labelled], [nm for nm, k in zip(names, labelled) if k], n_classes, source)
    unlabelled = int((y < 0).sum())
    if unlabelled:
        notes.append(
            f"{unlabelled} spec(s) state a general output property (no single label): certify and attack "
            "report whether the property holds, not a robustness radius"
        )
    return Dataset(
        x=torch.from_numpy(xs.reshape((n, *shape))),
        y=torch.from_numpy(y),
        eps=torch.tensor(eps_list, dtype=torch.float64),
        targets=targets,
        names=names,
        notes=notes,
        source=str(source),
        lower=torch.from_numpy(lower.reshape((n, *shape))),
        upper=torch.from_numpy(upper.reshape((n, *shape))),
        properties=props,
    )
