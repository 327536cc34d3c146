"""What `rt evaluate` adds from the cache tools: calibration (log-loss and ECE at ``T = 1`` and at the head's
temperature, a reliability diagram), the kNN beside the head, and the grid of the most confidently wrong
images (``--worst N``). One call, :func:`evaluation_extras`, so `predict.evaluate` stays a thin caller."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..base import UsageError


def evaluation_extras(
    md: Any,
    y: np.ndarray,
    logits: np.ndarray,
    *,
    features: np.ndarray | None = None,
    paths: Sequence[Path | None] | None = None,
    missing: str = "",
    out: str | Path | None = None,
    worst: int = 0,
    knn: bool = True,
    knn_cache: str | Path | None = None,
    knn_search: str = "auto",
    title: str = "",
) -> dict[str, Any]:
    """``{"calibration": ..., "knn": ..., "worst": ...}`` for the report of `rt evaluate`.

    ``logits``: the head's untempered logits (or log-probabilities of its untempered softmax) for the rows
    with true labels ``y``; ``features``: their cached features (the kNN needs them; without them it is
    skipped); ``paths``: their image files (for ``worst``; ``missing``: what to say when none of them is
    found, e.g. :meth:`sheets.ImageRoot.missing`). With ``out``, writes ``reliability.png`` and
    (``worst > 0``) ``worst.png`` there."""
    from ..head import calibration_report, head_temperature, plot_reliability, softmax

    if worst < 0:
        raise UsageError(f"--worst {worst} must be 0 or more")
    if worst and out is None:
        raise UsageError("--worst writes a picture: give the folder for it with --out", "e.g. --worst 16 --out eval/")
    temperature = head_temperature(md.head_config)
    cal = calibration_report(y, logits, temperature)
    extras: dict[str, Any] = {"calibration": cal}
    od = Path(out) if out is not None else None
    if od is not None:
        od.mkdir(parents=True, exist_ok=True)
        cal["plot"] = str(plot_reliability(cal, od / "reliability.png", title=f"reliability: {title}"))
    pred = np.asarray(logits).argmax(1)
    if not knn:
        extras["knn"] = {"skipped": "--no-knn"}
    elif features is None:
        extras["knn"] = {"skipped": "the kNN compares cached features: evaluate with --cache to see it"}
    else:
        from ..head import knn_beside_head

        extras["knn"] = knn_beside_head(md, features, y, pred, knn_cache, knn_search)
    if worst and od is not None:
        from ..images import plot_top_losses

        files = list(paths) if paths is not None else [None] * len(y)
        if not any(f is not None and f.exists() for f in files):
            from ..base import get_reporter
            from ..images import ROOT_HINT

            get_reporter().warn(f"--worst: {missing or 'the images were not found'}: {ROOT_HINT}")
        probs = softmax(logits, temperature)
        rows = plot_top_losses(
            files, y, probs, md.classes, worst, od / "worst.png", title=f"most confidently wrong: {title}"
        )
        extras["worst"] = {"plot": str(od / "worst.png"), "rows": rows}
    return extras


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The lines `rt evaluate` prints for the extras in ``report``."""
    lines = []
    cal = report.get("calibration")
    if cal:
        t = cal["temperature"]
        ll, ece = cal["log_loss"], cal["ece"]
        if t == 1.0:
            lines.append(
                f"log-loss: {ll['before']:.4f}   ECE ({cal['bins']} bins): {ece['before']:.4f}   "
                "(temperature 1: the head records no other)"
            )
        else:
            lines.append(f"log-loss: {ll['before']:.4f} at T=1, {ll['after']:.4f} at T={t:.3g}")
            lines.append(f"ECE ({cal['bins']} bins): {ece['before']:.4f} at T=1, {ece['after']:.4f} at T={t:.3g}")
        if cal.get("plot"):
            lines.append(f"reliability diagram: {cal['plot']}")
    knn = report.get("knn")
    if knn and "skipped" not in knn:
        agree = knn.get("agreement_with_head")
        lines.append(
            f"kNN (cosine, k={knn['k']}, {knn['chosen_by']}; {_search_text(knn.get('search'))}): accuracy "
            f"{knn['accuracy']:.4f}" + (f"; agrees with the head on {agree:.1%}" if agree is not None else "")
        )
    elif knn:
        lines.append(f"kNN: skipped ({knn['skipped']})")
    worst = report.get("worst")
    if worst:
        lines.append(f"{len(worst['rows'])} most confidently wrong images: {worst['plot']}")
    return lines


def _search_text(info: dict[str, Any] | None) -> str:
    """ "exact search", or "index search, recall@k R" (the neighbour search a kNN's figures came from)."""
    if not info:
        return "exact search"
    if info.get("path") == "index":
        return f"index search, recall@{info['k']} {info['recall_at_k']:.3f}"
    return f"{info.get('path', 'exact')} search"
