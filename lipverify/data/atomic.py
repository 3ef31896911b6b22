"""Output files are written atomically (temporary file in the same folder, then rename), never over a
file the user gave us as input, and their locations are checked before any work (:func:`check_output`).
Sets of outputs that belong together (a report and its models) are staged in a temporary folder and
published together (:func:`staged_outputs`), so an interruption leaves all of them or none."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
import threading
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
    tmp = None
    try:
        with signals_deferred():  # the temporary file is owned (and removed on failure) from its creation
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=str(p.parent))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600: give outputs the usual permissions
        os.replace(tmp, p)
    except BaseException:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


#: bytes the temporary names of :func:`atomic_write_bytes` add to a file name ("." + name + ".XXXXXXXX.tmp")
_TMP_EXTRA = 16


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(str(folder), "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _existing_ancestor(p: Path) -> Path:
    q = p
    while not q.exists() and q != q.parent:
        q = q.parent
    return q


def _check_writable(folder: Path, shown: str) -> None:
    """Refuse unless a file can be created in the existing folder ``folder`` (tried, then removed)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".lipverify-probe.", dir=str(folder))
    except OSError as exc:
        raise UserInputError(f"cannot write in {folder} ({exc.strerror or exc})", shown) from None
    os.close(fd)
    os.unlink(tmp)


def check_output(out: str | os.PathLike, *inputs, folder: bool = False, option: str = "--out") -> Path:
    """Check an output location before any work (exit 2 naming the problem), and return it.

    ``folder``: ``out`` is a folder that will be created if missing (else a file).  Refused: a name
    component longer than the file system allows (with room for the temporary name), an existing
    path of the wrong kind (a file where a folder is wanted, a folder, device, FIFO or socket where a
    file is wanted: writing it by rename would replace a device node), a path through a file
    (``model.onnx/x.csv``), a folder in which no file can be created (read-only, ``/proc``), and one
    of the user's ``inputs`` (or, for a folder, an input that is the folder itself).

    Warnings
    --------
    The check runs before the work; a folder that becomes read-only in between still fails at the end.
    """
    shown = str(out)
    if not shown or "\x00" in shown:
        raise UserInputError(f"{option} must be a path, got {shown!r}")
    p = Path(out)
    limit = _name_max(_existing_ancestor(p.parent if not folder else p))
    for part in p.parts:
        if len(os.fsencode(part)) + (0 if folder and part == p.name else _TMP_EXTRA) > limit:
            raise UserInputError(f"a name in the {option} path is longer than the file system allows ({limit} bytes)",
                                 shown[:80] + ("..." if len(shown) > 80 else ""))
    try:
        st = os.stat(p)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        st = None
    except OSError as exc:
        raise UserInputError(f"cannot use as {option} ({exc.strerror or exc})", shown) from None
    if st is not None:
        if folder and not stat.S_ISDIR(st.st_mode):
            raise UserInputError(f"{option} must be a folder, but this is {_kind(st.st_mode)}", shown)
        if not folder and not stat.S_ISREG(st.st_mode):
            raise UserInputError(f"{option} must be a file name, but this is {_kind(st.st_mode)}", shown)
    base = p if folder else p.parent
    anc = _existing_ancestor(base if str(base) else Path("."))
    if not anc.is_dir():
        raise UserInputError(f"{option} goes through {anc}, which is not a folder", shown)
    _check_writable(anc, shown)
    for i in inputs:
        if i is None:
            continue
        try:
            ip = Path(i)
            if not ip.exists():
                continue
            if ip.resolve() == p.resolve():
                raise UserInputError(f"{option} is one of the inputs; refusing to overwrite it", shown)
        except OSError:
            continue
    return p


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a file"
    from lipverify.limits import file_kind

    return file_kind(mode)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP received (``signum``): unwinds like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = int(signum)


@contextlib.contextmanager
def signal_handlers(names, handler):
    """Within the block ``handler`` handles the signals named (``"SIGINT"``, ...); the previous
    handlers come back after it.  Python runs signal handlers in the main thread only: elsewhere this
    does nothing."""
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for name in names:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                saved[sig] = signal.signal(sig, handler)
            except (ValueError, OSError):
                pass
    try:
        yield
    finally:
        for sig, h in saved.items():
            signal.signal(sig, h)


def signals_raise():
    """Within the block SIGTERM (and SIGHUP) raise :class:`Stopped`, a :class:`KeyboardInterrupt`,
    like SIGINT does, so that ``finally`` clauses remove temporary files whatever stops the process."""
    def _raise(signum, frame):
        raise Stopped(signum)

    return signal_handlers(("SIGTERM", "SIGHUP"), _raise)


@contextlib.contextmanager
def staged_outputs(folder: str | os.PathLike, last: str | None = None):
    """Stage a set of output files and publish them together.

    Yields a temporary folder inside ``folder`` (created if needed); files written there are moved
    into ``folder`` when the block ends normally, with SIGINT and SIGTERM held back during the moves
    (:func:`signals_deferred`)
    (``last``, e.g. ``report.json``, moves last), so a signal leaves either all of them or none of
    them from this run.  On any exception or signal the temporary folder and its files are removed.

    Warnings
    --------
    Each move is a rename inside one file system; files from an earlier run that this run does not
    write stay as they were.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    stage = None
    try:
        with signals_deferred():  # a signal between creating the folder and owning it would leave it behind
            stage = Path(tempfile.mkdtemp(prefix=".lipverify-staging.", dir=str(out)))
        with signals_raise():
            yield stage
            names = sorted(p.name for p in stage.iterdir())
            if last in names:
                names.remove(last)
                names.append(last)
            with signals_deferred():
                for name in names:
                    os.chmod(stage / name, 0o666 & ~_umask())
                    os.replace(stage / name, out / name)
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def signals_deferred():
    """Within the block SIGINT, SIGTERM and SIGHUP are recorded, not acted on; the first one recorded
    is raised when the block ends (:class:`KeyboardInterrupt` or :class:`Stopped`).  A Python-level
    handler rather than a signal mask: in a process with other threads (torch's, a test runner's) the
    kernel may deliver the signal to any thread that does not block it, and CPython then acts on it in
    the main thread anyway."""
    got: list[int] = []
    with signal_handlers(("SIGINT", "SIGTERM", "SIGHUP"), lambda signum, frame: got.append(signum)):
        yield
    if got:
        if got[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stopped(got[0])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
