"""Labelled examples from a folder of class sub-folders of images.

Folder of images
    One sub-folder per class. Class ``k`` is the k-th sub-folder in sorted name order, or, when every
    sub-folder name is an integer (``0``, ``1``, ... ``9``), that integer. Images (PNG, JPEG, BMP, GIF,
    TIFF, WebP, PNM) are read with Pillow, converted to grayscale for a 1-channel model or RGB for a
    3-channel one, and divided by 255 so values lie in [0, 1]. Images are never resized: a size that
    does not match the model input is refused. Channels are placed as the model input shape says
    (channel-first ``(C, H, W)`` unless the shape is channel-last ``(H, W, C)``; a flat input shape
    receives the channel-first image flattened row-major).

Every image may come from a stranger. An entry of the folder or of a class sub-folder that is a
symbolic link leaving the data folder is refused (never followed), as are devices, FIFOs and sockets
with an image name (:mod:`lipverify.data.files`); each image is opened with :func:`lipverify.limits.open_regular`. The
memory of the whole data set (``N x input size x 4`` bytes) is checked against the memory limit
before the first image is decoded, and each image's size is read from its header and compared with
the model input before its pixels are decoded, so only images of the model's size are ever
decompressed. An image over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is
refused on its header; Pillow's warning is never printed.

Warnings
--------
Raises :class:`~lipverify.errors.UserInputError` naming the folder or the image for: no class
sub-folders, two sub-folders naming the same class, no images, a symbolic link leaving the folder,
a special file with an image name, an image that cannot be read (or is truncated), a decompression
bomb, an image of another size than the model input (images are never resized), 16-bit or float
images, a data set larger than the memory limit, and labels outside ``[0, n_classes)``.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from lipverify.data.dataset import Dataset, check_labels, fmt_shape, oneline
from lipverify.data.files import check_wanted, list_folder
from lipverify.errors import UserInputError
from lipverify.limits import check_alloc, open_regular

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm"}
)


def image_plan(shape: tuple[int, ...]):
    """(arrangement, channels, height, width) from the model input shape; H/W None for flat shapes."""
    if len(shape) == 3 and shape[0] in (1, 3):
        return "chw", shape[0], shape[1], shape[2]
    if len(shape) == 3 and shape[2] in (1, 3):
        return "hwc", shape[2], shape[0], shape[1]
    return "flat", None, None, None


def load_image_folder(path: Path, shape, n_classes, limit) -> Dataset:
    """The images of a folder of class sub-folders (module docstring); ``limit`` keeps the first.

    Warnings
    --------
    Raises :class:`~lipverify.errors.UserInputError` naming the folder or the image for every
    problem the module docstring lists; the memory of the whole set is checked before decoding.
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency of torchvision
        raise UserInputError("reading image folders needs Pillow (pip install pillow)", path=str(path)) from None

    base = path.resolve()
    entries = list_folder(path, base, path)
    class_dirs = [e.path for e in entries if e.kind == "dir" and not e.path.name.startswith(".")]
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
        for e in list_folder(d, base, path):
            if e.path.name.startswith(".") or e.kind == "dir":
                continue
            if e.path.suffix.lower() in IMAGE_SUFFIXES:
                files.append((check_wanted(e, "image file"), label))
            else:
                ignored += 1
    if ignored:
        notes.append(f"ignored {ignored} file(s) without an image extension")
    if not files:
        raise UserInputError("no image files found in the class sub-folders", path=str(path))
    if limit is not None:
        files = files[:limit]

    arrangement, channels, height, width = image_plan(shape)
    count = math.prod(shape)
    if len(shape) == 3 and channels is not None and channels not in (1, 3):  # pragma: no cover
        raise UserInputError("image folders support 1 (grayscale) or 3 (RGB) channels", path=str(path))
    n = len(files)
    # the data set, plus one decoded image in uint8 and float32
    check_alloc(4.0 * n * count + 8 * count, f"decoding {n} image(s) of {count} values each", str(path))
    x = np.empty((n, count), dtype=np.float32)
    names = []
    for k, (f, _) in enumerate(files):
        arr, channels, height, width = _decode(Image, f, shape, channels, height, width)
        # arr: (H, W, C) float32 in [0, 1]
        if arrangement == "hwc":
            x[k] = arr.reshape(-1)
        else:
            x[k] = arr.transpose(2, 0, 1).reshape(-1)  # channel-first, flattened row-major
        names.append(f.relative_to(path).as_posix())

    if arrangement == "flat" and (channels, height, width) != shape and not (channels == 1
                                                                             and shape == (height, width)):
        notes.append(f"each {channels}x{height}x{width} (C x H x W) image flattened row-major to "
                     f"{fmt_shape(shape)}")
    x = x.reshape((n, *shape))
    y = np.array([label for _, label in files], dtype=np.int64)
    notes.append("pixels scaled to [0, 1] (divided by 255)")
    check_labels(y, names, n_classes, path)
    return Dataset(
        x=torch.from_numpy(x),
        y=torch.from_numpy(y),
        eps=None,
        targets=None,
        names=names,
        notes=notes,
        source=str(path),
    )


def _decode(Image, f: Path, shape, channels, height, width):
    """One image as float32 ``(H, W, C)`` in [0, 1]; its size is checked on its header, before
    decoding. Returns the array and the (possibly just decided) channels, height and width."""
    count = math.prod(shape)
    try:
        with open_regular(f, "image file") as fh, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(fh)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise UserInputError(
                    f"the image header declares more than {Image.MAX_IMAGE_PIXELS} pixels (Pillow's "
                    "decompression-bomb limit); refused without decoding it",
                    path=str(f),
                ) from None
            with im:
                w_img, h_img = im.size
                if channels is None:  # flat model input: decide from the first image's size
                    if count == w_img * h_img:
                        channels = 1
                    elif count == 3 * w_img * h_img:
                        channels = 3
                    else:
                        raise UserInputError(
                            f"image is {w_img}x{h_img} (width x height), which gives neither {count} "
                            f"grayscale nor {count} RGB values for the model input shape {fmt_shape(shape)}",
                            path=str(f),
                        )
                    height, width = h_img, w_img
                if (w_img, h_img) != (width, height):
                    raise UserInputError(
                        f"image is {w_img}x{h_img} (width x height) but the model expects "
                        f"{width}x{height}; images are not resized",
                        path=str(f),
                    )
                if im.mode in ("I", "F") or im.mode.startswith("I;"):
                    raise UserInputError(
                        f"image mode {im.mode} (16-bit or float) is not supported; save 8-bit images",
                        path=str(f),
                    )
                im.load()
                arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    except UserInputError:
        raise
    except Exception as exc:  # PIL.UnidentifiedImageError, OSError, truncated files, ...
        raise UserInputError(f"cannot read image ({oneline(exc)})", path=str(f)) from None
    arr = arr / np.float32(255.0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr, channels, height, width
