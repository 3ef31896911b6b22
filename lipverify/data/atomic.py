"""Output files are written atomically (temporary file in the same folder, then rename), and never over
a file the user gave us as input."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lipverify.errors import UserInputError


def check_not_input(out: str | os.PathLike, *inputs) -> None:
    """Refuse to write ``out`` if it is one of the user's input files."""
    o = Path(out).resolve()
    for i in inputs:
        if i is None:
            continue
        try:
            if Path(i).exists() and Path(i).resolve() == o:
                raise UserInputError(f"refusing to overwrite an input file with an output ({out})", str(out))
        except OSError:
            continue


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=str(p.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600: give outputs the usual permissions
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
