"""Listing the files of a data folder without leaving it and without touching special files.

A data folder (of VNN-LIB specs, or of class sub-folders of images) may come from a stranger, so
every entry that lipverify would read or descend into is checked here first:

* an entry that is a symbolic link is resolved; if its target lies outside the data folder (every
  link resolved, the folder's own path included) it is refused, never followed;
* an entry that would be read must be a regular file: devices, FIFOs and sockets are refused by what
  they are (a FIFO is never opened, so it cannot hang the process);
* entries that would not be read (other names, special files without a wanted name) are counted as
  ignored, not opened.

The files are opened later with :func:`lipverify.limits.open_regular`, which checks the open
descriptor again.

Warnings
--------
Raises :class:`~lipverify.errors.UserInputError` naming the entry for: a symbolic link (to a file or
a folder) that leads outside the data folder, a broken symbolic link with a wanted name, a device,
FIFO or socket with a wanted name, and a folder that cannot be listed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

from lipverify.errors import UserInputError
from lipverify.limits import file_kind


class Entry:
    """One listed entry: ``path`` (inside the folder as given), ``kind`` (``'file'``, ``'dir'``,
    ``'broken'`` for a dangling link, ``'other'`` for devices, FIFOs and sockets), whether it was
    reached through a symbolic link, and its ``stat`` mode."""

    __slots__ = ("path", "kind", "linked", "mode")

    def __init__(self, path: Path, kind: str, linked: bool, mode: int = 0):
        self.path, self.kind, self.linked, self.mode = path, kind, linked, mode


def list_folder(folder: Path, base: Path, data_root: Path) -> list[Entry]:
    """The entries of ``folder`` sorted by name; symbolic links leading outside ``base`` (the
    resolved data folder, shown as ``data_root``) are refused (module docstring)."""
    try:
        with os.scandir(folder) as it:
            raw = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise UserInputError(f"cannot list the folder ({exc.strerror or exc})", str(folder)) from None
    out = []
    for e in raw:
        p = Path(e.path)
        try:
            if e.is_symlink():
                try:
                    target = p.resolve()
                except (OSError, RuntimeError):  # a loop of links (RuntimeError before Python 3.13)
                    out.append(Entry(p, "broken", True))
                    continue
                try:
                    target.relative_to(base)
                except ValueError:
                    raise UserInputError(f"is a symbolic link that leads outside the data folder {data_root} "
                                         f"(to {target}); only files inside it are read", str(p)) from None
                try:
                    mode = os.stat(target).st_mode
                except OSError:
                    out.append(Entry(p, "broken", True))
                    continue
                linked = True
            elif e.is_dir(follow_symlinks=False):  # the type from the listing itself: no stat call
                out.append(Entry(p, "dir", False))
                continue
            elif e.is_file(follow_symlinks=False):
                out.append(Entry(p, "file", False))
                continue
            else:
                mode = e.stat(follow_symlinks=False).st_mode
                linked = False
        except OSError as exc:
            raise UserInputError(f"cannot read the folder entry ({exc.strerror or exc})", str(p)) from None
        kind = "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"
        out.append(Entry(p, kind, linked, mode))
    return out


def check_wanted(entry: Entry, what: str) -> Path:
    """``entry.path`` if it is a regular file (or a link to one inside the folder); else exit 2."""
    if entry.kind == "file":
        return entry.path
    if entry.kind == "broken":
        raise UserInputError("is a broken symbolic link (or a loop of links)", str(entry.path))
    if entry.kind == "dir":
        raise UserInputError(f"is a directory, expected a regular {what}", str(entry.path))
    raise UserInputError(f"is {file_kind(entry.mode)}, expected a regular {what}", str(entry.path))


def walk_files(folder: Path, wanted: Callable[[str], bool], what: str) -> list[Path]:
    """Every regular file under ``folder`` (recursively, sorted by relative path) whose name passes
    ``wanted``; sub-folders reached through symbolic links inside the folder are not descended into
    (as ``Path.rglob``), those leading outside are refused (module docstring)."""
    base = folder.resolve()
    found: list[Path] = []
    stack = [folder]
    while stack:
        d = stack.pop()
        for e in list_folder(d, base, folder):
            if e.kind == "dir":
                if not e.linked:
                    stack.append(e.path)
            elif wanted(e.path.name):
                found.append(check_wanted(e, what))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


__all__ = ["Entry", "check_wanted", "list_folder", "walk_files"]
