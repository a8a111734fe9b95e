"""Everything the CLI shows a person: stderr only (stdout carries data).

A rich progress bar with ETA when stderr is a terminal; otherwise a plain line every few seconds,
so logs of scripted runs stay readable.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err = Console(stderr=True, highlight=False)

PLAIN_EVERY_S = 5.0


def info(message: str) -> None:
    err.print(message, markup=False, soft_wrap=True)


def error_line(message: str) -> None:
    """One line, 'imgcluster: error: ...', on stderr."""
    print(f"imgcluster: error: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"imgcluster: warning: {message}", file=sys.stderr, flush=True)


class Reporter:
    """Progress for one task (scan, cache, train, assign); a context manager.

    update(done, total, text) may be called as often as wanted: the plain mode rate-limits itself.
    """

    def __init__(self, label: str, quiet: bool = False):
        self.label, self.quiet = label, quiet
        self.rich = not quiet and err.is_terminal
        self._last_plain = 0.0
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.rich:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[text]}"),
                console=err, transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=None, text="")
        return self

    def update(self, done: int, total: int, text: str = "", start: int = 0) -> None:
        if self.quiet:
            return
        if self.rich:
            self._progress.update(self._task, completed=done, total=total, text=text)
            return
        now = time.monotonic()
        if now - self._last_plain >= PLAIN_EVERY_S or done >= total:
            self._last_plain = now
            pct = 100.0 * done / max(total, 1)
            print(f"{self.label}: {done}/{total} ({pct:.0f}%) {text}".rstrip(), file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False
