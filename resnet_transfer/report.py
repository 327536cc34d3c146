"""The one place that talks to the user: messages, warnings and progress bars.

Library code calls :func:`get_reporter` and never prints. The CLI installs a console reporter; Python callers
get a quiet one by default (``set_reporter(Reporter(verbose=True))`` to see progress).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Progress:
    """A handle returned by :meth:`Reporter.progress`; call ``advance(n)`` as work completes."""

    def __init__(self, bar: Any = None, task: Any = None, unit: str = "it") -> None:
        self._bar, self._task, self.unit = bar, task, unit
        self.done = 0
        self.start = time.perf_counter()

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, **fields)

    def set_description(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0


class Reporter:
    """Messages and progress. ``verbose=False`` keeps everything silent except warnings collected in
    ``self.warnings`` (tests and library users read them there)."""

    def __init__(self, verbose: bool = False, stream: Any = None) -> None:
        self.verbose = verbose
        self.warnings: list[str] = []
        self.messages: list[str] = []
        self._console = None
        if verbose:
            from rich.console import Console

            self._console = Console(file=stream or sys.stderr, highlight=False)

    def info(self, message: str) -> None:
        self.messages.append(message)
        if self._console is not None:
            self._console.print(message, markup=False)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        if self._console is not None:
            self._console.print(f"warning: {message}", style="yellow", markup=False)

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A small table; plain text when quiet (kept in ``messages``)."""
        self.messages.append(title)
        if self._console is None:
            return
        from rich.table import Table

        t = Table(title=title, title_justify="left")
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*[str(x) for x in r])
        self._console.print(t)

    @contextmanager
    def progress(self, description: str, total: int | None, unit: str = "img") -> Iterator[Progress]:
        """A progress bar with rate (``unit``/s) and ETA; a no-op handle when quiet."""
        if self._console is None or (not self._console.is_terminal and not _force_progress()):
            handle = Progress(unit=unit)
            yield handle
            if self._console is not None and handle.done:
                secs = time.perf_counter() - handle.start
                self.info(f"{description}: {handle.done} {unit} in {secs:.1f}s ({handle.rate:.1f} {unit}/s)")
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        ]
        with RichProgress(*columns, console=self._console, transient=False) as bar:
            task = bar.add_task(description, total=total, rate="")
            handle = Progress(bar, task, unit)
            orig = handle.advance

            def advance(n: int = 1, **fields: Any) -> None:
                orig(n, rate=f"{handle.rate:.1f} {unit}/s", **fields)

            handle.advance = advance  # type: ignore[method-assign]
            yield handle


def _force_progress() -> bool:
    import os

    return os.environ.get("RT_PROGRESS", "") == "1"


_REPORTER = Reporter(verbose=False)


def get_reporter() -> Reporter:
    """The reporter library code should use."""
    return _REPORTER


def set_reporter(reporter: Reporter) -> Reporter:
    """Install ``reporter`` globally; returns the previous one."""
    global _REPORTER
    previous, _REPORTER = _REPORTER, reporter
    return previous
