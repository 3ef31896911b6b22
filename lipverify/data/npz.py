"""Labelled examples from an ``.npz`` archive.

``.npz`` archive
    Two arrays: inputs under ``x`` and integer labels under ``y`` (the pairs ``X``/``Y`` and
    ``images``/``labels`` are accepted too). Inputs are cast to float32 and kept in the file's units:
    no scaling, no normalisation. Labels may be a 1-D integer array, an ``(N, 1)`` column, integral
    floats, or one-hot rows. Pickled (object) arrays are never loaded.

The archive may come from a stranger (a 2 MB compressed archive can hold gigabytes of zeros), so it
is read member by member, never with :func:`numpy.load`:

* the file must be a regular file (:func:`lipverify.limits.open_regular`) holding a zip archive of
  at most ``MAX_MEMBERS`` members;
* each array's ``.npy`` header (format 1.0 or 2.0, at most 10,000 bytes) is read from the member
  stream before any data; its shape times its item size must equal the member's uncompressed size
  (declared by the archive, and never exceeded while reading), else the file is corrupted;
* the memory the arrays will take (the rows read, their float32 copy and the labels) is compared
  with the memory limit (:func:`lipverify.limits.memory_limit`) before anything is decompressed;
* with ``limit``, only the first ``limit`` rows of a C-ordered array are decompressed; a
  Fortran-ordered array needs the whole member, whose size is checked first.

Warnings
--------
Raises :class:`~lipverify.errors.UserInputError` naming the file for: a missing, empty or special
file, a lone ``.npy`` array, a file that is not a zip archive (or a truncated one), too many members,
missing keys, object (pickled) or non-numeric arrays, an unreadable or oversized ``.npy`` header, a
header that disagrees with the member's size, a truncated or corrupted member, inputs and labels of
different lengths, an empty data set, arrays that would exceed the memory limit, non-finite inputs,
and labels that are not class indices (or are outside ``[0, n_classes)``).
"""

from __future__ import annotations

import contextlib
import math
import zipfile
import zlib
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
from lipverify.limits import fmt_bytes, memory_limit, open_regular

NPZ_KEY_PAIRS = (("x", "y"), ("X", "Y"), ("images", "labels"))
#: most members of an archive (an .npz holds a few arrays; each member costs memory to list)
MAX_MEMBERS = 1000
_MAX_HEADER = 10_000
_CHUNK = 1 << 24
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError,
                NotImplementedError, RuntimeError)


class _Member:
    """One array of the archive: its key, zip entry and ``.npy`` header."""

    __slots__ = ("key", "info", "shape", "dtype", "fortran", "offset")

    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def read_bytes(self, rows: int) -> int:
        """Bytes decompressed to read the first ``rows`` rows."""
        if self.fortran and len(self.shape) > 1:
            return math.prod(self.shape) * self.dtype.itemsize
        return rows * self.row_bytes()


@contextlib.contextmanager
def _archive(path: Path):
    """The zip archive of a regular file, after the checks of the module docstring."""
    with open_regular(path, "data file") as fh:
        magic = fh.read(6)
        if magic == b"\x93NUMPY":
            raise UserInputError(
                "holds a single .npy array, not a .npz archive with inputs and labels", path=str(path)
            )
        if not magic.startswith(b"PK"):
            raise UserInputError("not a .npz archive (no zip signature): corrupted or another format",
                                 path=str(path))
        fh.seek(0)
        _check_member_count(fh, path)
        try:
            archive = zipfile.ZipFile(fh)
        except Exception as exc:  # BadZipFile, OSError, EOFError, ValueError, ...
            raise UserInputError(f"cannot read as a .npz archive ({oneline(exc)})", path=str(path)) from None
        with archive:
            yield archive


def npz_input_shape(path) -> tuple[int, ...]:
    """The per-example shape of an archive's inputs (``x``, ``X`` or ``images``), read from its
    ``.npy`` header only: nothing past the header is decompressed (same checks as :func:`load_npz`)."""
    path = Path(path)
    with _archive(path) as archive:
        members, kx, _ = _members(archive, path)
        mx = _header(archive, members[kx], kx, path)
    if not mx.shape:
        raise UserInputError(f"array '{kx}' is a scalar, not a batch of examples", path=str(path))
    return mx.shape[1:]


def load_npz(path: Path, shape, layout, n_classes, limit) -> Dataset:
    """The examples of an ``.npz`` archive (module docstring); ``limit`` reads only the first rows.

    Warnings
    --------
    Raises :class:`~lipverify.errors.UserInputError` naming the file for every problem the module
    docstring lists; nothing is decompressed before the headers and the memory estimate pass.
    """
    with _archive(path) as archive:
        x, y, kx, ky = _read_arrays(archive, path, limit, layout)

    notes: list[str] = []
    y = _npz_labels(y, ky, path, notes)
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


def _check_member_count(fh, path: Path) -> None:
    """Refuse an archive whose directory lists more than ``MAX_MEMBERS`` entries, before listing it."""
    try:
        end = zipfile._EndRecData(fh)  # the end-of-directory record: a few hundred bytes at the end
    except Exception:  # pragma: no cover - private helper missing or unreadable: ZipFile reports it
        end = None
    finally:
        fh.seek(0)
    if end is not None and end[zipfile._ECD_ENTRIES_TOTAL] > MAX_MEMBERS:
        raise UserInputError(f"the archive lists {end[zipfile._ECD_ENTRIES_TOTAL]} members (at most "
                             f"{MAX_MEMBERS}); an .npz holds a few arrays", path=str(path))


