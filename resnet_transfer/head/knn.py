"""A k-nearest-neighbour classifier on the cached features, shown beside the softmax head.

Cosine similarity of features centred on the training mean, neighbours weighted by inverse distance as
scikit-learn's ``KNeighborsClassifier(metric="cosine", weights="distance")`` does (a neighbour at distance 0
takes the vote alone). The neighbours come from :mod:`.neighbors`: exact search in blocks, or faiss's index
where exact search would be slow; the report says which (``search``) and, for the index, its measured
recall. ``k`` is chosen on the validation rows when there are some (one search for the largest ``k``, every
``k`` scored from it), else by leave-one-out on a seeded sample of at most ``LOO_QUERIES`` training rows,
each classified by its neighbours among all the other training rows. A cheap, robust baseline that needs no
training, and a sanity check: where the head and the kNN disagree, one of them is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..base import UsageError
from .neighbors import Neighbours, feature_mean, search, too_slow

DEFAULT_KS = (1, 3, 5, 7, 10, 15, 20, 30)
LOO_QUERIES = 4000  # leave-one-out k choice: this many sampled training rows, neighbours among all rows


@dataclass
class KnnChoice:
    """The chosen ``k``, the accuracy of every ``k`` tried, and how they were measured."""

    k: int
    scores: dict[int, float] = field(default_factory=dict)
    how: str = ""
    search: dict[str, Any] | None = None  # the neighbour search the scores came from

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "k": self.k,
            "scores": {str(k): v for k, v in self.scores.items()},
            "chosen_by": self.how,
        }
        if self.search is not None:
            out["choice_search"] = self.search
        return out


class CosineKnn:
    """A cosine kNN classifier (see the module docstring). ``fit`` keeps a reference to ``X`` as given (a
    float16 cache array stays float16); ``kneighbors`` / ``predict`` search it."""

    def __init__(self, k: int, search: str = "auto", seed: int = 0) -> None:
        if k < 1:
            raise UsageError(f"k={k}: a kNN needs at least one neighbour")
        self.k, self.search, self.seed = int(k), search, seed

    def fit(self, X: Any, y: Any) -> CosineKnn:
        self.X_ = X
        self.classes_, self.y_ = np.unique(np.asarray(y), return_inverse=True)
        self.mean_ = feature_mean(X)
        return self

    def kneighbors(self, X: Any, k: int | None = None) -> Neighbours:
        """The ``k`` (default: this kNN's) nearest training rows of each row of ``X``."""
        return search(self.X_, X, k or self.k, self.mean_, self.search, self.seed, what="kNN neighbours")

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[vote(self.kneighbors(X), self.y_, self.k, len(self.classes_))]


def vote(nb: Neighbours, y: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """Each query's class (an index into ``0..n_classes-1``) by the inverse-distance vote of its first ``k``
    neighbours in ``nb`` (``y``: the reference rows' class indices); ties go to the lower class index."""
    idx = nb.index[:, :k]
    d = np.clip(nb.distance[:, :k].astype(np.float64), 0.0, 2.0)
    zero = d <= 0.0
    with np.errstate(divide="ignore"):
        w = np.where(zero.any(1, keepdims=True), zero.astype(np.float64), 1.0 / d)
    w[idx < 0] = 0.0
    votes = np.zeros((len(idx), n_classes))
    rows = np.repeat(np.arange(len(idx)), idx.shape[1])
    np.add.at(votes, (rows, y[np.maximum(idx, 0)].reshape(-1)), w.reshape(-1))
    return votes.argmax(1)


def make_knn(k: int, search: str = "auto") -> CosineKnn:
    """An unfitted cosine kNN with ``k`` neighbours (features centred on the training mean)."""
    return CosineKnn(k, search)


def fit_knn(X: Any, y: np.ndarray, k: int, search: str = "auto") -> CosineKnn:
    """A cosine kNN fitted on ``X``/``y`` (``k`` capped at the number of rows)."""
    return make_knn(min(int(k), len(y)), search).fit(X, y)


def _usable(ks: Sequence[int], n_train: int) -> list[int]:
    usable = sorted({int(k) for k in ks if 1 <= int(k) <= n_train})
    return usable or [max(1, min(n_train, 1))]


def _scores(nb: Neighbours, y_ref: np.ndarray, y_query: np.ndarray, ks: list[int], n_classes: int) -> dict[int, float]:
    """Accuracy of each ``k`` from one neighbour search with the largest ``k``."""
    return {k: float((vote(nb, y_ref, k, n_classes) == y_query).mean()) for k in ks}


def choose_k(
    X: Any,
    y: np.ndarray,
    X_val: Any = None,
    y_val: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    search: str = "auto",
    seed: int = 0,
) -> KnnChoice:
    """Choose ``k`` (best accuracy, ties to the smaller ``k``): on ``X_val`` when given, else by leave-one-out
    cross-validation on a seeded sample of at most ``LOO_QUERIES`` rows of ``X``, each classified by its
    neighbours among all the other rows."""
    return _choose(X, y, X_val, y_val, ks, search, seed)[0]


def _choose(
    X: Any, y: np.ndarray, X_val: Any, y_val: Any, ks: Sequence[int], search_: str, seed: int
) -> tuple[KnnChoice, Neighbours | None, CosineKnn | None]:
    y = np.asarray(y)
    if X_val is not None and y_val is not None and len(y_val):
        cands = _usable(ks, len(y))
        knn = CosineKnn(max(cands), search_, seed).fit(X, y)
        yq = np.searchsorted(knn.classes_, np.asarray(y_val))
        yq = np.where(knn.classes_[np.minimum(yq, len(knn.classes_) - 1)] == y_val, yq, -1)  # unseen labels: wrong
        nb = knn.kneighbors(X_val)
        scores = _scores(nb, knn.y_, yq, cands, len(knn.classes_))
        how = f"accuracy on {len(y_val)} validation rows"
    else:
        if len(y) < 3 or len(np.unique(y)) < 2:
            return KnnChoice(_usable(ks, len(y))[0], {}, "not chosen: too few rows to cross-validate"), None, None
        rows = np.arange(len(y))
        if len(y) > LOO_QUERIES:
            rows = np.sort(np.random.default_rng(seed).choice(len(y), LOO_QUERIES, replace=False))
        cands = _usable(ks, len(y) - 1)
        classes, yi = np.unique(y, return_inverse=True)
        nb = search(X, _rows(X, rows), max(cands), feature_mean(X), search_, seed, "kNN k choice", exclude=rows)
        scores = _scores(nb, yi, yi[rows], cands, len(classes))
        how = f"leave-one-out cross-validation on {len(rows)} training rows (neighbours among all {len(y)})"
        knn = None
    best = max(cands, key=lambda k: (scores[k], -k))
    return KnnChoice(best, scores, how, nb.info), nb, knn


def _rows(X: Any, rows: np.ndarray) -> Any:
    return X if len(rows) == len(X) else np.asarray(X[rows])


def knn_report(
    X: Any,
    y: np.ndarray,
    X_val: Any = None,
    y_val: np.ndarray | None = None,
    head_pred: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
    search: str = "auto",
) -> dict[str, Any]:
    """Choose ``k``, then the kNN's accuracy on the validation rows and, given the head's predictions on
    them, how often the two agree (one neighbour search serves both). What `rt fit-head` reports."""
    choice, nb, knn = _choose(X, y, X_val, y_val, ks, search, seed)
    out: dict[str, Any] = {**choice.to_dict(), "metric": "cosine", "n_train": len(y)}
    if nb is not None and knn is not None and y_val is not None:
        out.pop("choice_search", None)
        out["search"] = nb.info
        pred = knn.classes_[vote(nb, knn.y_, choice.k, len(knn.classes_))]
        out.update(_compare(np.asarray(y_val), pred, head_pred))
    return out


def _compare(y: np.ndarray, knn_pred: np.ndarray, head_pred: np.ndarray | None) -> dict[str, Any]:
    out: dict[str, Any] = {"accuracy": float((y == knn_pred).mean()) if len(y) else None, "n": len(y)}
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
    search: str = "auto",
) -> dict[str, Any]:
    """The kNN of `rt evaluate`: fitted on the labelled rows of ``train_cache`` (default: the cache the head
    was fitted on, as its meta.json records; read as stored, float16 stays float16), ``k`` as the fit-head
    report chose it (else chosen by leave-one-out here), scored on ``X_test`` beside the head. A missing
    training cache, or (``search="auto"`` without faiss) an exact search too long to run unasked, gives
    ``{"skipped": why and how to run it}``."""
    from ..base import get_reporter
    from ..cache import FeatureCache

    recorded = (md.meta.get("fit") or {}).get("cache")
    path = Path(train_cache) if train_cache is not None else (Path(recorded) if recorded else None)
    if path is None or not path.exists():
        return {"skipped": f"no training cache to fit the kNN on ({path or 'none recorded'}); pass --knn-cache"}
    with FeatureCache(path) as fc:
        fc.check_identity(md.identity, f"the head in {md.path}")
        rows, y = fc.labelled_as(md.classes, f"--knn-cache {path}", "use the cache the head was fitted on")
        slow = too_slow(len(y_test), len(y), fc.dim, search)
        if slow:
            get_reporter().warn(f"kNN beside the head skipped: {slow}")
            return {"skipped": slow}
        X = fc.features(rows, dtype=None)
    k = _recorded_k(Path(md.path)) if train_cache is None else None
    choice = KnnChoice(k, {}, "recorded by rt fit-head") if k else choose_k(X, y, search=search)
    nb = fit_knn(X, y, choice.k, search).kneighbors(X_test)
    classes, yi = np.unique(y, return_inverse=True)
    pred = classes[vote(nb, yi, min(choice.k, len(y)), len(classes))]
    return {
        **choice.to_dict(),
        "metric": "cosine",
        "train_cache": str(path),
        "n_train": len(y),
        "search": nb.info,
        **_compare(np.asarray(y_test), pred, head_pred),
    }


def knn_beside_fit(
    cache: Any,
    train_rows: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray | None,
    y_val: np.ndarray | None,
    head: Any,
    search: str = "auto",
    memory_budget: float | None = None,
) -> dict[str, Any]:
    """The kNN of `rt fit-head`: ``k`` chosen on its validation rows, accuracy and agreement with ``head``
    there. The training rows are read as stored (float16 stays float16). Skipped, with the reason and what
    to do, when there are no validation rows, the stored rows exceed ``memory_budget`` bytes, or (auto,
    without faiss) the exact search would be too long to run unasked. Reports one line."""
    from ..base import get_reporter

    rep = get_reporter()
    if X_val is None or y_val is None or not len(y_val):
        return {"skipped": "no validation rows to choose k on"}
    stage = getattr(getattr(head, "module_", None), "features", None)  # the head's own input (a chosen stage)
    dim = X_val.shape[1]
    stored = len(train_rows) * dim * np.dtype(cache.feature_dtype).itemsize
    if memory_budget is not None and stored > memory_budget:
        why = (
            f"the {len(train_rows):,} training rows' features ({stored / 1e9:.1f} GB as stored) exceed the memory "
            "budget: raise --max-memory-gb to see the kNN"
        )
        rep.warn(f"kNN beside the head skipped: {why}")
        return {"skipped": why}
    slow = too_slow(len(y_val), len(train_rows), dim, search)
    if slow:
        rep.warn(f"kNN beside the head skipped: {slow}")
        return {"skipped": slow}
    head_pred = head.logits(X_val).argmax(1)  # (n, k) logits; decision_function is (n,) for 2 classes
    X = cache.features(train_rows, stage=stage, dtype=None)
    out = knn_report(X, y_train, X_val, y_val, head_pred, search=search)
    rep.info(
        f"kNN beside the head (cosine, k={out['k']} chosen on validation, {out['search']['path']} search): "
        f"accuracy {out['accuracy']:.4f}, agrees with the head on {out['agreement_with_head']:.1%} of "
        f"{out['n']} validation rows"
    )
    return out
