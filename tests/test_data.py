"""Tests of lipverify.data: .npz archives, image folders and VNN-LIB specifications.

Oracles are independent of the loader: arrays written here with numpy/Pillow, boxes built here from a
known clean image, and for the real competition specs the published labels/radii of
ground_truth/instances.csv and the MNIST/CIFAR pixel grids (raw images are multiples of 1/255).
"""

from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lipverify.data import Dataset, load_data
from lipverify.errors import UserInputError

# ----------------------------------------------------------------------------------------------------
# helpers


def _raises(path, *args, match: str | None = None, **kwargs) -> str:
    """Assert load_data raises UserInputError on one line naming the file; return the message."""
    with pytest.raises(UserInputError) as info:
        load_data(path, *args, **kwargs)
    msg = str(info.value)
    assert Path(path).name in msg, msg
    assert "\n" not in msg, msg
    if match is not None:
        assert match.lower() in msg.lower(), msg
    return msg


def _npz(tmp_path, name, **arrays) -> Path:
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def _box_lines(lb, ub, const_first=False) -> str:
    out = []
    for i, (lo, hi) in enumerate(zip(np.ravel(lb).tolist(), np.ravel(ub).tolist())):
        if const_first:
            out.append(f"(assert (>= {hi!r} X_{i}))\n(assert (<= {lo!r} X_{i}))")
        else:
            out.append(f"(assert (<= X_{i} {hi!r}))\n(assert (>= X_{i} {lo!r}))")
    return "\n".join(out)


def _spec(lb, ub, output: str, n_out: int = 10, const_first=False, n_decl: int | None = None) -> str:
    n = np.size(lb) if n_decl is None else n_decl
    decl = "\n".join(f"(declare-const X_{i} Real)" for i in range(n))
    ydecl = "\n".join(f"(declare-const Y_{j} Real)" for j in range(n_out))
    return f"; synthetic spec\n{decl}\n{ydecl}\n; input box\n{_box_lines(lb, ub, const_first)}\n{output}\n"


def _untargeted(label: int, n_out: int = 10, mirrored=False, wrap_and=True) -> str:
    parts = []
    for j in range(n_out):
        if j == label:
            continue
        cmp = f"(<= Y_{label} Y_{j})" if mirrored else f"(>= Y_{j} Y_{label})"
        parts.append(f"(and {cmp})" if wrap_and else cmp)
    return "(assert (or\n    " + "\n    ".join(parts) + "\n))"


def _clipped_box(x, eps, lo=0.0, hi=1.0):
    return np.maximum(x - eps, lo), np.minimum(x + eps, hi)


# a clean 1x4x4 "image" on the 1/255 grid with values at 0, at 1, and within eps of both ends
CLEAN = (
    np.array(
        [[0, 0, 3, 10], [128, 255, 250, 254], [1, 200, 77, 255], [0, 12, 243, 60]], dtype=np.float64
    ).reshape(1, 4, 4)
    / 255.0
)


