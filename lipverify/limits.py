"""Resource limits and safe reading of the files the user hands lipverify.

Every model, checkpoint and data file may come from a stranger, so nothing is read or allocated
before it has been checked here:

* :func:`open_regular` opens a path for reading only if it is a regular file (devices such as
  ``/dev/zero``, FIFOs, sockets and directories are refused by what they are, whatever their name or
  the symbolic link that points at them).  It opens with ``O_NONBLOCK`` and checks the open
  descriptor, so a FIFO with no writer cannot hang the process and a file swapped after the check is
  still the file that was checked.
* :func:`read_capped` reads at most ``max_bytes`` (the file's own size is checked first);
  :func:`gunzip_capped` decompresses at most ``max_bytes`` (a small ``.gz`` that expands to gigabytes
  is refused after reading ``max_bytes + 1`` bytes of output, never more).
* :func:`check_alloc` compares the bytes a step is about to allocate with the memory limit and
  raises :class:`~lipverify.errors.UserInputError` naming the size, what it is for and the limit.
  The limit is ``--max-memory`` (:func:`set_memory_limit`), else the environment variable
  ``LIPVERIFY_MAX_MEMORY``, else 80% of the memory the machine has available at the time of the
  check (``MemAvailable``).

Sizes are given in bytes; :func:`parse_size` reads ``4G``, ``512M``, ``1.5GiB`` and plain numbers.

Warnings
--------
The estimates are lower bounds on what a step allocates (the arrays themselves, not the
interpreter's overhead): a step that passes the check may still need somewhat more.
"""

from __future__ import annotations

import math
import os
import re
import stat
import zlib
from pathlib import Path

from lipverify.errors import UserInputError

#: largest model file read into memory (ONNX protobufs cannot exceed 2 GiB anyway)
MAX_MODEL_BYTES = 4 << 30
#: largest text specification (VNN-LIB), compressed or not, after decompression
MAX_SPEC_BYTES = 256 << 20
#: most nodes in a model graph
MAX_NODES = 20_000
#: most classes (the margin constants K are an m x m matrix)
MAX_CLASSES = 100_000

_limit: int | None = None


