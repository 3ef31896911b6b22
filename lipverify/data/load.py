"""Loading evaluation data: labelled examples, and optionally per-example l-inf boxes.

``load_data(path, input_shape)`` reads one of three formats and returns a :class:`Dataset` whose ``x``
has shape ``(N, *input_shape)``, where ``input_shape`` is the model's own per-example input shape
(no batch dimension), e.g. ``(1, 28, 28)``, ``(784,)``, ``(784, 1)`` or ``(3, 32, 32)``.

Formats
-------
Each module's docstring has the details.

* ``.npz`` archive with inputs and labels: :mod:`lipverify.data.npz`;
* a folder with one sub-folder of images per class: :mod:`lipverify.data.folders`;
* a VNN-LIB specification file, or a folder of them (an l-inf box and an output condition per file):
  :mod:`lipverify.data.vnnlib`.

Every problem the user can fix raises :class:`~lipverify.errors.UserInputError` naming the file.

Hostile files
-------------
Every data file may come from a stranger. A file given as data must be a regular file (a device such
as ``/dev/zero``, a FIFO, ``/dev/stdin`` on a pipe or a socket is refused by what it is, also behind
a symbolic link); each format's module checks sizes and memory before allocating (see their
docstrings and :mod:`lipverify.limits`).

Warnings
--------
Raises :class:`~lipverify.errors.UserInputError` for: a missing path, a special file, an empty file,
an unknown format, a bad ``layout``, ``limit`` or class count, and everything the format loaders
refuse.
"""

from __future__ import annotations

from pathlib import Path

from lipverify.data.dataset import LAYOUTS, Dataset
from lipverify.data.folders import load_image_folder
from lipverify.data.npz import load_npz
from lipverify.data.vnnlib import load_vnnlib, vnnlib_files
from lipverify.errors import UserInputError
from lipverify.limits import check_regular


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
    if not isinstance(layout, str) or layout.lower() not in LAYOUTS:
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
        specs = vnnlib_files(path)
        if specs:
            return load_vnnlib(path, specs, shape, layout, n_classes, limit)
        return load_image_folder(path, shape, n_classes, limit)
    check_regular(path, "data file")
    name = path.name.lower()
    if name.endswith(".npz"):
        return load_npz(path, shape, layout, n_classes, limit)
    if name.endswith(".vnnlib") or name.endswith(".vnnlib.gz"):
        return load_vnnlib(path, [path], shape, layout, n_classes, limit)
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


def load_for_model(lm, data_path, *, layout: str = "nchw", limit: int | None = None,
                   outside_normalisation: bool = False, need_labels: bool = False):
    """Load data for the model ``lm``: its input shape and number of classes.

    With a normalisation outside the model (``outside_normalisation``; ``lm.module.normalize``),
    VNN-LIB boxes, which are in the model's input units, are mapped to pixel space: the clean input
    becomes ``x * std + mean`` and ``eps`` becomes ``eps * max(std)`` — the l-inf ball of that radius
    contains the mapped box, so certifying the ball certifies the box (``lower``/``upper`` keep the
    exact box in model units, ``ds.box()`` gives it in pixel units).  ``need_labels``: refuse VNN-LIB
    specs whose output property has no single label.
    """
    ds = load_data(data_path, lm.input_shape, layout=layout, n_classes=lm.n_classes, limit=limit)
    if need_labels and not ds.labelled:
        first = ds.names[int((ds.y < 0).nonzero()[0])]
        raise UserInputError(
            f"{first} states a general output property (no single label); this command needs labelled "
            "examples (use certify or attack for such specs)",
            path=str(data_path),
        )
    if ds.eps is not None and outside_normalisation:
        norm = lm.module.normalize
        ds.x = ds.x * norm.std.cpu() + norm.mean.cpu()
        ds.eps = ds.eps * float(norm.std.max())
        ds.box_map = (norm.mean.cpu(), norm.std.cpu())
        ds.notes.append("VNN-LIB boxes mapped to pixel space (x*std+mean; eps*max(std), a superset ball)")
    return ds
