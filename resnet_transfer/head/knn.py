"""A k-nearest-neighbour classifier on the cached features, shown beside the softmax head.

scikit-learn's ``KNeighborsClassifier`` with the cosine distance on mean-centred features (brute force:
exact, and fast at the sizes a cache holds), neighbours weighted by inverse distance. ``k`` is chosen on the validation rows when there are
some, else by leave-one-out cross-validation on the training rows (distances computed once). A cheap, robust baseline
that needs no training, and a sanity check: where the head and the kNN disagree, one of them is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..base import UsageError

DEFAULT_KS = (1, 3, 5, 7, 10, 15, 20, 30)
# brute-force distances are (train rows x query rows x dim) multiply-adds: above this the kNN is skipped
MAX_WORK = 5e10
LOO_MAX_ROWS = 4000  # leave-one-out k choice on at most this many rows (its distance matrix is rows^2)


@dataclass
class KnnChoice:
    """The chosen ``k``, the accuracy of every ``k`` tried, and how they were measured."""

    k: int
    scores: dict[int, float] = field(default_factory=dict)
    how: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "scores": {str(k): v for k, v in self.scores.items()}, "chosen_by": self.how}


def make_knn(k: int) -> Any:
    """An unfitted cosine kNN classifier with ``k`` neighbours, on features centred on the training mean
    (raw ReLU features are all positive, so their cosines crowd near 1)."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if k < 1:
        raise UsageError(f"k={k}: a kNN needs at least one neighbour")
    knn = KNeighborsClassifier(n_neighbors=int(k), metric="cosine", weights="distance", algorithm="brute")
    return make_pipeline(StandardScaler(with_std=False), knn)


def _usable(ks: Sequence[int], n_train: int) -> list[int]:
    usable = sorted({int(k) for k in ks if 1 <= int(k) <= n_train})
    return usable or [max(1, min(n_train, 1))]


def _cosine_distances(A: np.ndarray, B: np.ndarray, mean: np.ndarray) -> np.ndarray:
    from sklearn.metrics.pairwise import cosine_distances

    return cosine_distances(A - mean, B - mean)


def _scores_on(
    D_query: np.ndarray, D_train: np.ndarray, y: np.ndarray, y_query: np.ndarray, ks: list[int]
) -> dict[int, float]:
    """Accuracy of each ``k`` from precomputed distances (one distance matrix for every ``k`` tried)."""
    from sklearn.metrics import accuracy_score
    from sklearn.neighbors import KNeighborsClassifier

    scores = {}
    for k in ks:
        knn = KNeighborsClassifier(n_neighbors=k, metric="precomputed", weights="distance").fit(D_train, y)
        scores[k] = float(accuracy_score(y_query, knn.predict(D_query)))
    return scores


