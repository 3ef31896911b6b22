"""Hostile data files: VNN-LIB specs, ``.npz`` archives and image folders built to exhaust memory,
time or the stack, or to make lipverify read what it should not.

Every CLI probe runs in ONE subprocess under an address-space cap (tests/hostile.py): a probe that
allocates past the cap fails there with exit 1, never on the machine running the tests. Each refusal
asserts exit 2, exactly one stderr line naming the file and the reason, and that it finished within
seconds. Legitimate inputs (a ``.vnnlib.gz``, an ``.npz`` read with ``--limit``, deeply nested but
meaningful specs) must still load, and give what numpy or a hand computation gives.

On lipverify before these checks every probe below fails: the huge declarations and the ``.npz``
bomb allocate gigabytes (MemoryError, or "corrupted array" with the allocator's message), the nested
specs raise RecursionError (exit 1), 10^6 output asserts take far past the time bound (quadratic),
devices and FIFOs are read as "the file is empty" or read forever (``/dev/zero``) or hang (a FIFO
``.vnnlib``), special files and symbolic links in data folders are skipped or followed, and the
image bomb prints Pillow's warning and decodes it.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from hostile import run_probes
from lipverify.data import load_data
from lipverify.errors import UserInputError
from lipverify.limits import set_memory_limit

MEM = {"LIPVERIFY_MAX_MEMORY": "2G"}
N_BOMB = 1_100_000  # rows of the .npz bomb: 1.1e6 x 1 x 28 x 28 float32 = 3.45 GB, in a 3.4 MB file
DEEP = 200_000  # nesting levels in the CLI probes (the 200,000 nested '(+')

# ----------------------------------------------------------------------------------------------------
# builders (cheap: nothing here allocates more than a few MB)


def _decls(n_x: int = 784, n_y: int = 10) -> str:
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(n_x)) + "".join(
        f"(declare-const Y_{j} Real)\n" for j in range(n_y))


def _box(n_x: int = 784, lo: float = 0.1, hi: float = 0.2) -> str:
    return "".join(f"(assert (>= X_{i} {lo}))\n(assert (<= X_{i} {hi}))\n" for i in range(n_x))


def _spec(output: str, n_x: int = 784, n_y: int = 10) -> str:
    return _decls(n_x, n_y) + _box(n_x) + output + "\n"


UNTARGETED_0 = "(assert (or " + " ".join(f"(and (>= Y_{j} Y_0))" for j in range(1, 10)) + "))"


def _nested_plus(n: int) -> str:
    """``(+ 0.5 (+ 0.5 ... Y_1))`` n levels deep: Y_1 + n/2."""
    return "(+ 0.5 " * n + "Y_1" + ")" * n


def _nested_minus(n: int) -> str:
    """``(- (- ... Y_1))`` n levels deep: (-1)^n Y_1."""
    return "(- " * n + "Y_1" + ")" * n


def _nested_or(n: int) -> str:
    """n nested ``(or ...)``: the first nine hold ``Y_j >= Y_0`` (j = 1..9), the innermost repeats j = 1."""
    heads = "".join(f"(or (>= Y_{i + 1} Y_0) " if i < 9 else "(or " for i in range(n))
    return heads + "(>= Y_1 Y_0)" + ")" * n


def _nested_and(n: int) -> tuple[str, list[int]]:
    """n nested ``(and (>= Y_3 Y_j) ...)`` with j cycling over the classes other than 3."""
    js = [j for j in (k % 10 for k in range(2 * n)) if j != 3][:n]
    return "".join(f"(and (>= Y_3 Y_{j}) " for j in js[:-1]) + f"(>= Y_3 Y_{js[-1]})" + ")" * (n - 1), js


def _npy_header(shape, descr="<f4", fortran=False) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": descr, "fortran_order": fortran, "shape": tuple(shape)})
    return b.getvalue()


def _write_zip(path: Path, members: list[tuple[str, bytes, int, int, int]]) -> None:
    """A zip archive from precompressed members ``(name, deflated data, crc32, compressed size, size)``."""
    out, central = bytearray(), bytearray()
    for name, data, crc, csize, size in members:
        off = len(out)
        nb = name.encode()
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, csize, size, len(nb), 0) + nb + data
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, csize, size, len(nb), 0, 0, 0,
                               0, 0, off) + nb
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))


def _deflated(data: bytes):
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    z = c.compress(data) + c.flush()
    return z, zlib.crc32(data), len(z), len(data)


def _zero_bomb_member(name: str, header: bytes, zeros: int):
    """A deflated member ``header + zeros`` built from one compressed 1 MiB block of zeros, repeated
    (after a full flush the compressor's output for the same input is the same bytes)."""
    mib = 1 << 20
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)]
    block = c.compress(bytes(mib)) + c.flush(zlib.Z_FULL_FLUSH)
    k, rest = divmod(zeros, mib)
    parts += [block] * k
    parts.append(c.compress(bytes(rest)) + c.flush())
    crc = zlib.crc32(header)
    z = bytes(mib)
    for _ in range(k):
        crc = zlib.crc32(z, crc)
    crc = zlib.crc32(bytes(rest), crc)
    data = b"".join(parts)
    return name, data, crc, len(data), len(header) + zeros