def parse_size(text: str | int | float, option: str = "--max-memory") -> int:
    """Bytes from ``4G``, ``512M``, ``1.5GiB``, ``100k`` or a plain number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        val, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
        if not m:
            raise UserInputError(f"{option} must be a size such as 4G, 512M or 1.5GiB, got {text!r}")
        val, unit = float(m.group(1)), m.group(2).upper()
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    nbytes = val * scale
    if not math.isfinite(nbytes) or nbytes < 1:
        raise UserInputError(f"{option} must be a positive size, got {text!r}")
    return int(nbytes)


def available_memory() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (8 GiB where the file is missing)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


def set_memory_limit(nbytes: int | str | None) -> None:
    """Set the memory limit (``None``: back to the default)."""
    global _limit
    _limit = None if nbytes is None else parse_size(nbytes)


def memory_limit() -> int:
    """The memory limit in bytes (module docstring)."""
    if _limit is not None:
        return _limit
    env = os.environ.get("LIPVERIFY_MAX_MEMORY")
    return parse_size(env, "LIPVERIFY_MAX_MEMORY") if env else int(0.8 * available_memory())


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} bytes"


def check_alloc(nbytes: float, what: str, path: str | os.PathLike | None = None) -> None:
    """Refuse (exit 2) when ``nbytes`` for ``what`` exceed the memory limit."""
    lim = memory_limit()
    if not nbytes <= lim:  # also catches nan and inf
        raise UserInputError(f"{what} would need {fmt_bytes(nbytes)}, over the memory limit of {fmt_bytes(lim)} "
                             "(--max-memory or LIPVERIFY_MAX_MEMORY to change it)",
                             None if path is None else str(path))


def file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular(path: str | os.PathLike, what: str = "file") -> os.stat_result:
    """The ``stat`` of ``path`` (links followed) if it is a non-empty regular file; else exit 2 naming why."""
    p = str(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UserInputError("no such file", p) from None
    except OSError as exc:
        raise UserInputError(f"cannot read the {what} ({exc.strerror or exc})", p) from None
    if not stat.S_ISREG(st.st_mode):
        raise UserInputError(f"is {file_kind(st.st_mode)}, expected a regular {what}", p)
    if st.st_size == 0:
        raise UserInputError("the file is empty", p)
    return st


def open_regular(path: str | os.PathLike, what: str = "file", max_bytes: int | None = None):
    """A binary file object for ``path``, refused unless it is a non-empty regular file of at most
    ``max_bytes`` (module docstring)."""
    p = str(path)
    check_regular(p, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except OSError as exc:
        raise UserInputError(f"cannot read the {what} ({exc.strerror or exc})", p) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between the check and the open
            raise UserInputError(f"is {file_kind(st.st_mode)}, expected a regular {what}", p)
        if max_bytes is not None and st.st_size > max_bytes:
            raise UserInputError(f"the {what} is {fmt_bytes(st.st_size)}, over the limit of {fmt_bytes(max_bytes)}", p)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (a file that grows while read is cut off
    and refused)."""
    chunks, total = [], 0
    with open_regular(path, what, max_bytes) as fh:
        want = min(max_bytes, os.fstat(fh.fileno()).st_size) + 1  # read(n) allocates n bytes up front
        while total <= max_bytes:
            chunk = fh.read(min(want, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            want = 1 << 20
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) > max_bytes:
        raise UserInputError(f"the {what} is over the limit of {fmt_bytes(max_bytes)}", str(path))
    return data


def gunzip_capped(data: bytes, max_bytes: int, path: str | os.PathLike, what: str = "file") -> bytes:
    """Decompress gzip ``data`` (every member) into at most ``max_bytes``; a bomb is refused after
    ``max_bytes + 1`` bytes of output."""
    out = bytearray()
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    buf = data
    try:
        while buf:
            chunk = d.decompress(buf, max_bytes + 1 - len(out))
            out += chunk
            if len(out) > max_bytes:
                raise UserInputError(f"the {what} decompresses to more than {fmt_bytes(max_bytes)} (the limit)",
                                     str(path))
            if d.unconsumed_tail:
                buf = d.unconsumed_tail
                continue
            if d.eof:
                buf = d.unused_data.lstrip(b"\x00")
                if buf:
                    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                continue
            buf = b""
        if not d.eof:
            raise UserInputError(f"the {what} is a truncated gzip stream", str(path))
    except zlib.error as exc:
        raise UserInputError(f"the {what} is not valid gzip ({exc})", str(path)) from None
    return bytes(out)


def resolve_inside(folder: str | os.PathLike, relative: str, what: str, source: str | os.PathLike) -> Path:
    """``folder / relative`` if it names a regular file inside ``folder`` with every symbolic link
    resolved; else exit 2 naming ``source`` and the reason (absolute paths, ``..``, links that leave
    the folder, missing or non-regular files)."""
    src = str(source)
    rel = Path(relative)
    if not relative or rel.is_absolute() or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative):
        raise UserInputError(f"{what} {relative!r} is an absolute path; only files inside the model's folder "
                             "are read", src)
    if any(part == ".." for part in re.split(r"[\\/]", relative)):
        raise UserInputError(f"{what} {relative!r} leaves the model's folder ('..'); only files inside it are read",
                             src)
    base = Path(folder).resolve()
    target = (base / rel).resolve()
    try:
        target.relative_to(base)
    except ValueError:
        raise UserInputError(f"{what} {relative!r} leads outside the model's folder through a symbolic link; "
                             "only files inside it are read", src) from None
    try:
        st = os.stat(target)
    except OSError:
        raise UserInputError(f"{what} {relative!r} does not exist beside the model", src) from None
    if not stat.S_ISREG(st.st_mode):
        raise UserInputError(f"{what} {relative!r} is {file_kind(st.st_mode)}, not a regular file", src)
    return target


__all__ = ["MAX_CLASSES", "MAX_MODEL_BYTES", "MAX_NODES", "MAX_SPEC_BYTES", "available_memory", "check_alloc",
           "check_regular", "fmt_bytes", "gunzip_capped", "memory_limit", "open_regular", "parse_size",
           "read_capped", "resolve_inside", "set_memory_limit"]

