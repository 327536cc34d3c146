"""Metrics and plots of a classifier's results: accuracy, per-class precision/recall/F1 and the confusion
matrix (scikit-learn), the confusion-matrix PNG and the finetune training curves (matplotlib, Agg).

scikit-learn and matplotlib are imported inside the functions, so only commands that compute metrics or
write a plot load them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


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


def plot_training_curves(
    history: Sequence[dict[str, Any]], path: Path, title: str = "finetune", best_epoch: int | None = None
) -> Path:
    """Loss and accuracy per epoch (train and validation), with a dashed line where stages were unfrozen
    (labelled with their names) and a marker on the best epoch. Saved as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] + 1 for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    try:
        for ax, key in zip(axes, ("loss", "acc")):
            ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label=f"train {key}")
            val = [(e, r[f"val_{key}"]) for e, r in zip(epochs, history) if r[f"val_{key}"] is not None]
            if val:
                ax.plot([e for e, _ in val], [v for _, v in val], "s-", label=f"val {key}")
            for r in history:
                if r["unfrozen"]:
                    x = r["epoch"] + 0.5  # the stage trains from this epoch's first step
                    ax.axvline(x, color="grey", linestyle="--", linewidth=1)
                    ax.text(
                        x,
                        0.98,
                        " +" + ",".join(r["unfrozen"]),
                        transform=ax.get_xaxis_transform(),
                        va="top",
                        fontsize=8,
                        color="dimgrey",
                        rotation=90,
                    )
            if best_epoch is not None and 0 <= best_epoch < len(history):
                ax.axvline(best_epoch + 1, color="tab:green", alpha=0.4, linewidth=3, label="best (kept)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_ylabel("accuracy" if key == "acc" else "cross-entropy")
            if key == "acc":
                ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=8, framealpha=0.6)
        fig.suptitle(title + " (dashed: stage unfrozen)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def ood_metrics(in_scores: Any, out_scores: Any) -> dict[str, float]:
    """How well a score (higher = farther from the training data) separates images of the known classes
    (``in_scores``) from images of none of them (``out_scores``): the area under the ROC curve (the chance that
    an unknown image scores above a known one; 0.5 = no better than a coin) and the false positive rate at 95%
    true positive rate (the share of unknown images still accepted by the threshold that accepts 95% of the
    known ones; lower is better)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    s_in = np.asarray(in_scores, dtype=np.float64)
    s_out = np.asarray(out_scores, dtype=np.float64)
    if not len(s_in) or not len(s_out):
        raise ValueError("ood_metrics needs scores of both known and unknown images")
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    threshold = np.quantile(s_in, 0.95, method="higher")
    return {
        "auroc": float(roc_auc_score(y, np.r_[s_in, s_out])),
        "fpr_at_95_tpr": float((s_out <= threshold).mean()),
        "n_in": len(s_in),
        "n_out": len(s_out),
    }