def _gzip_bomb(path: Path, size: int) -> None:
    """A valid .gz of ``size`` bytes of spaces after a declaration, from a repeated compressed block."""
    mib = 1 << 20
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = b"(declare-const X_0 Real)\n"
    parts = [c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)]
    block = c.compress(b" " * mib) + c.flush(zlib.Z_FULL_FLUSH)
    k, rest = divmod(size, mib)
    parts += [block] * k
    parts.append(c.compress(b" " * rest) + c.flush())
    crc = zlib.crc32(head)
    for _ in range(k):
        crc = zlib.crc32(b" " * mib, crc)
    crc = zlib.crc32(b" " * rest, crc)
    isize = (len(head) + size) & 0xFFFFFFFF
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"".join(parts) + struct.pack("<2L", crc, isize))


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares ``width x height`` 8-bit grayscale pixels, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">L", len(data)) + kind + data + struct.pack(">L", zlib.crc32(kind + data))

    ihdr = struct.pack(">2L5B", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1000)))
                     + chunk(b"IEND", b""))


def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


# ----------------------------------------------------------------------------------------------------
# the probes: built once, run in one capped subprocess


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_data")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "o.vnnlib").write_text(_spec(UNTARGETED_0))
    _png(outside / "o.png", np.zeros((28, 28)))
    cases: dict[str, dict] = {}

    def certify(name, data, *extra, env=None, cmd="certify"):
        cases[name] = {"args": [cmd, "--data", str(data), "--quiet", *extra], "env": env or {}}

    # B1: declarations sized for gigabytes
    (d / "huge_y.vnnlib").write_text(_spec(UNTARGETED_0).replace("(declare-const Y_9 Real)",
                                                                 "(declare-const Y_999999999 Real)"))
    certify("huge_y", d / "huge_y.vnnlib", "--norm", "inf", env=MEM)
    (d / "huge_x.vnnlib").write_text(_spec(UNTARGETED_0).replace("(declare-const X_783 Real)",
                                                                 "(declare-const X_999999999 Real)"))
    certify("huge_x", d / "huge_x.vnnlib", "--norm", "inf", env=MEM)
    (d / "long_index.vnnlib").write_text(_spec(UNTARGETED_0).replace("(declare-const Y_9 Real)",
                                                                     "(declare-const Y_" + "9" * 5000 + " Real)"))
    certify("long_index", d / "long_index.vnnlib", "--norm", "inf")
    (d / "long_number.vnnlib").write_text(_spec(UNTARGETED_0).replace("(assert (<= X_5 0.2))",
                                                                      "(assert (<= X_5 " + "1" * 100_000 + "x))"))
    certify("long_number", d / "long_number.vnnlib", "--norm", "inf")

    # B1: an .npz of 3.4 MB holding 3.45 GB of zeros, and an .npy header that lies about its size
    bomb = d / "bomb.npz"
    _write_zip(bomb, [_zero_bomb_member("x.npy", _npy_header((N_BOMB, 1, 28, 28)), N_BOMB * 784 * 4),
                      ("y.npy", *_deflated(_npy_header((N_BOMB,), "|u1") + bytes(N_BOMB)))])
    certify("npz_bomb", bomb, "--eps", "0.1", env=MEM)
    certify("npz_bomb_limit", bomb, "--eps", "0.1", "--limit", "5", env=MEM)
    liar = d / "liar.npz"
    with zipfile.ZipFile(liar, "w") as z:
        z.writestr("x.npy", _npy_header((10**9, 784)) + bytes(64))
        z.writestr("y.npy", _npy_header((10**9,), "<i8") + bytes(64))
    certify("npz_liar", liar, "--eps", "0.1", env=MEM)

    # B2: nesting past any stack, in every command that reads specs
    plus = d / "deep_plus.vnnlib"
    plus.write_text(_spec("(assert (>= " + "(+ 0 " * DEEP + "Y_1" + ")" * DEEP + " Y_0))"))
    for cmd in ("certify", "attack"):
        certify(f"deep_plus_{cmd}", plus, "--norm", "inf", cmd=cmd)
    certify("deep_plus_audit", plus, "--norm", "inf", "--out", str(d / "audit"), cmd="audit")
    (d / "deep_or.vnnlib").write_text(_spec(f"(assert {_nested_or(DEEP)})"))
    certify("deep_or", d / "deep_or.vnnlib", "--norm", "inf")
    many_or = "(assert " + "(or (>= Y_1 Y_0) " * 20_000 + "(>= Y_2 Y_0)" + ")" * 20_000 + ")"
    (d / "many_or.vnnlib").write_text(_spec(many_or))
    certify("too_many_disjuncts", d / "many_or.vnnlib", "--norm", "inf")

    # B8: special files as data
    os.mkfifo(d / "fifo.npz")
    certify("fifo_npz", d / "fifo.npz", "--eps", "0.1")
    certify("dev_zero", "/dev/zero", "--eps", "0.1")
    certify("dev_stdin", "/dev/stdin", "--eps", "0.1")  # the probe runner's stdin is a pipe

    # B9: specs behind links to devices, a .gz bomb, a FIFO spec with no writer
    for dev in ("zero", "urandom"):
        (d / f"to_{dev}.vnnlib").symlink_to(f"/dev/{dev}")
        certify(f"link_{dev}", d / f"to_{dev}.vnnlib", "--norm", "inf")
    _gzip_bomb(d / "bomb.vnnlib.gz", 300 << 20)
    certify("gz_bomb", d / "bomb.vnnlib.gz", "--norm", "inf", env=MEM)
    os.mkfifo(d / "fifo.vnnlib")
    certify("fifo_vnnlib", d / "fifo.vnnlib", "--norm", "inf")

    # B9: folders of specs
    for name, make in (("specs_fifo", lambda f: os.mkfifo(f / "b.vnnlib")),
                       ("specs_link_file", lambda f: (f / "b.vnnlib").symlink_to(outside / "o.vnnlib")),
                       ("specs_link_dir", lambda f: (f / "sub").symlink_to(outside, target_is_directory=True))):
        f = d / name
        f.mkdir()
        (f / "a.vnnlib").write_text(_spec(UNTARGETED_0))
        make(f)
        certify(name, f, "--norm", "inf")

    # image folders: special files, links out, a decompression bomb
    for name, make in (("img_fifo", lambda f: os.mkfifo(f / "3" / "b.png")),
                       ("img_link_file", lambda f: (f / "3" / "b.png").symlink_to(outside / "o.png")),
                       ("img_link_dir", lambda f: (f / "4").symlink_to(outside, target_is_directory=True)),
                       ("img_bomb", lambda f: _png_claiming(f / "3" / "b.png", 10_000, 10_000))):
        f = d / name
        _png(f / "3" / "a.png", np.full((28, 28), 200))
        make(f)
        certify(name, f, "--eps", "0.1")

    t = time.perf_counter()
    names = list(cases)
    out = run_probes([cases[n] for n in names], timeout=300)
    return dict(zip(names, out)), d, time.perf_counter() - t


