"""Loading evaluation data: labelled examples, and optionally per-example l-inf boxes.

``load_data(path, input_shape)`` reads one of three formats and returns a :class:`Dataset` whose ``x``
has shape ``(N, *input_shape)``, where ``input_shape`` is the model's own per-example input shape
(no batch dimension), e.g. ``(1, 28, 28)``, ``(784,)``, ``(784, 1)`` or ``(3, 32, 32)``.

Formats
-------
``.npz`` archive
    Two arrays: inputs under ``x`` and integer labels under ``y`` (the pairs ``X``/``Y`` and
    ``images``/``labels`` are accepted too). Inputs are cast to float32 and kept in the file's units:
    no scaling, no normalisation. Labels may be a 1-D integer array, an ``(N, 1)`` column, integral
    floats, or one-hot rows. Pickled (object) arrays are never loaded.

Folder of images
    One sub-folder per class. Class ``k`` is the k-th sub-folder in sorted name order, or, when every
    sub-folder name is an integer (``0``, ``1``, ... ``9``), that integer. Images (PNG, JPEG, BMP, GIF,
    TIFF, WebP, PNM) are read with Pillow, converted to grayscale for a 1-channel model or RGB for a
    3-channel one, and divided by 255 so values lie in [0, 1]. Images are never resized: a size that
    does not match the model input is refused. Channels are placed as the model input shape says
    (channel-first ``(C, H, W)`` unless the shape is channel-last ``(H, W, C)``; a flat input shape
    receives the channel-first image flattened row-major).

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

Every problem the user can fix raises :class:`~lipverify.errors.UserInputError` naming the file.
"""

from __future__ import annotations

import gzip
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lipverify.errors import UserInputError

__all__ = ["Dataset", "load_data", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm"}
)
_NPZ_KEY_PAIRS = (("x", "y"), ("X", "Y"), ("images", "labels"))
_LAYOUTS = ("nchw", "nhwc")