# ----------------------------------------------------------------------------------------------------
# .npz


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((6, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 6).astype(np.int64)
    p = _npz(tmp_path, "mnist_like.npz", x=x, y=y)
    d = load_data(p, (1, 28, 28), n_classes=10)
    assert isinstance(d, Dataset) and len(d) == 6
    assert d.x.dtype == torch.float32 and tuple(d.x.shape) == (6, 1, 28, 28)
    assert d.y.dtype == torch.int64
    np.testing.assert_array_equal(d.x.numpy(), x)
    np.testing.assert_array_equal(d.y.numpy(), y)
    assert d.eps is None and d.targets is None
    assert d.names[0] == "mnist_like.npz[0]" and d.names[5] == "mnist_like.npz[5]"
    assert d.notes == []
    assert d.source == str(p)


def test_npz_reshape_flat_rows_with_note(tmp_path):
    x = np.arange(3 * 784, dtype=np.float64).reshape(3, 784) / 3000.0
    p = _npz(tmp_path, "flat.npz", x=x, y=np.array([1, 2, 3]))
    d = load_data(p, (1, 28, 28))
    assert tuple(d.x.shape) == (3, 1, 28, 28)
    # row-major: pixel (r, c) of example n is element 28*r + c of row n
    assert d.x[2, 0, 5, 7].item() == pytest.approx(np.float32(x[2, 28 * 5 + 7]))
    np.testing.assert_array_equal(d.x.numpy(), x.astype(np.float32).reshape(3, 1, 28, 28))
    assert any("reshaped (3, 784) -> (3, 1, 28, 28) row-major" in n for n in d.notes), d.notes


def test_npz_reshape_to_column_input(tmp_path):
    x = np.random.default_rng(0).random((2, 1, 28, 28)).astype(np.float32)
    d = load_data(_npz(tmp_path, "col.npz", X=x, Y=np.array([0, 1])), (784, 1))
    assert tuple(d.x.shape) == (2, 784, 1)
    np.testing.assert_array_equal(d.x.numpy()[:, :, 0], x.reshape(2, 784))
    assert any("row-major" in n for n in d.notes)


def test_npz_nhwc_transposes(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.random((2, 4, 5, 3)).astype(np.float32)  # N, H, W, C
    x[1, 2, 3, 0] = 7.0  # example 1, row 2, column 3, red
    x[0, 1, 4, 2] = -3.0  # example 0, row 1, column 4, blue
    p = _npz(tmp_path, "hwc.npz", images=x, labels=np.array([3, 4]))
    d = load_data(p, (3, 4, 5), layout="nhwc")
    assert tuple(d.x.shape) == (2, 3, 4, 5)
    assert d.x[1, 0, 2, 3].item() == 7.0
    assert d.x[0, 2, 1, 4].item() == -3.0
    for n, c, h, w in [(0, 1, 3, 2), (1, 2, 0, 4)]:
        assert d.x[n, c, h, w].item() == x[n, h, w, c]
    assert any("transposed" in n for n in d.notes), d.notes


def test_npz_nhwc_from_flat_hwc_rows(tmp_path):
    """Flat rows in HWC-interleaved order (R,G,B per pixel), like the ERAN CIFAR csv."""
    img = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    p = _npz(tmp_path, "rows.npz", x=img.reshape(1, -1), y=np.array([0]))
    d = load_data(p, (3, 4, 5), layout="nhwc")
    np.testing.assert_array_equal(d.x[0].numpy(), img.transpose(2, 0, 1))


def test_npz_channel_last_without_layout_is_refused(tmp_path):
    p = _npz(tmp_path, "guess.npz", x=np.zeros((2, 32, 32, 3), np.float32), y=np.array([0, 1]))
    _raises(p, (3, 32, 32), match="nhwc")


def test_npz_limit_and_label_forms(tmp_path):
    x = np.random.default_rng(3).random((5, 2)).astype(np.float32)
    onehot = np.eye(4)[[3, 0, 2, 1, 1]]
    d = load_data(_npz(tmp_path, "oh.npz", x=x, y=onehot), (2,), limit=3)
    assert d.y.tolist() == [3, 0, 2] and len(d) == 3
    np.testing.assert_array_equal(d.x.numpy(), x[:3])
    d = load_data(_npz(tmp_path, "fl.npz", x=x, y=np.array([1.0, 2.0, 0.0, 3.0, 1.0])), (2,))
    assert d.y.tolist() == [1, 2, 0, 3, 1] and d.y.dtype == torch.int64
    d = load_data(_npz(tmp_path, "coly.npz", x=x, y=np.array([[1], [2], [0], [3], [1]])), (2,))
    assert d.y.tolist() == [1, 2, 0, 3, 1]


def test_subset(tmp_path):
    x = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    d = load_data(_npz(tmp_path, "s.npz", x=x, y=np.array([0, 1, 2, 3, 4])), (3,))
    s = d.subset([3, 1])
    assert s.y.tolist() == [3, 1] and s.names == ["s.npz[3]", "s.npz[1]"]
    np.testing.assert_array_equal(s.x.numpy(), x[[3, 1]])
    s = d.subset(torch.tensor([True, False, True, False, False]))
    assert s.y.tolist() == [0, 2]
    assert d.subset(slice(1, 3)).y.tolist() == [1, 2]
    assert len(d.subset([])) == 0


def _bad_npz_cases(tmp_path):
    x = np.zeros((4, 1, 2, 2), np.float32)
    y = np.array([0, 1, 2, 3])
    cases = {}
    cases["float_labels"] = _npz(tmp_path, "float_labels.npz", x=x, y=np.array([0.0, 1.5, 2.0, 3.0]))
    cases["string_labels"] = _npz(tmp_path, "string_labels.npz", x=x, y=np.array(["a", "b", "c", "d"]))
    cases["negative_labels"] = _npz(tmp_path, "negative_labels.npz", x=x, y=np.array([0, -1, 2, 3]))
    x_nan = x.copy()
    x_nan[2, 0, 1, 1] = np.nan
    cases["nan"] = _npz(tmp_path, "has_nan.npz", x=x_nan, y=y)
    x_inf = x.copy()
    x_inf[0, 0, 0, 0] = np.inf
    cases["inf"] = _npz(tmp_path, "has_inf.npz", x=x_inf, y=y)
    cases["overflow"] = _npz(tmp_path, "overflow.npz", x=np.full((4, 1, 2, 2), 1e300), y=y)
    cases["empty_set"] = _npz(
        tmp_path, "empty_set.npz", x=np.zeros((0, 1, 2, 2), np.float32), y=np.zeros(0, np.int64)
    )
    cases["length_mismatch"] = _npz(tmp_path, "length_mismatch.npz", x=x, y=y[:3])
    cases["missing_keys"] = _npz(tmp_path, "missing_keys.npz", data=x, target=y)
    cases["only_x"] = _npz(tmp_path, "only_x.npz", x=x)
    cases["shape_mismatch"] = _npz(tmp_path, "shape_mismatch.npz", x=np.zeros((4, 5), np.float32), y=y)
    cases["object"] = _npz(tmp_path, "object.npz", x=np.array([None] * 4, dtype=object), y=y)
    (tmp_path / "empty_file.npz").write_bytes(b"")
    cases["empty_file"] = tmp_path / "empty_file.npz"
    (tmp_path / "garbage.npz").write_bytes(b"this is not a zip archive at all" * 10)
    cases["garbage"] = tmp_path / "garbage.npz"
    good = _npz(tmp_path, "to_truncate.npz", x=np.random.default_rng(0).random((4, 1, 2, 2)), y=y)
    raw = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    cases["truncated"] = tmp_path / "truncated.npz"
    single = tmp_path / "single_array.npz"
    with open(single, "wb") as fh:
        np.save(fh, x)
    cases["single_array"] = single
    return cases


@pytest.mark.parametrize(
    "case, match",
    [
        ("float_labels", "not integers"),
        ("string_labels", "integers"),
        ("negative_labels", "negative"),
        ("nan", "nan"),
        ("inf", "infinite"),
        ("overflow", "infinite"),
        ("empty_set", "empty"),
        ("length_mismatch", "4 examples"),
        ("missing_keys", "'x'"),
        ("only_x", "'y'"),
        ("shape_mismatch", "(5,)"),
        ("object", None),
        ("empty_file", "empty"),
        ("garbage", None),
        ("truncated", None),
        ("single_array", None),
    ],
)
def test_npz_bad_inputs_raise_user_error(tmp_path, case, match):
    path = _bad_npz_cases(tmp_path)[case]
    msg = _raises(path, (1, 2, 2), match=match)
    if case == "shape_mismatch":
        assert "(1, 2, 2)" in msg  # names both shapes


def test_labels_out_of_range(tmp_path):
    p = _npz(tmp_path, "range.npz", x=np.zeros((3, 2), np.float32), y=np.array([0, 9, 10]))
    assert len(load_data(p, (2,), n_classes=11)) == 3
    _raises(p, (2,), n_classes=10, match="outside [0, 10)")


def test_other_bad_paths(tmp_path):
    (tmp_path / "data.txt").write_text("1 2 3")
    _raises(tmp_path / "data.txt", (3,), match="unsupported data format")
    np.save(tmp_path / "x_only.npy", np.zeros((2, 3)))
    _raises(tmp_path / "x_only.npy", (3,), match="unsupported data format")
    _raises(tmp_path / "nowhere.npz", (3,), match="no such file")
    p = _npz(tmp_path, "ok.npz", x=np.zeros((2, 3), np.float32), y=np.array([0, 1]))
    _raises(p, (3,), layout="nwhc", match="layout")
    _raises(p, (3,), layout="nhwc", match="nhwc")
    (tmp_path / "emptydir").mkdir()
    _raises(tmp_path / "emptydir", (3,), match="unsupported data format")


# ----------------------------------------------------------------------------------------------------
# image folders


def _png(path: Path, arr: np.ndarray):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def test_image_folder_grayscale(tmp_path):
    rng = np.random.default_rng(4)
    imgs = {f"{c}/img{i}.png": rng.integers(0, 256, (3, 4)) for c in ("dog", "cat") for i in (1, 2)}
    for rel, arr in imgs.items():
        _png(tmp_path / "gray" / rel, arr)
    (tmp_path / "gray" / "cat" / "README.txt").write_text("not an image")
    d = load_data(tmp_path / "gray", (1, 3, 4))
    assert d.names == ["cat/img1.png", "cat/img2.png", "dog/img1.png", "dog/img2.png"]
    assert d.y.tolist() == [0, 0, 1, 1]  # sorted names: cat=0, dog=1
    assert d.x.dtype == torch.float32 and tuple(d.x.shape) == (4, 1, 3, 4)
    for k, name in enumerate(d.names):
        np.testing.assert_allclose(d.x[k, 0].numpy(), imgs[name] / 255.0, rtol=0, atol=1e-7)
    assert d.eps is None and d.targets is None
    # a flat model input receives the image flattened row-major
    d = load_data(tmp_path / "gray", (12,), limit=3)
    assert len(d) == 3
    np.testing.assert_allclose(d.x[2].numpy(), imgs["dog/img1.png"].ravel() / 255.0, atol=1e-7)


def test_image_folder_rgb_and_integer_classes(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (2, 3, 3))  # H=2, W=3, RGB
    b = rng.integers(0, 256, (2, 3, 3))
    _png(tmp_path / "rgb" / "10" / "a.png", a)
    _png(tmp_path / "rgb" / "2" / "b.png", b)
    d = load_data(tmp_path / "rgb", (3, 2, 3))
    assert d.names == ["2/b.png", "10/a.png"]  # numeric order, not "10" < "2"
    assert d.y.tolist() == [2, 10]
    assert d.x[1, 0, 1, 2].item() == pytest.approx(a[1, 2, 0] / 255.0, abs=1e-7)  # red, row 1, col 2
    assert d.x[0, 2, 0, 1].item() == pytest.approx(b[0, 1, 2] / 255.0, abs=1e-7)  # blue, row 0, col 1
    np.testing.assert_allclose(d.x[0].numpy(), b.transpose(2, 0, 1) / 255.0, atol=1e-7)
    # channel-last model input keeps HWC
    d = load_data(tmp_path / "rgb", (2, 3, 3))
    np.testing.assert_allclose(d.x[1].numpy(), a / 255.0, atol=1e-7)
    _raises(tmp_path / "rgb", (3, 2, 3), n_classes=10, match="outside [0, 10)")


def test_image_folder_errors(tmp_path):
    _png(tmp_path / "imgs" / "a" / "big.png", np.zeros((5, 5)))
    with pytest.raises(UserInputError, match="big.png.*5x5.*resized"):
        load_data(tmp_path / "imgs", (1, 4, 4))
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserInputError, match="broken.png"):
        load_data(tmp_path / "bad", (1, 4, 4))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    _raises(tmp_path / "noimg", (1, 4, 4), match="no image files")


# ----------------------------------------------------------------------------------------------------
# VNN-LIB: synthetic specs with a known clean image


def test_vnnlib_untargeted_exact_recovery_with_clipping(tmp_path):
    eps = 0.05
    lb, ub = _clipped_box(CLEAN, eps)
    assert (lb == 0).sum() >= 4 and (ub == 1).sum() >= 4  # clipped at both ends
    p = tmp_path / "img_label3.vnnlib"
    p.write_text(_spec(lb, ub, _untargeted(3)))
    d = load_data(p, (1, 4, 4), n_classes=10)
    assert len(d) == 1 and d.names == ["img_label3.vnnlib"]
    assert d.y.tolist() == [3]
    assert d.targets == [[0, 1, 2, 4, 5, 6, 7, 8, 9]]
    assert d.eps.dtype == torch.float64 and abs(d.eps.item() - eps) < 1e-12
    np.testing.assert_allclose(d.x[0].numpy(), CLEAN.astype(np.float32), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(d.lower[0].numpy(), lb)
    np.testing.assert_array_equal(d.upper[0].numpy(), ub)


def test_vnnlib_flat_input_shape_and_variants(tmp_path):
    eps = 0.03
    lb, ub = _clipped_box(CLEAN, eps)
    # constant-first bounds, mirrored comparisons, no "and" wrapper, scientific notation, gzip
    text = _spec(lb, ub, _untargeted(7, mirrored=True, wrap_and=False), const_first=True)
    text = text.replace("0.0)", "0e0)")
    p = tmp_path / "variant.vnnlib.gz"
    p.write_bytes(gzip.compress(text.encode()))
    d = load_data(p, (16, 1))
    assert tuple(d.x.shape) == (1, 16, 1)
    np.testing.assert_allclose(d.x[0, :, 0].numpy(), CLEAN.ravel().astype(np.float32), atol=1e-7)
    assert d.y.tolist() == [7] and d.targets[0] == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert abs(d.eps.item() - eps) < 1e-12


@pytest.mark.parametrize("cond", ["(assert (>= Y_4 Y_1))", "(assert (<= Y_1 Y_4))", "(assert (and (>= Y_4 Y_1)))"])
def test_vnnlib_targeted(tmp_path, cond):
    lb, ub = _clipped_box(CLEAN, 0.02)
    p = tmp_path / "targeted.vnnlib"
    p.write_text(_spec(lb, ub, cond, n_out=5))
    d = load_data(p, (1, 4, 4), n_classes=5)
    assert d.y.tolist() == [1] and d.targets == [[4]]
    np.testing.assert_allclose(d.x[0].numpy(), CLEAN.astype(np.float32), atol=1e-7)


def test_vnnlib_per_channel_radii_and_ranges(tmp_path):
    """Normalised CIFAR-style box: each channel has its own radius and its own valid range."""
    rng = np.random.default_rng(6)
    pix = rng.integers(0, 256, (3, 4, 4)) / 255.0
    pix[0, 0, :2] = 0.0
    pix[1, 1, 1] = 1.0
    pix[2, 3, 3] = 0.0
    pix[2, 0, 0] = 1.0
    mean = np.array([0.49, 0.48, 0.45])[:, None, None]
    std = np.array([0.25, 0.24, 0.26])[:, None, None]
    x = (pix - mean) / std
    lb = (np.maximum(pix - 2 / 255, 0) - mean) / std
    ub = (np.minimum(pix + 2 / 255, 1) - mean) / std
    p = tmp_path / "cifar_like.vnnlib"
    p.write_text(_spec(lb, ub, _untargeted(0)))
    d = load_data(p, (3, 4, 4))
    np.testing.assert_allclose(d.x[0].numpy(), x, rtol=0, atol=1e-6)
    assert d.eps.item() == pytest.approx((2 / 255) / 0.24, rel=1e-12)
    assert any("per-channel" in n for n in d.notes)


def test_vnnlib_constant_channel_clipped_everywhere(tmp_path):
    pix = np.full((3, 2, 2), 0.5)
    pix[1] = 0.0  # a channel entirely at the range minimum
    pix[0, 0, 0] = 1.0
    lb, ub = _clipped_box(pix, 0.1)
    p = tmp_path / "flat_channel.vnnlib"
    p.write_text(_spec(lb, ub, _untargeted(2)))
    d = load_data(p, (3, 2, 2))
    np.testing.assert_allclose(d.x[0].numpy(), pix, atol=1e-7)
    assert d.eps.item() == pytest.approx(0.1)


def test_vnnlib_folder_sorted_and_limited(tmp_path):
    folder = tmp_path / "specs"
    folder.mkdir()
    for name, label in [("b.vnnlib", 2), ("a.vnnlib", 5), ("c.vnnlib", 1)]:
        lb, ub = _clipped_box(CLEAN * (label / 10.0), 0.01 * label)
        (folder / name).write_text(_spec(lb, ub, _untargeted(label)))
    (folder / "notes.txt").write_text("ignored")
    d = load_data(folder, (1, 4, 4))
    assert d.names == ["a.vnnlib", "b.vnnlib", "c.vnnlib"]
    assert d.y.tolist() == [5, 2, 1]
    np.testing.assert_allclose(d.eps.numpy(), [0.05, 0.02, 0.01], rtol=1e-9)
    np.testing.assert_allclose(d.x[1].numpy(), (CLEAN * 0.2).astype(np.float32), atol=1e-7)
    s = d.subset([2, 0])
    assert s.targets[0] == [0, 2, 3, 4, 5, 6, 7, 8, 9] and s.eps.tolist() == pytest.approx([0.01, 0.05])
    assert load_data(folder, (1, 4, 4), limit=2).names == ["a.vnnlib", "b.vnnlib"]


def _malformed_specs():
    lb, ub = _clipped_box(CLEAN, 0.05)
    good = _spec(lb, ub, _untargeted(3))
    only_upper = good.replace("(assert (>= X_5 ", "; (assert (>= X_5 ")
    return {
        "missing_bound": (only_upper, "lower bound for X_5"),
        "missing_output": (_spec(lb, ub, ""), "output"),
        "product_of_outputs": (_spec(lb, ub, "(assert (>= (* Y_0 Y_1) 0.5))"), "not linear"),
        "input_in_output_condition": (_spec(lb, ub, "(assert (>= Y_1 X_0))"), "input variable"),
        "input_region_disjunction": (
            _spec(lb, ub, "(assert (or (and (<= X_0 0.1) (>= Y_1 Y_0)) (and (>= Y_2 Y_0))))"),
            "several input regions",
        ),
        "self_comparison": (_spec(lb, ub, "(assert (>= Y_1 Y_1))"), "does not depend on any output"),
        "undeclared_y_linear": (_spec(lb, ub, "(assert (>= (- Y_12 Y_0) 0))"), "undeclared output Y_12"),
        "unknown_function": (_spec(lb, ub, "(assert (>= (max Y_1 Y_2) Y_0))"), "unsupported expression"),
        "unbalanced": (good + "\n(assert (<= X_1 0.3)", "unbalanced"),
        "garbage_text": (good.replace("(declare-const Y_9 Real)", "(declare-const Y_9 Real) hello world"), "syntax"),
        "bad_number": (good.replace("(assert (<= X_2 ", "(assert (<= X_2 zz", 1), "syntax"),
        "undeclared_y": (_spec(lb, ub, _untargeted(3), n_out=3), "Y_"),
        "undeclared_x": (_spec(lb, ub, _untargeted(3), n_decl=15), "X_15"),
        "empty_box": (good.replace("(assert (>= X_4 ", "(assert (>= X_4 0.9) (>= X_4 "), None),
        "wrong_size": (_spec(np.zeros(10), np.ones(10), _untargeted(3)), "(1, 4, 4)"),
        "empty": ("", "empty"),
        "comments_only": ("; nothing here\n", "empty"),
    }


@pytest.mark.parametrize("case", list(_malformed_specs()))
def test_vnnlib_malformed_raise_user_error(tmp_path, case):
    text, match = _malformed_specs()[case]
    if case == "empty_box":
        lb, ub = _clipped_box(CLEAN, 0.05)
        lb = lb.copy()
        lb.ravel()[4] = 0.99
        text, match = _spec(lb, ub, _untargeted(3)), "empty box"
    if case == "comments_only":
        match = "declares no input"
    p = tmp_path / f"bad_{case}.vnnlib"
    p.write_text(text)
    _raises(p, (1, 4, 4), match=match)


def test_vnnlib_class_count_and_binary(tmp_path):
    lb, ub = _clipped_box(CLEAN, 0.05)
    p = tmp_path / "ten_outputs.vnnlib"
    p.write_text(_spec(lb, ub, _untargeted(3)))
    _raises(p, (1, 4, 4), n_classes=12, match="12 classes")
    b = tmp_path / "binary.vnnlib"
    b.write_bytes(bytes(range(256)) * 4)
    _raises(b, (1, 4, 4))


def test_vnnlib_large_spec_is_fast(tmp_path):
    import time

    rng = np.random.default_rng(7)
    pix = rng.integers(0, 256, (3, 32, 32)) / 255.0
    lb, ub = _clipped_box(pix, 8 / 255)
    p = tmp_path / "big.vnnlib"
    p.write_text(_spec(lb, ub, _untargeted(6)))
    t = time.perf_counter()
    d = load_data(p, (3, 32, 32))
    assert time.perf_counter() - t < 3.0
    np.testing.assert_allclose(d.x[0].numpy(), pix, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# real competition specs (skipped without the third-party data folder)

MODEL_INPUT = {
    "mnist-net_256x2.onnx": (784, 1),
    "Convnet_maxpool.onnx": (1, 28, 28),
    "cifar_base_kw.onnx": (3, 32, 32),
    "resnet_2b.onnx": (3, 32, 32),
}
# normalisation applied outside the CIFAR models (data README); MNIST models take raw [0, 1] pixels
NORMALISATION = {
    "cifar_base_kw.onnx": ((0.485, 0.456, 0.406), (0.225, 0.225, 0.225)),
    "resnet_2b.onnx": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
}


def _instances(realdata: Path) -> list[dict]:
    with open(realdata / "ground_truth" / "instances.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    return rows


def _load_row(realdata: Path, row: dict) -> Dataset:
    return load_data(realdata / row["vnnlib_file"], MODEL_INPUT[Path(row["model_file"]).name], n_classes=10)


@pytest.mark.realdata
def test_real_vnnlib_label_and_eps_match_ground_truth(realdata):
    rows = _instances(realdata)
    keys = [r["vnnlib_file"] for r in rows]
    assert len(set(keys)) == len(keys)  # the competition folder disambiguates same-named specs
    on_disk = sorted(p.relative_to(realdata).as_posix() for p in (realdata / "vnnlib").rglob("*.vnnlib"))
    assert on_disk == sorted(keys)
    for row in rows:
        d = _load_row(realdata, row)
        name = row["vnnlib_file"]
        assert len(d) == 1
        assert d.y.item() == int(row["label"]), name
        csv_eps = [float(v) for v in row["eps_in_model_input_units"].split(";")]
        assert d.eps.item() == pytest.approx(max(csv_eps), rel=2e-5), name
        # per-channel radii of the exact box
        half = ((d.upper[0] - d.lower[0]) / 2).reshape(len(csv_eps), -1).amax(dim=1)
        np.testing.assert_allclose(half.numpy(), csv_eps, rtol=2e-5, err_msg=name)
        assert row["spec_kind"].startswith("untargeted")
        assert d.targets == [[j for j in range(10) if j != int(row["label"])]], name
        x = d.x[0].double()
        assert bool(((x >= d.lower[0] - 1e-7) & (x <= d.upper[0] + 1e-7)).all()), name


@pytest.mark.realdata
def test_real_vnnlib_recovered_images_lie_on_pixel_grid(realdata):
    """Clean images are 8-bit: mapped back to pixel units they must be multiples of 1/255 in [0, 1].
    A box centre (or one radius for all channels of a per-channel-std box) misses the grid."""
    for row in _instances(realdata):
        model = Path(row["model_file"]).name
        d = _load_row(realdata, row)
        x = d.x[0].double().numpy()
        if model in NORMALISATION:
            mean, std = (np.array(v)[:, None, None] for v in NORMALISATION[model])
            pix = x * std + mean
        else:
            pix = x
        scaled = pix * 255.0
        assert np.abs(scaled - np.round(scaled)).max() < 1e-3, row["vnnlib_file"]
        assert pix.min() > -1e-6 and pix.max() < 1 + 1e-6, row["vnnlib_file"]


# Competition spec -> MNIST test index. The competitions did not use test image k for prop_<k>
# (e.g. prop_0_0.03 of mnist_fc is labelled 4 while MNIST test image 0 is a 7); these are the specs
# whose image is among the first 1000 test images, found by exact match.
MNIST_TEST_INDEX = {
    "vnnlib/vnncomp2022/mnist_fc/prop_0_0.03.vnnlib": 762,
    "vnnlib/vnncomp2022/mnist_fc/prop_2_0.05.vnnlib": 49,
    "vnnlib/vnncomp2021/verivital/prop_0_0.004.vnnlib": 921,
    "vnnlib/vnncomp2021/verivital/prop_10_0.004.vnnlib": 932,
    "vnnlib/vnncomp2021/verivital/prop_11_0.004.vnnlib": 933,
    "vnnlib/vnncomp2021/verivital/prop_12_0.004.vnnlib": 934,
    "vnnlib/vnncomp2021/verivital/prop_13_0.004.vnnlib": 935,
    "vnnlib/vnncomp2021/verivital/prop_14_0.004.vnnlib": 936,
}


@pytest.mark.realdata
def test_real_mnist_specs_recover_the_test_images(realdata):
    mnist = np.load(realdata / "data" / "mnist_test_1000.npz")
    images = mnist["x"].reshape(len(mnist["x"]), -1).astype(np.float64)
    labels = mnist["y"]
    rows = {r["vnnlib_file"]: r for r in _instances(realdata)}
    assert set(MNIST_TEST_INDEX) <= set(rows)
    for key, row in rows.items():
        if Path(row["model_file"]).name not in ("mnist-net_256x2.onnx", "Convnet_maxpool.onnx"):
            continue
        flat = _load_row(realdata, row).x[0].double().numpy().ravel()
        dist = np.abs(images - flat).max(axis=1)
        k = MNIST_TEST_INDEX.get(key)
        if k is not None:
            assert dist[k] < 1e-6, (key, dist[k])
            assert labels[k] == int(row["label"]), key
        else:  # not among the bundled 1000 images: no image may be a near miss
            assert dist.min() > 0.5, (key, dist.min())
        prop = int(Path(key).name.split("_")[1])
        assert dist[prop] > 0.5 or k == prop  # prop index is not the test index


@pytest.mark.realdata
def test_real_vnnlib_folder(realdata):
    folder = realdata / "vnnlib" / "vnncomp2022" / "mnist_fc"
    d = load_data(folder, (784, 1), n_classes=10)
    assert d.names == sorted(p.name for p in folder.glob("*.vnnlib"))
    assert tuple(d.x.shape) == (len(d.names), 784, 1)
    by_name = {
        Path(r["vnnlib_file"]).name: int(r["label"])
        for r in _instances(realdata)
        if r["vnnlib_file"].startswith("vnnlib/vnncomp2022/mnist_fc/")
    }
    assert d.y.tolist() == [by_name[n] for n in d.names]
    assert math.isclose(float(d.eps.min()), 0.03, rel_tol=1e-6)