def _refused(probes, name, *words, within=20.0):
    outcome = probes[0][name]
    line = outcome.refused(*words, within=within)
    return outcome, line


# B1 ------------------------------------------------------------------------------------------------


def test_vnnlib_huge_output_declaration_refused_before_allocating(probes):
    _refused(probes, "huge_y", "huge_y.vnnlib", "declares Y_999999999 (at least 1000000000 outputs)",
             "the model has 10 classes")


def test_vnnlib_huge_input_declaration_refused_before_allocating(probes):
    _refused(probes, "huge_x", "huge_x.vnnlib", "declares X_999999999 (at least 1000000000 inputs)",
             "shape (1, 28, 28) (784 values)")


def test_vnnlib_index_of_thousands_of_digits_refused(probes):
    _refused(probes, "long_index", "long_index.vnnlib", "index of 5000 digits")


def test_vnnlib_long_number_parsed_in_linear_time(probes):
    # the old bound pattern backtracked quadratically on a long digit run (20,000 digits: 12 s)
    _refused(probes, "long_number", "long_number.vnnlib", "syntax error", within=10)


def test_npz_bomb_refused_from_its_headers(probes):
    _refused(probes, "npz_bomb", "bomb.npz", "1100000 examples", "(1100000, 1, 28, 28) float32",
                       "3.22 GiB", "over the memory limit of 2 GiB", "--limit")