def choose_k(
    X: np.ndarray,
    y: np.ndarray,
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> KnnChoice:
    """Choose ``k`` (best accuracy, ties to the smaller ``k``): on ``X_val`` when given, else by leave-one-out
    cross-validation on ``X`` (every row classified by the others; the distances are computed once and
    scikit-learn's classifier runs on them, ``metric="precomputed"``; at most ``LOO_MAX_ROWS`` rows).
    Features are centred on the training mean, as :func:`make_knn` does."""
    from sklearn.metrics import accuracy_score

    y = np.asarray(y)
    if X_val is not None and y_val is not None and len(y_val):
        cands = _usable(ks, len(y))
        scores = {k: float(accuracy_score(y_val, make_knn(k).fit(X, y).predict(X_val))) for k in cands}
        how = f"accuracy on {len(y_val)} validation rows"
    else:
        if len(y) < 3 or len(np.unique(y)) < 2:
            return KnnChoice(_usable(ks, len(y))[0], {}, "not chosen: too few rows to cross-validate")
        rows = np.arange(len(y))
        if len(y) > LOO_MAX_ROWS:  # the distance matrix is rows^2: choose on a seeded sample
            rows = np.sort(np.random.default_rng(0).choice(len(y), LOO_MAX_ROWS, replace=False))
        Xs, ys = np.asarray(X)[rows], y[rows]
        D = _cosine_distances(Xs, Xs, Xs.mean(0, keepdims=True))
        loo = D.copy()
        np.fill_diagonal(loo, 1e6)  # a row is never its own neighbour (cosine distances are <= 2)
        cands = _usable(ks, len(ys) - 1)
        scores = _scores_on(loo, D, ys, ys, cands)
        how = f"leave-one-out cross-validation on {len(ys)} training rows"
    best = max(cands, key=lambda k: (scores[k], -k))
    return KnnChoice(best, scores, how)


def fit_knn(X: np.ndarray, y: np.ndarray, k: int) -> Any:
    """A cosine kNN fitted on ``X``/``y`` (``k`` capped at the number of rows)."""
    return make_knn(min(int(k), len(y))).fit(X, y)


def knn_report(
    X: np.ndarray,
    y: np.ndarray,
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    head_pred: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
) -> dict[str, Any]:
    """Choose ``k``, then the kNN's accuracy on the validation rows and, given the head's predictions on
    them, how often the two agree. What `rt fit-head` reports beside the head."""
    choice = choose_k(X, y, X_val, y_val, ks)
    out: dict[str, Any] = {**choice.to_dict(), "metric": "cosine", "n_train": len(y)}
    if X_val is not None and y_val is not None and len(y_val):
        pred = fit_knn(X, y, choice.k).predict(X_val)
        out.update(_compare(np.asarray(y_val), pred, head_pred))
    return out


def _compare(y: np.ndarray, knn_pred: np.ndarray, head_pred: np.ndarray | None) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score

    out: dict[str, Any] = {"accuracy": float(accuracy_score(y, knn_pred)), "n": len(y)}
    if head_pred is not None:
        head_pred = np.asarray(head_pred)
        agree = head_pred == knn_pred
        out["agreement_with_head"] = float(agree.mean()) if len(y) else None
        out["disagreements"] = int((~agree).sum())
        if (~agree).any():
            out["head_right_where_they_disagree"] = int((head_pred[~agree] == y[~agree]).sum())
            out["knn_right_where_they_disagree"] = int((knn_pred[~agree] == y[~agree]).sum())
    return out


def _recorded_k(model_dir: Path) -> int | None:
    try:
        rep = json.loads((model_dir / "report.json").read_text())
        return int(rep["knn"]["k"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def knn_beside_head(
    md: Any,
    X_test: np.ndarray,
    y_test: np.ndarray,
    head_pred: np.ndarray,
    train_cache: str | Path | None = None,
) -> dict[str, Any]:
    """The kNN of `rt evaluate`: fitted on the labelled rows of ``train_cache`` (default: the cache the head
    was fitted on, as its meta.json records), ``k`` as the fit-head report chose it (else chosen by
    cross-validation here), scored on ``X_test`` beside the head. A missing training cache gives
    ``{"skipped": why}``, not an error."""
    from ..cache import FeatureCache

    recorded = (md.meta.get("fit") or {}).get("cache")
    path = Path(train_cache) if train_cache is not None else (Path(recorded) if recorded else None)
    if path is None or not path.exists():
        return {"skipped": f"no training cache to fit the kNN on ({path or 'none recorded'}); pass --knn-cache"}
    with FeatureCache(path) as fc:
        fc.check_identity(md.identity, f"the head in {md.path}")
        rows, y = fc.labelled_as(md.classes, f"--knn-cache {path}", "use the cache the head was fitted on")
        X = fc.features(rows)
    big = _too_big(len(y), len(y_test) * (1 if train_cache is None else len(DEFAULT_KS)), X.shape[1])
    if big:
        return {"skipped": big}
    k = _recorded_k(Path(md.path)) if train_cache is None else None
    choice = KnnChoice(k, {}, "recorded by rt fit-head") if k else choose_k(X, y)
    pred = fit_knn(X, y, choice.k).predict(X_test)
    return {
        **choice.to_dict(),
        "metric": "cosine",
        "train_cache": str(path),
        "n_train": len(y),
        **_compare(np.asarray(y_test), pred, head_pred),
    }


def _too_big(n_train: int, n_query: int, dim: int) -> str | None:
    work = float(n_train) * n_query * dim
    if work > MAX_WORK:
        return f"{n_train} x {n_query} rows x {dim} features is too much brute-force work for a side-by-side kNN"
    return None


def knn_beside_fit(
    cache: Any,
    train_rows: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray | None,
    y_val: np.ndarray | None,
    head: Any,
    streamed: bool,
) -> dict[str, Any]:
    """The kNN of `rt fit-head`: ``k`` chosen on its validation rows, accuracy and agreement with ``head``
    there; skipped (with the reason) when the head was streamed, there are no validation rows, or the
    brute-force work would be large. Reports one line."""
    from ..base import get_reporter

    if streamed:
        return {"skipped": "the training rows were streamed (too large for memory)"}
    if X_val is None or y_val is None or not len(y_val):
        return {"skipped": "no validation rows to choose k on"}
    big = _too_big(len(train_rows), len(y_val) * len(DEFAULT_KS), cache.dim)
    if big:
        return {"skipped": big}
    head_pred = head.logits(X_val).argmax(1)  # (n, k) logits; decision_function is (n,) for 2 classes
    stage = getattr(getattr(head, "module_", None), "features", None)  # the head's own input (a chosen stage)
    out = knn_report(cache.features(train_rows, stage=stage), y_train, X_val, y_val, head_pred)
    get_reporter().info(
        f"kNN beside the head (cosine, k={out['k']} chosen on validation): accuracy {out['accuracy']:.4f}, "
        f"agrees with the head on {out['agreement_with_head']:.1%} of {out['n']} validation rows"
    )
    return out
