"""Calibrated confidence: log-loss, expected calibration error, reliability diagrams, `--min-confidence`.

Everything works on probabilities (or logits) that are already computed: a cache plus a head gives them
without a forward pass. Log-loss is scikit-learn's; scikit-learn has no expected calibration error, so
:func:`expected_calibration_error` is the one binned sum written here (top-label ECE, equal-width bins, as
Guo et al. 2017): ``sum_b (n_b / n) |accuracy_b - confidence_b|``.

The temperature ``T`` a head records (``meta.json`` head config ``"temperature"``, default 1.0; fitted by
`rt fit-head`) divides the logits before the softmax; "before / after" below means ``T = 1`` and the
recorded ``T``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..base import UsageError

UNCERTAIN = "uncertain"
DEFAULT_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64, numerically stable)."""
    if not temperature > 0:
        raise UsageError(f"temperature {temperature} must be positive", "use the head's recorded temperature")
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    """Logits (up to a per-row constant, which a softmax ignores) of probabilities ``probs``."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None))


def head_temperature(head_config: dict[str, Any]) -> float:
    """The temperature a head directory's ``head`` config records (1.0 when it records none)."""
    t = head_config.get("temperature")
    return 1.0 if t is None else float(t)


def _bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each confidence in ``n_bins`` equal-width bins over [0, 1] (1.0 in the last bin)."""
    return np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)


def reliability(y_true: Any, probs: np.ndarray, n_bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """Per-bin count, mean confidence and accuracy of the top-label predictions (empty bins: count 0)."""
    if n_bins < 1:
        raise UsageError(f"n_bins {n_bins} must be at least 1")
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    b = _bins(conf, n_bins)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / count
        acc = np.bincount(b, weights=correct, minlength=n_bins) / count
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.tolist(),
        "confidence": [None if c == 0 else float(v) for c, v in zip(count, mean_conf)],
        "accuracy": [None if c == 0 else float(v) for c, v in zip(count, acc)],
    }


def expected_calibration_error(y_true: Any, probs: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE: the count-weighted mean gap between confidence and accuracy over the bins."""
    r = reliability(y_true, probs, n_bins)
    n = max(1, sum(r["count"]))
    return float(sum(c * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"]) if c) / n)


def log_loss(y_true: Any, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels (scikit-learn's ``log_loss``, every class listed)."""
    from sklearn.metrics import log_loss as sk_log_loss

    p = np.asarray(probs, dtype=np.float64)
    return float(sk_log_loss(np.asarray(y_true), p, labels=list(range(p.shape[1]))))


def calibration_report(
    y_true: Any, logits: np.ndarray, temperature: float = 1.0, n_bins: int = DEFAULT_BINS
) -> dict[str, Any]:
    """Log-loss and ECE with ``T = 1`` ("before") and with ``temperature`` ("after"), plus both reliability
    tables. ``logits``: untempered logits (or log-probabilities of the untempered softmax)."""
    before = softmax(logits, 1.0)
    after = softmax(logits, temperature)
    return {
        "temperature": float(temperature),
        "bins": n_bins,
        "log_loss": {"before": log_loss(y_true, before), "after": log_loss(y_true, after)},
        "ece": {
            "before": expected_calibration_error(y_true, before, n_bins),
            "after": expected_calibration_error(y_true, after, n_bins),
        },
        "reliability": {"before": reliability(y_true, before, n_bins), "after": reliability(y_true, after, n_bins)},
    }


def plot_reliability(report: dict[str, Any], path: str | Path, title: str = "reliability") -> Path:
    """Write a reliability diagram PNG (accuracy per confidence bin, before and after temperature, with the
    diagonal and the ECE in the legend). Matplotlib is imported here only."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    try:
        edges = np.asarray(report["reliability"]["before"]["edges"])
        centres = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfectly calibrated")
        t = report["temperature"]
        # after (wide, light) under before (narrow, dark), so both stay visible
        styles = (("after", f"T={t:.3g}", "tab:blue", 0.9, 0.35), ("before", "T=1", "tab:red", 0.4, 0.8))
        for key, name, colour, w, alpha in styles:
            if key == "after" and t == 1.0:
                continue
            r = report["reliability"][key]
            acc = np.asarray([np.nan if a is None else a for a in r["accuracy"]])
            ax.bar(
                centres,
                acc,
                width=width * w,
                color=colour,
                alpha=alpha,
                edgecolor=colour,
                label=f"{name}: ECE {report['ece'][key]:.3f}, log-loss {report['log_loss'][key]:.3f}",
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(title, fontsize=10)
        ax.legend(loc="upper left", fontsize=7)
        from ..base import save_png

        return save_png(fig, path)
    finally:
        plt.close(fig)


def mark_uncertain(rows: list[dict[str, Any]], min_confidence: float | None) -> int:
    """Rows of `rt predict` whose top probability is below ``min_confidence`` get ``prediction`` =
    ``"uncertain"`` (the best guess stays in ``top`` and ``guess``) and ``uncertain: True``; the others
    ``uncertain: False``. Returns how many were marked. ``None`` marks nothing."""
    if min_confidence is None:
        return 0
    if not 0.0 <= min_confidence <= 1.0:
        raise UsageError(f"--min-confidence {min_confidence} must be between 0 and 1", "e.g. --min-confidence 0.6")
    marked = 0
    for r in rows:
        low = float(r["probability"]) < min_confidence
        r["uncertain"] = low
        if low:
            r["guess"] = r["prediction"]
            r["prediction"] = UNCERTAIN
            marked += 1
    return marked
