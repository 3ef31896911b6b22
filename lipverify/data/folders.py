"""Labelled examples from a folder of class sub-folders of images.

Folder of images
    One sub-folder per class. Class ``k`` is the k-th sub-folder in sorted name order, or, when every
    sub-folder name is an integer (``0``, ``1``, ... ``9``), that integer. Images (PNG, JPEG, BMP, GIF,
    TIFF, WebP, PNM) are read with Pillow, converted to grayscale for a 1-channel model or RGB for a
    3-channel one, and divided by 255 so values lie in [0, 1]. Images are never resized: a size that
    does not match the model input is refused. Channels are placed as the model input shape says
    (channel-first ``(C, H, W)`` unless the shape is channel-last ``(H, W, C)``; a flat input shape
    receives the channel-first image flattened row-major).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from lipverify.data.dataset import Dataset, check_labels, fmt_shape, oneline
from lipverify.errors import UserInputError

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

    arrangement, channels, height, width = image_plan(shape)
    if channels is None:
        count = math.prod(shape)
    elif len(shape) == 3 and channels not in (1, 3):  # pragma: no cover - excluded by image_plan
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
                arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
        except UserInputError:
            raise
        except Exception as exc:  # PIL.UnidentifiedImageError, OSError, truncated files, ...
            raise UserInputError(f"cannot read image ({oneline(exc)})", path=str(f)) from None
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
                    f"each {channels}x{height}x{width} (C x H x W) image flattened row-major to {fmt_shape(shape)}"
                )
            x = x.reshape((x.shape[0], *shape))
    x = np.ascontiguousarray(x, dtype=np.float32)
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