@dataclass
class Dataset:
    """Labelled examples in the model's input units.

    ``x``: float32 ``(N, *input_shape)``. ``y``: int64 ``(N,)``. ``eps``: float64 ``(N,)`` l-inf radius
    of each example's VNN-LIB box (``None`` for other formats). ``targets``: for VNN-LIB, the classes
    named by each spec's output condition (a counterexample is an input in the box where any of them
    scores at least the label); ``None`` for other formats. ``names``: one identifier per example.
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

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx) -> "Dataset":
        """The examples selected by ``idx`` (an int, a slice, a sequence/array/tensor of indices, or a
        boolean mask of length N), in that order."""
        index = _as_index(idx, len(self))
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
        )


def _as_index(idx, n: int) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------------------
# entry point


def load_data(
    path,
    input_shape: tuple[int, ...],
    *,
    layout: str = "nchw",
    n_classes: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """Load ``path`` (an ``.npz`` file, a ``.vnnlib`` file, or a folder of ``.vnnlib`` files or of
    class sub-folders of images) for a model whose per-example input shape is ``input_shape``.

    ``layout="nhwc"`` says the file stores channel-last images ``(N, H, W, C)`` for a model whose
    input is ``(C, H, W)``; they are transposed (npz only: image files are always read channel-last
    and VNN-LIB variables always follow the model's own layout). ``n_classes``, when given, bounds
    the labels (and the classes a VNN-LIB spec names). ``limit`` keeps the first ``limit`` examples.
    """
    path = Path(path)
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {input_shape!r}")
    if not isinstance(layout, str) or layout.lower() not in _LAYOUTS:
        raise UserInputError(f"unknown layout {layout!r}: use 'nchw' or 'nhwc'", path=str(path))
    layout = layout.lower()
    if limit is not None and int(limit) < 1:
        raise UserInputError(f"limit must be at least 1, got {limit}", path=str(path))
    if n_classes is not None and int(n_classes) < 1:
        raise UserInputError(f"the number of classes must be at least 1, got {n_classes}", path=str(path))
    limit = None if limit is None else int(limit)
    n_classes = None if n_classes is None else int(n_classes)

    if not path.exists():
        raise UserInputError("no such file or directory", path=str(path))
    if path.is_dir():
        specs = _vnnlib_files(path)
        if specs:
            return _load_vnnlib(path, specs, shape, layout, n_classes, limit)
        return _load_image_folder(path, shape, n_classes, limit)
    name = path.name.lower()
    if name.endswith(".npz"):
        return _load_npz(path, shape, layout, n_classes, limit)
    if name.endswith(".vnnlib") or name.endswith(".vnnlib.gz"):
        return _load_vnnlib(path, [path], shape, layout, n_classes, limit)
    if name.endswith(".npy"):
        raise UserInputError(
            "unsupported data format: a lone .npy array holds no labels; save inputs and labels "
            "together with numpy.savez(file, x=..., y=...)",
            path=str(path),
        )
    raise UserInputError(
        "unsupported data format: expected a .npz file with arrays x and y, a .vnnlib file, or a "
        "folder of .vnnlib files or of one image sub-folder per class",
        path=str(path),
    )


# ----------------------------------------------------------------------------------------------------
# shared checks


def _fmt(shape) -> str:
    return str(tuple(int(d) for d in shape))


def _check_finite(x: np.ndarray, names: list[str], path: Path) -> None:
    bad = ~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise UserInputError(
            f"inputs contain NaN or infinite values ({int(bad.sum())} example(s), first {names[first]})",
            path=str(path),
        )


def _check_labels(y: np.ndarray, names: list[str], n_classes: int | None, path: Path) -> None:
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


def _fit_shape(x: np.ndarray, shape: tuple[int, ...], layout: str, path: Path, notes: list[str]) -> np.ndarray:
    """Bring ``x`` (N, ...) to (N, *shape), reshaping row-major or transposing channel-last data."""
    n = x.shape[0]
    per = tuple(x.shape[1:])
    count = math.prod(shape)
    if layout == "nhwc":
        if len(shape) != 3:
            raise UserInputError(
                f"layout 'nhwc' needs a model input of shape (C, H, W); the model input has shape {_fmt(shape)}",
                path=str(path),
            )
        c, h, w = shape
        hwc = (h, w, c)
        if per != hwc:
            if len(per) == 1 and per[0] == count:
                notes.append(f"reshaped {_fmt(x.shape)} -> {_fmt((n, *hwc))} row-major (channel-last)")
                x = x.reshape((n, *hwc))
            else:
                raise UserInputError(
                    f"layout 'nhwc' expects each example to have shape {_fmt(hwc)} (or {count} values "
                    f"flat), but the file has {_fmt(per)}",
                    path=str(path),
                )
        notes.append(
            f"transposed channel-last {_fmt((n, *hwc))} -> channel-first {_fmt((n, *shape))} (layout 'nhwc')"
        )
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if per == shape:
        return x
    if math.prod(per) != count:
        raise UserInputError(
            f"each example has shape {_fmt(per)} ({math.prod(per)} values) but the model input has "
            f"shape {_fmt(shape)} ({count} values)",
            path=str(path),
        )
    if len(shape) == 3 and shape[0] > 1 and per == (shape[1], shape[2], shape[0]):
        raise UserInputError(
            f"examples have shape {_fmt(per)}, which looks channel-last for a model input of shape "
            f"{_fmt(shape)}; pass layout 'nhwc' to transpose them (a plain reshape would scramble them)",
            path=str(path),
        )
    notes.append(f"reshaped {_fmt(x.shape)} -> {_fmt((n, *shape))} row-major")
    return x.reshape((n, *shape))


def _oneline(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------------
# .npz


def _load_npz(path: Path, shape, layout, n_classes, limit) -> Dataset:
    if path.stat().st_size == 0:
        raise UserInputError("the file is empty", path=str(path))
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise UserInputError(f"cannot read the file ({_oneline(exc)})", path=str(path)) from None
    if magic == b"\x93NUMPY":
        raise UserInputError(
            "holds a single .npy array, not a .npz archive with inputs and labels", path=str(path)
        )
    if not magic.startswith(b"PK"):
        raise UserInputError("not a .npz archive (no zip signature): corrupted or another format", path=str(path))
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError, EOFError, ...
        raise UserInputError(f"cannot read as a .npz archive ({_oneline(exc)})", path=str(path)) from None
    if not hasattr(archive, "files"):
        raise UserInputError(
            "holds a single array, not a .npz archive with inputs and labels", path=str(path)
        )
    with archive:
        keys = list(archive.files)
        for kx, ky in _NPZ_KEY_PAIRS:
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
            raise UserInputError(f"corrupted array in archive ({_oneline(exc)})", path=str(path)) from None
        except Exception as exc:  # BadZipFile, zlib.error, EOFError, OSError, ...
            raise UserInputError(f"corrupted array in archive ({_oneline(exc)})", path=str(path)) from None

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
    _check_finite(x, names, path)
    _check_labels(y, names, n_classes, path)
    x = _fit_shape(x, shape, layout, path, notes)
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
            f"labels '{key}' have shape {_fmt(y.shape)}; expected one class index per example",
            path=str(path),
        )
    elif y.ndim != 1:
        raise UserInputError(
            f"labels '{key}' have shape {_fmt(y.shape)}; expected one class index per example",
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


# ----------------------------------------------------------------------------------------------------
# folder of images


def _image_plan(shape: tuple[int, ...]):
    """(arrangement, channels, height, width) from the model input shape; H/W None for flat shapes."""
    if len(shape) == 3 and shape[0] in (1, 3):
        return "chw", shape[0], shape[1], shape[2]
    if len(shape) == 3 and shape[2] in (1, 3):
        return "hwc", shape[2], shape[0], shape[1]
    return "flat", None, None, None


def _load_image_folder(path: Path, shape, n_classes, limit) -> Dataset:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency of torchvision
        raise UserInputError("reading image folders needs Pillow (pip install pillow)", path=str(path)) from None

    class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise UserInputError(
            "unsupported data format: the folder holds neither .vnnlib files nor one image "
            "sub-folder per class",
            path=str(path),
        )
    dir_names = [d.name for d in class_dirs]
    if all(re.fullmatch(r"\d+", n) for n in dir_names):
        values = [int(n) for n in dir_names]
        if len(set(values)) != len(values):
            raise UserInputError(
                f"class sub-folders {dir_names} name the same class twice", path=str(path)
            )
        pairs = sorted(zip(values, class_dirs))
        notes = ["class index = integer name of each sub-folder"]
    else:
        pairs = list(enumerate(class_dirs))
        listing = ", ".join(f"{k}={d.name}" for k, d in pairs[:12])
        more = f", ... ({len(pairs)} classes)" if len(pairs) > 12 else ""
        notes = [f"classes from sorted sub-folder names: {listing}{more}"]

    files: list[tuple[Path, int]] = []
    ignored = 0
    for label, d in pairs:
        for f in sorted(d.iterdir()):
            if f.name.startswith(".") or not f.is_file():
                continue
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append((f, label))
            else:
                ignored += 1
    if ignored:
        notes.append(f"ignored {ignored} file(s) without an image extension")
    if not files:
        raise UserInputError("no image files found in the class sub-folders", path=str(path))
    if limit is not None:
        files = files[:limit]

    arrangement, channels, height, width = _image_plan(shape)
    if channels is None:
        count = math.prod(shape)
    elif len(shape) == 3 and channels not in (1, 3):  # pragma: no cover - excluded by _image_plan
        raise UserInputError("image folders support 1 (grayscale) or 3 (RGB) channels", path=str(path))

    images = []
    names = []
    for f, _ in files:
        rel = f.relative_to(path).as_posix()
        try:
            with Image.open(f) as im:
                im.load()
                if im.mode in ("I", "F") or im.mode.startswith("I;"):
                    raise UserInputError(
                        f"image mode {im.mode} (16-bit or float) is not supported; save 8-bit images",
                        path=str(f),
                    )
                w_img, h_img = im.size
                if channels is None:  # flat model input: decide from the first image's size
                    if count == w_img * h_img:
                        channels = 1
                    elif count == 3 * w_img * h_img:
                        channels = 3
                    else:
                        raise UserInputError(
                            f"image is {w_img}x{h_img} (width x height), which gives neither {count} "
                            f"grayscale nor {count} RGB values for the model input shape {_fmt(shape)}",
                            path=str(f),
                        )
                    height, width = h_img, w_img
                if (w_img, h_img) != (width, height):
                    raise UserInputError(
                        f"image is {w_img}x{h_img} (width x height) but the model expects "
                        f"{width}x{height}; images are not resized",
                        path=str(f),
                    )
                arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
        except UserInputError:
            raise
        except Exception as exc:  # PIL.UnidentifiedImageError, OSError, truncated files, ...
            raise UserInputError(f"cannot read image ({_oneline(exc)})", path=str(f)) from None
        arr = arr / np.float32(255.0)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        images.append(arr)  # (H, W, C)
        names.append(rel)

    x = np.stack(images)  # (N, H, W, C)
    if arrangement == "hwc":
        pass
    else:
        x = x.transpose(0, 3, 1, 2)  # (N, C, H, W)
        if arrangement == "flat" and tuple(x.shape[1:]) != shape:
            if not (channels == 1 and shape == (height, width)):
                notes.append(
                    f"each {channels}x{height}x{width} (C x H x W) image flattened row-major to {_fmt(shape)}"
                )
            x = x.reshape((x.shape[0], *shape))
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.array([label for _, label in files], dtype=np.int64)
    notes.append("pixels scaled to [0, 1] (divided by 255)")
    _check_labels(y, names, n_classes, path)
    return Dataset(
        x=torch.from_numpy(x),
        y=torch.from_numpy(y),
        eps=None,
        targets=None,
        names=names,
        notes=notes,
        source=str(path),
    )


# ----------------------------------------------------------------------------------------------------
# VNN-LIB

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_COMMENT_RE = re.compile(r";[^\n]*")
_NEG_RE = re.compile(rf"\(\s*-\s+({_NUM})\s*\)")
_DECL_RE = re.compile(r"\(\s*declare-const\s+([XY])_(\d+)\s+Real\s*\)")
_BOUND_VAR_FIRST_RE = re.compile(rf"\(\s*assert\s+\(\s*(<=|>=)\s+X_(\d+)\s+({_NUM})\s*\)\s*\)")
_BOUND_CONST_FIRST_RE = re.compile(rf"\(\s*assert\s+\(\s*(<=|>=)\s+({_NUM})\s+X_(\d+)\s*\)\s*\)")
_TOKEN_RE = re.compile(r"\(|\)|[^\s()]+")
_VAR_RE = re.compile(r"([XY])_(\d+)")
_NUM_RE = re.compile(_NUM)
_CMP = {"<=", ">=", "<", ">"}
_IGNORED_FORMS = {"check-sat", "exit", "set-logic", "set-info", "set-option"}


def _vnnlib_files(folder: Path) -> list[Path]:
    found = [
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.name.lower().endswith(".vnnlib") or p.name.lower().endswith(".vnnlib.gz"))
    ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _negate_literal(m: re.Match) -> str:
    v = m.group(1)
    if v.startswith("-"):
        return v[1:]
    return "-" + (v[1:] if v.startswith("+") else v)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
    except Exception as exc:
        raise UserInputError(f"cannot read the file ({_oneline(exc)})", path=str(path)) from None
    if not raw.strip():
        raise UserInputError("the file is empty", path=str(path))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserInputError("not a text file (VNN-LIB is plain text)", path=str(path)) from None


def _sexprs(text: str, path: Path) -> list:
    """Parse the (small) remainder of a spec into nested lists of string atoms."""
    stack: list[list] = [[]]
    for tok in _TOKEN_RE.findall(text):
        if tok == "(":
            stack.append([])
        elif tok == ")":
            if len(stack) == 1:
                raise UserInputError("syntax error: unbalanced ')'", path=str(path))
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(tok)
    if len(stack) != 1:
        raise UserInputError("syntax error: unbalanced '(' (file truncated?)", path=str(path))
    return stack[0]


def _show(expr) -> str:
    if isinstance(expr, list):
        text = "(" + " ".join(_show(e) for e in expr) + ")"
    else:
        text = str(expr)
    return text if len(text) <= 80 else text[:77] + "..."


def _atom_kind(a):
    """('X'|'Y', index) for a variable, ('c', value) for a number, None otherwise."""
    if not isinstance(a, str):
        return None
    m = _VAR_RE.fullmatch(a)
    if m:
        return m.group(1), int(m.group(2))
    if _NUM_RE.fullmatch(a):
        return "c", float(a)
    return None


class _Spec:
    __slots__ = ("n_x", "n_y", "lb", "ub", "label", "targets")


def _parse_vnnlib(path: Path, text: str) -> _Spec:
    text = _COMMENT_RE.sub(" ", text)
    text = _NEG_RE.sub(_negate_literal, text)

    xs: set[int] = set()
    ys: set[int] = set()
    for kind, idx in _DECL_RE.findall(text):
        (xs if kind == "X" else ys).add(int(idx))
    rest = _DECL_RE.sub(" ", text)

    bound_idx: list[int] = []
    bound_val: list[float] = []
    bound_upper: list[bool] = []
    for op, idx, val in _BOUND_VAR_FIRST_RE.findall(rest):
        bound_idx.append(int(idx))
        bound_val.append(float(val))
        bound_upper.append(op == "<=")
    for op, val, idx in _BOUND_CONST_FIRST_RE.findall(rest):
        bound_idx.append(int(idx))
        bound_val.append(float(val))
        bound_upper.append(op == ">=")
    rest = _BOUND_VAR_FIRST_RE.sub(" ", rest)
    rest = _BOUND_CONST_FIRST_RE.sub(" ", rest)

    outputs: list[list[tuple[int, int]]] = []  # one entry per output assert: disjuncts of (big, small)
    output_forms = 0
    for form in _sexprs(rest, path):
        if not isinstance(form, list):
            raise UserInputError(f"syntax error: unexpected text {_show(form)!r}", path=str(path))
        if not form:
            raise UserInputError("syntax error: empty '()'", path=str(path))
        head = form[0]
        if head in _IGNORED_FORMS:
            continue
        if head == "declare-const":
            raise UserInputError(
                f"unsupported declaration {_show(form)!r}: only 'X_i Real' and 'Y_j Real' are understood",
                path=str(path),
            )
        if head != "assert" or len(form) != 2:
            raise UserInputError(f"syntax error: unexpected form {_show(form)!r}", path=str(path))
        body = form[1]
        disjuncts = _interpret_assert(body, path, bound_idx, bound_val, bound_upper)
        if disjuncts is not None:
            outputs.append(disjuncts)
            output_forms += 1

    if not xs:
        raise UserInputError("declares no input variables (declare-const X_i Real)", path=str(path))
    if not ys:
        raise UserInputError("declares no output variables (declare-const Y_j Real)", path=str(path))
    n_x = max(xs) + 1
    n_y = max(ys) + 1
    if len(xs) != n_x:
        raise UserInputError(f"input variables are not numbered X_0 .. X_{n_x - 1} without gaps", path=str(path))
    if len(ys) != n_y:
        raise UserInputError(f"output variables are not numbered Y_0 .. Y_{n_y - 1} without gaps", path=str(path))

    idx = np.asarray(bound_idx, dtype=np.int64)
    val = np.asarray(bound_val, dtype=np.float64)
    upper = np.asarray(bound_upper, dtype=bool)
    if idx.size and int(idx.max()) >= n_x:
        raise UserInputError(f"bound on undeclared input X_{int(idx.max())}", path=str(path))
    if not np.isfinite(val).all():
        raise UserInputError("an input bound is not a finite number", path=str(path))
    lb = np.full(n_x, -np.inf)
    ub = np.full(n_x, np.inf)
    np.maximum.at(lb, idx[~upper], val[~upper])
    np.minimum.at(ub, idx[upper], val[upper])
    for arr, side in ((lb, "lower"), (ub, "upper")):
        missing = np.flatnonzero(~np.isfinite(arr))
        if missing.size:
            more = f" and {missing.size - 1} more" if missing.size > 1 else ""
            raise UserInputError(f"no {side} bound for X_{int(missing[0])}{more}", path=str(path))
    empty = np.flatnonzero(lb > ub)
    if empty.size:
        i = int(empty[0])
        raise UserInputError(
            f"empty box: X_{i} has lower bound {lb[i]!r} above upper bound {ub[i]!r}", path=str(path)
        )

    if output_forms == 0:
        raise UserInputError("no output condition (assert over Y_j)", path=str(path))
    if output_forms > 1:
        raise UserInputError(
            "several output assertions (a conjunction) are not supported: expect one "
            "'(assert (or (and (>= Y_t Y_label)) ...))' or one '(assert (>= Y_t Y_label))'",
            path=str(path),
        )
    disjuncts = outputs[0]
    smalls = {s for _, s in disjuncts}
    if len(smalls) != 1:
        raise UserInputError(
            "unsupported output condition: the disjuncts compare against different outputs "
            f"({', '.join(f'Y_{s}' for s in sorted(smalls))}), so there is no single label",
            path=str(path),
        )
    label = smalls.pop()
    targets = sorted({b for b, _ in disjuncts})
    for j in [label, *targets]:
        if j >= n_y:
            raise UserInputError(f"output condition uses undeclared output Y_{j}", path=str(path))
    if label in targets:
        raise UserInputError(f"output condition compares Y_{label} with itself", path=str(path))

    spec = _Spec()
    spec.n_x, spec.n_y, spec.lb, spec.ub, spec.label, spec.targets = n_x, n_y, lb, ub, label, targets
    return spec


def _interpret_assert(body, path: Path, bound_idx, bound_val, bound_upper):
    """Input bounds in unusual forms are appended to the bound lists (returns None); an output
    condition returns its disjuncts as (big, small) pairs meaning 'Y_big >= Y_small'."""
    conj = body[1:] if isinstance(body, list) and body and body[0] == "and" else [body]
    if isinstance(body, list) and body and body[0] == "or":
        pairs = []
        for d in body[1:]:
            inner = d[1:] if isinstance(d, list) and d and d[0] == "and" else [d]
            comps = [_comparison(c, path) for c in inner]
            if len(comps) != 1 or comps[0][0] != "Y":
                raise UserInputError(
                    f"unsupported output condition {_show(d)!r}: each disjunct must be one "
                    "comparison 'Y_t >= Y_label'",
                    path=str(path),
                )
            pairs.append(comps[0][1])
        if not pairs:
            raise UserInputError("unsupported output condition: empty (or)", path=str(path))
        return pairs
    comps = [_comparison(c, path) for c in conj]
    if not comps:
        raise UserInputError(f"unsupported assertion {_show(body)!r}", path=str(path))
    kinds = {k for k, _ in comps}
    if kinds == {"X"}:
        for _, (i, v, is_upper) in comps:
            bound_idx.append(i)
            bound_val.append(v)
            bound_upper.append(is_upper)
        return None
    if kinds == {"Y"} and len(comps) == 1:
        return [comps[0][1]]
    raise UserInputError(
        f"unsupported assertion {_show(body)!r}: expected input bounds or one output comparison",
        path=str(path),
    )


def _comparison(expr, path: Path):
    """('X', (i, value, is_upper)) for an input bound, ('Y', (big, small)) for 'Y_big >= Y_small'."""
    if not (isinstance(expr, list) and len(expr) == 3 and expr[0] in _CMP):
        raise UserInputError(f"unsupported expression {_show(expr)!r}", path=str(path))
    op, a, b = expr
    if isinstance(a, list) or isinstance(b, list):
        raise UserInputError(
            f"unsupported expression {_show(expr)!r}: only comparisons of two variables or a variable "
            "and a number are understood",
            path=str(path),
        )
    ka, kb = _atom_kind(a), _atom_kind(b)
    if ka is None or kb is None:
        raise UserInputError(f"syntax error in {_show(expr)!r}", path=str(path))
    ge = op in (">=", ">")
    if ka[0] == "X" and kb[0] == "c":
        return "X", (ka[1], kb[1], not ge)
    if ka[0] == "c" and kb[0] == "X":
        return "X", (kb[1], ka[1], ge)
    if ka[0] == "Y" and kb[0] == "Y":
        if ka[1] == kb[1]:
            raise UserInputError(f"output condition {_show(expr)!r} compares Y_{ka[1]} with itself", path=str(path))
        return "Y", ((ka[1], kb[1]) if ge else (kb[1], ka[1]))
    raise UserInputError(
        f"unsupported comparison {_show(expr)!r}: expected X_i against a number or Y_a against Y_b",
        path=str(path),
    )


def _recover(lb: np.ndarray, ub: np.ndarray, shape: tuple[int, ...]):
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


def _load_vnnlib(source: Path, files: list[Path], shape, layout, n_classes, limit) -> Dataset:
    if limit is not None:
        files = files[:limit]
    count = math.prod(shape)
    notes: list[str] = []
    if layout != "nchw":
        notes.append("layout ignored for VNN-LIB: X_i always follows the model's own input layout")
    xs, lbs, ubs, eps_list, labels, targets, names = [], [], [], [], [], [], []
    per_channel: dict[tuple, int] = {}
    for f in files:
        spec = _parse_vnnlib(f, _read_text(f))
        if spec.n_x != count:
            raise UserInputError(
                f"the spec declares {spec.n_x} inputs but the model input has shape {_fmt(shape)} "
                f"({count} values)",
                path=str(f),
            )
        if n_classes is not None and spec.n_y != n_classes:
            raise UserInputError(
                f"the spec declares {spec.n_y} outputs but the model has {n_classes} classes", path=str(f)
            )
        x, eps, radii = _recover(spec.lb, spec.ub, shape)
        if len(radii) > 1 and max(radii) - min(radii) > 1e-3 * max(radii):
            key = tuple(float(f"{r:.6g}") for r in radii)
            per_channel[key] = per_channel.get(key, 0) + 1
        xs.append(x)
        lbs.append(spec.lb)
        ubs.append(spec.ub)
        eps_list.append(eps)
        labels.append(spec.label)
        targets.append(spec.targets)
        names.append(f.name if f == source else f.relative_to(source).as_posix())
    for key, k in per_channel.items():
        notes.append(
            f"{k} spec(s) use per-channel l-inf radii {list(key)} (model input units); eps is the "
            "largest, lower/upper hold the exact box"
        )
    if not xs:  # pragma: no cover - callers pass at least one file
        raise UserInputError("the data set is empty (0 examples)", path=str(source))
    y = np.asarray(labels, dtype=np.int64)
    if n_classes is not None:
        _check_labels(y, names, n_classes, source)
    n = len(xs)
    return Dataset(
        x=torch.from_numpy(np.stack(xs).astype(np.float32).reshape((n, *shape))),
        y=torch.from_numpy(y),
        eps=torch.tensor(eps_list, dtype=torch.float64),
        targets=targets,
        names=names,
        notes=notes,
        source=str(source),
        lower=torch.from_numpy(np.stack(lbs).reshape((n, *shape))),
        upper=torch.from_numpy(np.stack(ubs).reshape((n, *shape))),
    )
