"""Progress bars on stderr (rich), silent when stderr is not a terminal or when asked to be quiet.

Library functions take a ``progress(k)`` callback; the commands and the fine-tuning job hand them the
``advance`` function of :func:`progress_bar`.
"""

from __future__ import annotations


def progress_bar(total: int, label: str, quiet: bool):
    """A rich progress bar on stderr; silent when stderr is not a terminal or with --quiet."""
    import contextlib

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        @contextlib.contextmanager
        def dummy():
            yield lambda k=1: None
        return dummy()

    @contextlib.contextmanager
    def bar():
        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as prog:
            task = prog.add_task(label, total=total)
            yield lambda k=1: prog.advance(task, k)
    return bar()