def test_npz_bomb_with_limit_reads_only_those_rows(probes):
    o = probes[0]["npz_bomb_limit"]
    assert o.rc == 0, o.stderr[-800:]
    assert o.seconds < 20
    assert "inputs 5" in o.stdout


def test_npz_input_shape_from_the_header_only(probes):
    # for callers that need the shape before loading (training): the bomb's header, nothing more
    from lipverify.data.npz import npz_input_shape

    t = time.perf_counter()
    assert npz_input_shape(probes[1] / "bomb.npz") == (1, 28, 28)
    assert time.perf_counter() - t < 2


def test_npz_header_that_disagrees_with_the_member_is_corrupted(probes):
    _refused(probes, "npz_liar", "liar.npz", "corrupted array 'x'", "header says (1000000000, 784) float32",
             "2.85 TiB", "64 bytes")


# B2 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["certify", "attack", "audit"])
def test_deeply_nested_spec_runs_in_every_command(probes, cmd):
    o = probes[0][f"deep_plus_{cmd}"]
    assert o.rc == 0, o.stderr[-800:]
    assert "Traceback" not in o.stderr and "RecursionError" not in o.stdout + o.stderr
    assert o.seconds < 30


def test_deeply_nested_or_runs(probes):
    o = probes[0]["deep_or"]
    assert o.rc == 0, o.stderr[-800:]
    assert o.seconds < 20


def test_too_many_disjuncts_refused_with_the_reason(probes):
    _refused(probes, "too_many_disjuncts", "many_or.vnnlib", "more than 10000 disjuncts")


# B8 ------------------------------------------------------------------------------------------------


def test_fifo_as_data_refused_by_type(probes):
    _refused(probes, "fifo_npz", "fifo.npz", "is a FIFO", "regular data file")


def test_dev_zero_as_data_refused_by_type(probes):
    _refused(probes, "dev_zero", "/dev/zero", "character device", "regular data file")


def test_dev_stdin_pipe_as_data_refused_by_type(probes):
    _refused(probes, "dev_stdin", "/dev/stdin", "is a FIFO")


# B9 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dev", ["zero", "urandom"])
def test_spec_linked_to_a_device_refused(probes, dev):
    _refused(probes, f"link_{dev}", f"to_{dev}.vnnlib", "character device")


def test_gzip_bomb_spec_refused_at_the_cap(probes):
    _refused(probes, "gz_bomb", "bomb.vnnlib.gz", "decompresses to more than 256 MiB")


def test_fifo_spec_without_writer_does_not_hang(probes):
    _refused(probes, "fifo_vnnlib", "fifo.vnnlib", "is a FIFO", within=10)


def test_fifo_in_a_folder_of_specs_refused_by_name(probes):
    _refused(probes, "specs_fifo", "specs_fifo/b.vnnlib", "is a FIFO", "VNN-LIB file")


@pytest.mark.parametrize("name, culprit", [("specs_link_file", "specs_link_file/b.vnnlib"),
                                           ("specs_link_dir", "specs_link_dir/sub")])
def test_links_out_of_a_folder_of_specs_refused(probes, name, culprit):
    _refused(probes, name, culprit, "symbolic link", "outside the data folder")


# image folders ------------------------------------------------------------------------------------


def test_fifo_image_refused_by_name(probes):
    _refused(probes, "img_fifo", "img_fifo/3/b.png", "is a FIFO", "image file")


@pytest.mark.parametrize("name, culprit", [("img_link_file", "img_link_file/3/b.png"),
                                           ("img_link_dir", "img_link_dir/4")])
def test_links_out_of_an_image_folder_refused(probes, name, culprit):
    _refused(probes, name, culprit, "symbolic link", "outside the data folder")


def test_image_decompression_bomb_refused_without_warning(probes):
    _refused(probes, "img_bomb", "img_bomb/3/b.png", "decompression-bomb limit")


