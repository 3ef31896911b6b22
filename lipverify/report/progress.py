"""Progress on stderr: a rich bar with an ETA on a terminal, plain timed lines when stderr is a file or
a pipe (so ``lipverify audit ... 2>&1 | tee log`` still shows that work goes on), nothing with
``--quiet``.

Library functions take a ``progress(k)`` callback; the commands and the fine-tuning job hand them the
``advance`` function of :func:`progress_bar`.  ``audit`` runs several stages, one bar each
(:class:`Stages`).

Warnings
--------
An ETA is an extrapolation of the rate so far: stages whose later units cost more than the first ones
(a bisection that narrows, attacks that stop early on broken inputs) finish earlier or later than it
says.
"""

from __future__ import annotations

import contextlib
import sys
import time

#: seconds between two plain progress lines when stderr is not a terminal
PLAIN_EVERY_S = 10.0


def _duration(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


class _PlainBar:
    """``label: k/N (p%), elapsed ..., ETA ...`` lines on a non-terminal stream, at most every
    :data:`PLAIN_EVERY_S` seconds, and one when the stage ends if it took that long."""

    def __init__(self, total: int, label: str, stream, every: float | None = None, limit_s: float | None = None):
        self.total, self.label, self.stream = max(int(total), 0), label, stream
        self.every = PLAIN_EVERY_S if every is None else every
        self.limit_s = limit_s
        self.done = 0
        self.t0 = self.last = time.monotonic()
        self.printed = False

    def line(self) -> str:
        el = time.monotonic() - self.t0
        msg = f"{self.label}: {self.done}/{self.total}"
        if self.total:
            msg += f" ({100 * self.done / self.total:.0f}%)"
        msg += f", elapsed {_duration(el)}"
        if 0 < self.done < self.total:
            eta = el * (self.total - self.done) / self.done
            if self.limit_s is not None:  # the stage stops at its time limit
                eta = min(eta, max(self.limit_s - el, 0.0))
            msg += f", ETA {_duration(eta)}"
        return msg

    def advance(self, k: int = 1) -> None:
        self.done = min(self.total, self.done + int(k)) if self.total else self.done + int(k)
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.printed = True
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if time.monotonic() - self.t0 >= self.every or self.printed:
            print(self.line() + " - done", file=self.stream, flush=True)


def progress_bar(total: int, label: str, quiet: bool, limit_s: float | None = None):
    """A context manager yielding ``advance(k=1)``: a rich bar with an ETA on stderr when it is a
    terminal, timed plain lines when it is not, nothing with ``quiet``.  ``limit_s``: the stage stops
    after this many seconds (a time budget): the label says so and the plain ETA never exceeds it."""
    if limit_s is not None:
        label = f"{label} (at most {_duration(limit_s)})"
    from rich.console import Console

    console = Console(stderr=True)

    @contextlib.contextmanager
    def dummy():
        yield lambda k=1: None

    if quiet:
        return dummy()
    if not console.is_terminal:
        @contextlib.contextmanager
        def plain():
            bar = _PlainBar(total, label, sys.stderr, limit_s=limit_s)
            try:
                yield bar.advance
            finally:
                bar.close()
        return plain()

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    @contextlib.contextmanager
    def bar():
        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True) as prog:
            task = prog.add_task(label, total=total)
            yield lambda k=1: prog.advance(task, k)
    return bar()


class Stages:
    """The progress of a multi-stage job (``audit``): ``with stages.stage("attack", total) as advance``
    shows one bar per stage, labelled ``[i/n] name``; :meth:`say` prints a one-line message.

    ``stage(label, total, step=None, limit_s=None)``: ``step`` (one of ``names``) numbers the bar by
    its place in ``names`` (several bars may belong to one step); else bars are numbered in order."""

    def __init__(self, names, quiet: bool = False, prefix: str = "audit"):
        self.names = list(names)
        self.quiet = quiet
        self.prefix = prefix
        self.i = 0

    def stage(self, name: str, total: int, step: str | None = None, limit_s: float | None = None):
        self.i = self.names.index(step) + 1 if step in self.names else self.i + 1
        label = f"{self.prefix} [{self.i}/{len(self.names)}] {name}"
        return progress_bar(max(int(total), 1), label, self.quiet, limit_s=limit_s)

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"{self.prefix}: {msg}", file=sys.stderr, flush=True)
