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


# ---------------------------------------------------------------------------------------------- metrics


def classification_metrics(y_true: Any, y_pred: Any, classes: list[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, macro averages and the confusion matrix (rows:
    true class, columns: predicted), as plain JSON-able data. Labels are indices into ``classes``."""
    import numpy as np
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    yt = np.asarray(y_true, dtype=np.int64)
    yp = np.asarray(y_pred, dtype=np.int64)
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(yt, yp, labels=labels, zero_division=0)
    cm = confusion_matrix(yt, yp, labels=labels)
    present = s > 0
    return {
        "accuracy": float((yt == yp).mean()) if len(yt) else None,
        "n": len(yt),
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        },
        "macro_f1": float(f[present].mean()) if present.any() else None,
        "balanced_accuracy": float(r[present].mean()) if present.any() else None,
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }


def metrics_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The per-class part of :func:`classification_metrics` as table columns and rows."""
    cols = ["class", "precision", "recall", "f1", "support"]
    rows = [
        [c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"]]
        for c, m in metrics["per_class"].items()
    ]
    return cols, rows


def plot_confusion(cm: Any, classes: list[str], path: Any, title: str = "confusion matrix") -> Any:
    """Save a labelled confusion-matrix PNG (counts in cells, row-normalised colour) and return its path."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros(m.shape, dtype=float), where=rows > 0)
    side = min(max(4.0, 0.45 * k + 2.5), 24.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    try:
        im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
        ticks = np.arange(k)
        names = [c if len(c) <= 18 else c[:17] + "…" for c in classes]
        ax.set_xticks(ticks, names, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
        ax.set_yticks(ticks, names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        acc = np.trace(m) / max(m.sum(), 1)
        ax.set_title(f"{title}\naccuracy {acc:.3f} on {m.sum()} images")
        if k <= 40:
            for i in range(k):
                for j in range(k):
                    if m[i, j]:
                        colour = "white" if norm[i, j] > 0.5 else "black"
                        ax.text(
                            j, i, str(m[i, j]), ha="center", va="center", color=colour, fontsize=8 if k > 15 else 10
                        )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out
