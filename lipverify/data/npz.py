"""Labelled examples from an ``.npz`` archive.

``.npz`` archive
    Two arrays: inputs under ``x`` and integer labels under ``y`` (the pairs ``X``/``Y`` and
    ``images``/``labels`` are accepted too). Inputs are cast to float32 and kept in the file's units:
    no scaling, no normalisation. Labels may be a 1-D integer array, an ``(N, 1)`` column, integral
    floats, or one-hot rows. Pickled (object) arrays are never loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lipverify.data.dataset import (
    Dataset,
    check_finite,
    check_labels,
    fit_shape,
    fmt_shape,
    oneline,
)
from lipverify.errors import UserInputError

NPZ_KEY_PAIRS = (("x", "y"), ("X", "Y"), ("images", "labels"))


def load_npz(path: Path, shape, layout, n_classes, limit) -> Dataset:
    if path.stat().st_size == 0:
        raise UserInputError("the file is empty", path=str(path))
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise UserInputError(f"cannot read the file ({oneline(exc)})", path=str(path)) from None
    if magic == b"\x93NUMPY":
        raise UserInputError(
            "holds a single .npy array, not a .npz archive with inputs and labels", path=str(path)
        )
    if not magic.startswith(b"PK"):
        raise UserInputError("not a .npz archive (no zip signature): corrupted or another format", path=str(path))
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError, EOFError, ...
        raise UserInputError(f"cannot read as a .npz archive ({oneline(exc)})", path=str(path)) from None
    if not hasattr(archive, "files"):
        raise UserInputError(
            "holds a single array, not a .npz archive with inputs and labels", path=str(path)
        )
    with archive:
        keys = list(archive.files)
        for kx, ky in NPZ_KEY_PAIRS:
            if kx in keys and ky in keys:
                break
        else:
            raise UserInputError(
                f"no input/label arrays: expected keys 'x' and 'y' (or 'X'/'Y', 'images'/'labels'), "
                f"found {keys}",
                path=str(path),
            )
        try:
            x = archive[kx]
            y = archive[ky]
        except ValueError as exc:
            if "pickle" in str(exc).lower():
                raise UserInputError(
                    "holds object (pickled) arrays, which are not loaded; store plain numeric arrays",
                    path=str(path),
                ) from None
            raise UserInputError(f"corrupted array in archive ({oneline(exc)})", path=str(path)) from None
        except Exception as exc:  # BadZipFile, zlib.error, EOFError, OSError, ...
            raise UserInputError(f"corrupted array in archive ({oneline(exc)})", path=str(path)) from None

    notes: list[str] = []
    if x.ndim == 0:
        raise UserInputError(f"array '{kx}' is a scalar, not a batch of examples", path=str(path))
    if x.dtype.kind not in "biuf":
        raise UserInputError(f"array '{kx}' has dtype {x.dtype}; expected numbers", path=str(path))
    y = _npz_labels(y, ky, path, notes)
    if x.shape[0] != y.shape[0]:
        raise UserInputError(
            f"'{kx}' has {x.shape[0]} examples but '{ky}' has {y.shape[0]} labels", path=str(path)
        )
    if x.shape[0] == 0:
        raise UserInputError("the data set is empty (0 examples)", path=str(path))
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if x.dtype.kind in "iu" and x.size and x.max() > 1:
        notes.append(
            f"inputs are stored as {x.dtype} (max {x.max()}); values are kept as in the file, so divide "
            "by 255 yourself if the model expects [0, 1]"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.asarray(x, dtype=np.float32)
    names = [f"{path.name}[{i}]" for i in range(x.shape[0])]
    check_finite(x, names, path)
    check_labels(y, names, n_classes, path)
    x = fit_shape(x, shape, layout, path, notes)
    return Dataset(
        x=torch.from_numpy(np.ascontiguousarray(x)),
        y=torch.from_numpy(np.ascontiguousarray(y)),
        eps=None,
        targets=None,
        names=names,
        notes=notes,
        source=str(path),
    )


def _npz_labels(y: np.ndarray, key: str, path: Path, notes: list[str]) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2 and y.shape[1] > 1:
        if y.dtype.kind in "biuf" and np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all():
            notes.append(f"labels '{key}' are one-hot rows; converted to class indices")
            return np.argmax(y, axis=1).astype(np.int64)
        raise UserInputError(
            f"labels '{key}' have shape {fmt_shape(y.shape)}; expected one class index per example",
            path=str(path),
        )
    elif y.ndim != 1:
        raise UserInputError(
            f"labels '{key}' have shape {fmt_shape(y.shape)}; expected one class index per example",
            path=str(path),
        )
    if y.dtype.kind in "iu":
        if y.dtype.kind == "u" and y.size and y.max() > np.iinfo(np.int64).max:
            raise UserInputError(f"labels '{key}' hold values too large for class indices", path=str(path))
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserInputError(
                f"labels '{key}' are not integers (value {float(y[i])!r} at index {i})", path=str(path)
            )
        notes.append(f"labels '{key}' are stored as {y.dtype}; converted to integers")
        return y.astype(np.int64)
    raise UserInputError(f"labels '{key}' have dtype {y.dtype}; expected integers", path=str(path))