def test_image_folder_memory_checked_before_decoding(tmp_path):
    for k in range(3):
        _png(tmp_path / "imgs" / "0" / f"{k}.png", np.zeros((28, 28)))
    set_memory_limit("8K")
    try:
        with pytest.raises(UserInputError, match=r"decoding 3 image\(s\) of 784 values each would need 15.3 KiB"):
            load_data(tmp_path / "imgs", (1, 28, 28))
    finally:
        set_memory_limit(None)
    assert len(load_data(tmp_path / "imgs", (1, 28, 28))) == 3


# ----------------------------------------------------------------------------------------------------
# legitimate inputs still load, and mean what they say


def test_vnnlib_gz_loads_like_the_plain_file(tmp_path):
    text = _spec(UNTARGETED_0, n_x=16)
    (tmp_path / "s.vnnlib").write_text(text)
    (tmp_path / "s.vnnlib.gz").write_bytes(gzip.compress(text.encode()))
    a = load_data(tmp_path / "s.vnnlib", (1, 4, 4), n_classes=10)
    b = load_data(tmp_path / "s.vnnlib.gz", (1, 4, 4), n_classes=10)
    assert b.y.tolist() == [0] and b.targets == [list(range(1, 10))]
    np.testing.assert_array_equal(a.lower.numpy(), b.lower.numpy())
    np.testing.assert_array_equal(a.upper.numpy(), b.upper.numpy())
    np.testing.assert_allclose(b.lower.numpy().ravel(), 0.1)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_limit_gives_numpy_rows(tmp_path, order, compressed):
    rng = np.random.default_rng(0)
    x = np.asarray(rng.random((7, 3, 2, 2)).astype(">f8"), order=order)
    y = np.eye(5, dtype=np.uint8)[[4, 0, 3, 1, 2, 2, 0]]
    p = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(p, x=x, y=y)
    with np.load(p) as ref:
        rx, ry = ref["x"], ref["y"]
    for limit in (1, 4, 7, 50):
        ds = load_data(p, (3, 2, 2), limit=limit)
        np.testing.assert_array_equal(ds.x.numpy(), rx[:limit].astype(np.float32))
        assert ds.y.tolist() == np.argmax(ry[:limit], axis=1).tolist()


