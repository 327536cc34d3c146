"""The one place that talks to the user: messages, warnings, progress, tables and the skipped-files summary.

Library code calls :func:`get_reporter` and never prints. The CLI installs a console reporter; Python callers
get a quiet one by default (``set_reporter(Reporter(verbose=True))`` to see progress).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

DEFAULT_PROGRESS_INTERVAL = 10.0  # seconds between progress lines when the output is not a terminal


class Progress:
    """A handle returned by :meth:`Reporter.progress`; call ``advance(n)`` as work completes.

    On a terminal it drives a rich bar; in a log (a file, a pipe) it writes one plain line about every
    ``interval`` seconds: ``extract: 120/1000 img (12%), 31.2 img/s, ETA 28s``."""

    def __init__(
        self,
        bar: Any = None,
        task: Any = None,
        unit: str = "it",
        *,
        description: str = "",
        total: int | None = None,
        write: Any = None,
        interval: float = DEFAULT_PROGRESS_INTERVAL,
    ) -> None:
        self._bar, self._task, self.unit = bar, task, unit
        self.description, self.total = description, total
        self._write, self.interval = write, interval
        self.done = 0
        self.start = time.perf_counter()
        self._last_line = self.start

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=f"{self.rate:.1f} {self.unit}/s", **fields)
        elif self._write is not None:
            now = time.perf_counter()
            if now - self._last_line >= self.interval:
                self._last_line = now
                self._write(self.line())

    def set_description(self, text: str) -> None:
        self.description = text
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The progress line written to logs: done/total, rate and ETA."""
        u = self.unit
        if self.total:
            pct = 100.0 * self.done / self.total
            left = max(0, self.total - self.done)
            eta = format_seconds(left / self.rate) if self.rate > 0 else "?"
            return f"{self.description}: {self.done}/{self.total} {u} ({pct:.0f}%), {self.rate:.1f} {u}/s, ETA {eta}"
        return f"{self.description}: {self.done} {u}, {self.rate:.1f} {u}/s"


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h01m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Reporter:
    """Messages, warnings, progress and tables. ``verbose=False`` keeps everything silent except warnings
    collected in ``self.warnings`` (tests and library users read them there).

    On a terminal, rich does the drawing (bars, boxed tables whose cells fold, never cut). Anywhere else
    (a file, a pipe, a log) every message is one plain line, never wrapped or truncated, and progress is a
    line about every ``progress_interval`` seconds (0: at every step)."""

    def __init__(
        self, verbose: bool = False, stream: Any = None, progress_interval: float = DEFAULT_PROGRESS_INTERVAL
    ) -> None:
        self.verbose = verbose
        self.progress_interval = progress_interval
        self.warnings: list[str] = []
        self.messages: list[str] = []
        self._stream = (stream or sys.stderr) if verbose else None
        self._console = None
        if verbose and _isatty(self._stream):
            from rich.console import Console

            self._console = Console(file=self._stream, highlight=False)

    def _line(self, text: str, style: str | None = None) -> None:
        if self._console is not None:
            self._console.print(text, style=style, markup=False)
        elif self._stream is not None:
            self._stream.write(text + "\n")
            self._stream.flush()

    def info(self, message: str) -> None:
        self.messages.append(message)
        self._line(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self._line(f"warning: {message}", style="yellow")

    def skipped(self, skipped: list[tuple[str, str]], what: str = "file(s) skipped", limit: int = 20) -> None:
        """The one "N files skipped" summary: a warning with the count, then up to ``limit`` paths with
        their reasons (0: the count alone). Extract, predict, evaluate and sharded runs report skips this way."""
        if not skipped:
            return
        self.warn(f"{len(skipped)} {what}" + (":" if limit > 0 else ""))
        for p, reason in skipped[:limit]:
            self.warn(f"  {p}: {reason}")

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A small table (kept in ``messages`` by its title)."""
        self.messages.append(title)
        if self._stream is not None:
            print_table(columns, rows, title=title, stream=self._stream)

    @contextmanager
    def progress(self, description: str, total: int | None, unit: str = "img") -> Iterator[Progress]:
        """A progress bar with rate (``unit``/s) and ETA on a terminal; periodic lines elsewhere; a no-op
        handle when quiet."""
        if self._stream is None:
            yield Progress(unit=unit, description=description, total=total)
            return
        if self._console is None and not _force_progress():
            handle = Progress(
                unit=unit, description=description, total=total, write=self._line, interval=self.progress_interval
            )
            yield handle
            if handle.done:
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
        console = self._console
        if console is None:  # RT_PROGRESS=1 in a log: rich bars anyway
            from rich.console import Console

            console = Console(file=self._stream, highlight=False, force_terminal=True)
        with RichProgress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(description, total=total, rate="")
            yield Progress(bar, task, unit, description=description, total=total)


def _force_progress() -> bool:
    import os

    return os.environ.get("RT_PROGRESS", "") == "1"


def print_table(columns: list[str], rows: list[list[Any]], title: str | None = None, stream: Any = None) -> None:
    """Print a table on ``stream`` (default stdout), never cutting a cell: on a terminal rich's boxed table
    (long cells fold onto more lines); anywhere else plain text, one line per row, columns aligned."""
    stream = stream or sys.stdout
    cells = [[str(x) for x in r] for r in rows]
    if _isatty(stream):
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, title_justify="left")
        for c in columns:
            t.add_column(c, overflow="fold")
        for r in cells:
            t.add_row(*r)
        Console(file=stream, highlight=False).print(t)
        return
    stream.write(format_table(columns, cells, title) + "\n")
    stream.flush()


def format_table(columns: list[str], rows: list[list[str]], title: str | None = None) -> str:
    """Plain-text table: a title line, a header and one line per row, columns padded to their widest cell
    (two spaces between them, none after the last). Cells are never cut."""
    widths = [max([len(c), *(len(r[i]) for r in rows if i < len(r))]) for i, c in enumerate(columns)]
    lines = [title] if title else []
    for r in [columns, *rows]:
        lines.append("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


_REPORTER = Reporter(verbose=False)


def get_reporter() -> Reporter:
    """The reporter library code should use."""
    return _REPORTER


def set_reporter(reporter: Reporter) -> Reporter:
    """Install ``reporter`` globally; returns the previous one."""
    global _REPORTER
    previous, _REPORTER = _REPORTER, reporter
    return previous


def __getattr__(name: str) -> Any:
    """The metrics and plots moved to :mod:`resnet_transfer.metrics`; still importable from here."""
    if name in ("classification_metrics", "metrics_rows", "plot_confusion"):
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