def _members(archive: zipfile.ZipFile, path: Path):
    """The archive's entries by key, and the keys of the inputs and the labels."""
    members = {}
    for info in archive.infolist():
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        members[key] = info
    for kx, ky in NPZ_KEY_PAIRS:
        if kx in members and ky in members:
            return members, kx, ky
    raise UserInputError(
        f"no input/label arrays: expected keys 'x' and 'y' (or 'X'/'Y', 'images'/'labels'), found {list(members)}",
        path=str(path),
    )


def _read_arrays(archive: zipfile.ZipFile, path: Path, limit, layout: str):
    members, kx, ky = _members(archive, path)
    mx = _header(archive, members[kx], kx, path)
    my = _header(archive, members[ky], ky, path)
    if not mx.shape:
        raise UserInputError(f"array '{kx}' is a scalar, not a batch of examples", path=str(path))
    if mx.dtype.kind not in "biuf":
        raise UserInputError(f"array '{kx}' has dtype {mx.dtype}; expected numbers", path=str(path))
    if my.dtype.kind not in "biuf":
        raise UserInputError(f"labels '{ky}' have dtype {my.dtype}; expected integers", path=str(path))
    if not my.shape:
        raise UserInputError(f"labels '{ky}' have shape (); expected one class index per example", path=str(path))
    if mx.shape[0] != my.shape[0]:
        raise UserInputError(f"'{kx}' has {mx.shape[0]} examples but '{ky}' has {my.shape[0]} labels",
                             path=str(path))
    if mx.shape[0] == 0:
        raise UserInputError("the data set is empty (0 examples)", path=str(path))
    rows = mx.shape[0] if limit is None else min(limit, mx.shape[0])
    per_x = math.prod(mx.shape[1:])
    per_y = math.prod(my.shape[1:])
    # the bytes read; a float32 copy unless they are C-ordered float32 already, and one more for a
    # channel-last transpose; the labels read, their int64 copy and the per-row work on one-hot labels
    copies = (mx.dtype != np.float32 or (mx.fortran and len(mx.shape) > 1)) + (layout == "nhwc")
    need = (mx.read_bytes(rows) + copies * 4 * rows * per_x + my.read_bytes(rows) + 8 * rows
            + (2 * rows * per_y if per_y > 1 else 0))
    lim = memory_limit()
    if not need <= lim:
        raise UserInputError(
            f"reading {rows} examples of '{kx}' {fmt_shape(mx.shape)} {mx.dtype} and their labels would need "
            f"{fmt_bytes(need)}, over the memory limit of {fmt_bytes(lim)} (--max-memory or LIPVERIFY_MAX_MEMORY "
            "to change it; --limit N reads only the first N examples)",
            path=str(path),
        )
    return _data(archive, mx, rows, path), _data(archive, my, rows, path), kx, ky


def _header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, path: Path) -> _Member:
    """The ``.npy`` header of member ``info``, checked against the member's declared size."""
    m = _Member()
    m.key, m.info = key, info
    try:
        with archive.open(info) as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=_MAX_HEADER)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=_MAX_HEADER)
            else:
                raise UserInputError(f"array '{key}' uses .npy format version {version[0]}.{version[1]}; only 1.0 "
                                     "and 2.0 are read", path=str(path))
            m.offset = fp.tell()
    except UserInputError:
        raise
    except _READ_ERRORS as exc:
        raise UserInputError(f"corrupted array '{key}' in archive ({oneline(exc)})", path=str(path)) from None
    if dtype.hasobject:
        raise UserInputError(
            "holds object (pickled) arrays, which are not loaded; store plain numeric arrays", path=str(path)
        )
    m.shape, m.dtype, m.fortran = tuple(int(d) for d in shape), dtype, bool(fortran)
    if any(d < 0 for d in m.shape):
        raise UserInputError(f"corrupted array '{key}' in archive: its header gives a negative size "
                             f"{fmt_shape(m.shape)}", path=str(path))
    data = math.prod(m.shape) * dtype.itemsize
    if m.offset + data != info.file_size:
        raise UserInputError(
            f"corrupted array '{key}' in archive: its header says {fmt_shape(m.shape)} {dtype} ({fmt_bytes(data)}) "
            f"but the member holds {fmt_bytes(max(info.file_size - m.offset, 0))} of data",
            path=str(path),
        )
    return m


def _data(archive: zipfile.ZipFile, m: _Member, rows: int, path: Path) -> np.ndarray:
    """The first ``rows`` rows of member ``m`` (the whole member for a Fortran-ordered array)."""
    nbytes = m.read_bytes(rows)
    buf = np.empty(nbytes, dtype=np.uint8)
    view = memoryview(buf)
    try:
        with archive.open(m.info) as fp:
            fp.read(m.offset)
            got = 0
            while got < nbytes:
                chunk = fp.read(min(_CHUNK, nbytes - got))
                if not chunk:
                    raise UserInputError(f"corrupted array '{m.key}' in archive: the member ends early",
                                         path=str(path))
                view[got : got + len(chunk)] = chunk
                got += len(chunk)
    except UserInputError:
        raise
    except _READ_ERRORS as exc:
        raise UserInputError(f"corrupted array '{m.key}' in archive ({oneline(exc)})", path=str(path)) from None
    flat = buf.view(m.dtype)
    if m.fortran and len(m.shape) > 1:
        return flat.reshape(m.shape[::-1]).transpose()[:rows]
    return flat.reshape((rows, *m.shape[1:]))


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