def test_npz_limit_never_decompresses_the_rest(tmp_path):
    # 5,000 rows of which only the first 3 are read: the member is cut after them (a full read fails)
    x = np.arange(5000 * 4, dtype=np.float32).reshape(5000, 4)
    raw = _npy_header(x.shape) + x.tobytes()
    y = _npy_header((5000,), "<i8") + bytes(8 * 5000)
    p = tmp_path / "cut.npz"
    z, crc, csize, size = _deflated(raw)
    _write_zip(p, [("x.npy", z[: len(z) // 4], crc, len(z) // 4, size), ("y.npy", *_deflated(y))])
    np.testing.assert_array_equal(load_data(p, (4,), limit=3).x.numpy(), x[:3])
    with pytest.raises(UserInputError, match="corrupted array 'x'"):
        load_data(p, (4,))


def _load_output(tmp_path, output: str, name: str):
    p = tmp_path / name
    p.write_text(_spec(output, n_x=4))
    t = time.perf_counter()
    ds = load_data(p, (4,), n_classes=10)
    return ds.properties[0], time.perf_counter() - t


N_NEST = 100_000


def test_nested_plus_100k_levels(tmp_path):
    prop, secs = _load_output(tmp_path, f"(assert (>= {_nested_plus(N_NEST)} Y_0))", "plus.vnnlib")
    # Y_1 + 50000 >= Y_0  <=>  Y_1 - Y_0 >= -50000
    expect = np.zeros((1, 10))
    expect[0, 1], expect[0, 0] = 1.0, -1.0
    np.testing.assert_array_equal(prop.C, expect)
    assert prop.d.tolist() == [-N_NEST / 2] and prop.disjuncts == [[0]]
    assert secs < 10


def test_nested_minus_100k_levels(tmp_path):
    prop, secs = _load_output(tmp_path, f"(assert (>= {_nested_minus(N_NEST + 1)} Y_0))", "minus.vnnlib")
    # an odd count: -Y_1 >= Y_0  <=>  -Y_1 - Y_0 >= 0
    expect = np.zeros((1, 10))
    expect[0, 1], expect[0, 0] = -1.0, -1.0
    np.testing.assert_array_equal(prop.C, expect)
    assert prop.d.tolist() == [0.0] and prop.label is None
    assert secs < 10


def test_nested_or_100k_levels(tmp_path):
    prop, secs = _load_output(tmp_path, f"(assert {_nested_or(N_NEST)})", "or.vnnlib")
    assert prop.kind == "untargeted" and prop.label == 0 and prop.targets == list(range(1, 10))
    assert len(prop.disjuncts) == 10 and len(prop.d) == 9
    assert secs < 10


def test_nested_and_100k_levels(tmp_path):
    text, js = _nested_and(N_NEST)
    prop, secs = _load_output(tmp_path, f"(assert {text})", "and.vnnlib")
    # one disjunct: Y_3 >= Y_j for every j != 3 ("the network does not pick 3")
    assert prop.kind == "targeted conjunction" and len(prop.disjuncts) == 1
    rows = {(int(np.flatnonzero(c == 1)[0]), int(np.flatnonzero(c == -1)[0])) for c in prop.C}
    assert rows == {(3, j) for j in range(10) if j != 3} and set(js) == {j for j in range(10) if j != 3}
    assert prop.disjuncts == [list(range(9))] and not prop.d.any()
    assert secs < 10


def test_product_over_nested_and_or(tmp_path):
    # (a or b) and (c or d) and e, nested: four disjuncts of three constraints each
    text = "(assert (and (or (>= Y_1 Y_0) (>= Y_2 Y_0)) (and (or (>= Y_3 0.5) (<= Y_4 -1)) (>= (* 2 Y_5) 1))))"
    prop, _ = _load_output(tmp_path, text, "prod.vnnlib")
    got = sorted(sorted((tuple(prop.C[k]), float(prop.d[k])) for k in D) for D in prop.disjuncts)

    def row(coefs, d):
        c = np.zeros(10)
        for j, v in coefs.items():
            c[j] = v
        return tuple(c), d

    a, b = row({1: 1, 0: -1}, 0.0), row({2: 1, 0: -1}, 0.0)
    c, dd, e = row({3: 1}, 0.5), row({4: -1}, 1.0), row({5: 2}, 1.0)
    assert got == sorted(sorted(t) for t in ([a, c, e], [a, dd, e], [b, c, e], [b, dd, e]))


def test_million_input_bound_asserts(tmp_path):
    # 10^6 bounds on 784 inputs (the tightest wins); a regression guard (this path was already linear)
    n = 1_000_000
    k = np.arange(n)
    vals = 0.5 + (k % 997) * 1e-4
    lines = [f"(assert (<= X_{i} {v!r}))\n" for i, v in zip((k % 784).tolist(), vals.tolist())]
    p = tmp_path / "bounds.vnnlib"
    p.write_text(_decls() + _box(lo=0.1, hi=0.9) + "".join(lines) + "(assert (>= Y_1 Y_0))\n")
    t = time.perf_counter()
    ds = load_data(p, (1, 28, 28), n_classes=10)
    secs = time.perf_counter() - t
    expect = np.full(784, np.inf)
    np.minimum.at(expect, k % 784, vals)
    np.testing.assert_array_equal(ds.upper.numpy().ravel(), np.minimum(expect, 0.9))
    assert ds.targets == [[1]]
    print(f"10^6 input-bound asserts: {secs:.2f} s")
    assert secs < 45


def test_million_output_asserts_parse_in_linear_time(tmp_path):
    # 10^6 output asserts, each a conjunct (Y_j >= c): quadratic before (40k: 16 s, 10^6: past 300 s)
    n = 1_000_000
    lines = [f"(assert (>= Y_{1 + i % 9} {i}.25))\n" for i in range(n)]
    p = tmp_path / "outputs.vnnlib"
    p.write_text(_decls() + _box() + "".join(lines))
    t = time.perf_counter()
    prop = load_data(p, (1, 28, 28), n_classes=10).properties[0]
    secs = time.perf_counter() - t
    assert prop.C.shape == (n, 10) and len(prop.disjuncts) == 1 and len(prop.disjuncts[0]) == n
    for i in (0, 1, 12345, n - 1):
        assert prop.C[i, 1 + i % 9] == 1.0 and prop.C[i].sum() == 1.0 and prop.d[i] == i + 0.25
    print(f"10^6 output asserts: {secs:.2f} s")
    assert secs < 45
