"""Which features a head reads, and its L2 strength, chosen on validation data (`rt fit-head --features`).

A cache may hold, besides the backbone's final pooled features, the pooled features of several stages
(``FeatureCache.pooled_stages``, e.g. ``layer3``, ``layer4``). Intermediate stages often transfer better
when the source task is far from the target. :func:`feature_candidates` turns ``--features`` into the sets
to try (``None`` = the final features; a list = those stages' pooled features, concatenated in order);
:func:`select_features` fits a :class:`SoftmaxHead` on each along its L2 grid and keeps the best
(validation accuracy, ties: lower log-loss). With fewer than ``CV_BELOW`` validation rows the scores come
from stratified k-fold cross-validation over every labelled row, since a 6-image split would choose by
noise; otherwise from the validation split itself.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..base import UsageError

FINAL = "final"
AUTO = "auto"
CV_BELOW = 30  # validation rows below which the choice is made by k-fold cross-validation
CV_FOLDS = 5

FeatureSet = list[str] | None  # None: the backbone's final pooled features


def feature_name(features: FeatureSet) -> str:
    """``final`` or the stages joined by ``+`` (how ``--features`` spells it)."""
    return FINAL if not features else "+".join(features)


def feature_candidates(pooled_stages: list[str], choice: str) -> list[FeatureSet]:
    """The feature sets ``--features choice`` asks to try, given the cache's ``pooled_stages``.

    ``auto``: the final features, each stored stage, and (with two or more) all stages concatenated; with
    no stored stages just the final features (as before stages existed). ``final``: only those. A stage
    name or ``a+b`` (a concatenation): only that set, each name one of ``pooled_stages``."""
    stages = list(pooled_stages)
    choice = (choice or AUTO).strip()
    if choice == AUTO:
        cands: list[FeatureSet] = [None] + [[s] for s in stages]
        return cands + ([stages] if len(stages) > 1 else [])
    if choice == FINAL:
        return [None]
    names = [n.strip() for n in choice.split("+")]
    unknown = [n for n in names if n not in stages]
    if unknown or len(set(names)) != len(names) or not all(names):
        have = ", ".join(stages) if stages else "none (extract with `rt extract --pool-stages layer3,layer4`)"
        raise UsageError(
            f"--features {choice!r}: {', '.join(unknown) or 'repeated or empty names'} not among the cache's "
            f"pooled stages ({have})",
            "use auto, final, a stored stage, or stages joined by + (e.g. layer3+layer4)",
        )
    return [names]


def load_candidates(cache: Any, rows: np.ndarray, candidates: list[FeatureSet]) -> dict[str, np.ndarray]:
    """``{name: features of rows}`` for each candidate, read from ``cache`` (``features(rows, stage=...)``)."""
    out = {}
    for c in candidates:
        out[feature_name(c)] = cache.features(rows) if c is None else cache.features(rows, stage=list(c))
    return out


@dataclass
class Selection:
    """What was chosen, how, and the table of everything tried."""

    features: FeatureSet
    l2: float
    method: str  # "cv" or "split"
    description: str
    tried: list[dict[str, Any]] = field(default_factory=list)  # features, l2, accuracy, log_loss (+ folds)

    @property
    def name(self) -> str:
        return feature_name(self.features)

    def table_rows(self) -> list[list[Any]]:
        best = (self.name, self.l2)
        return [
            [
                t["features"],
                f"{t['l2']:g}",
                f"{t['accuracy']:.4f}",
                f"{t['log_loss']:.4f}",
                "<- chosen" if (t["features"], t["l2"]) == best else "",
            ]
            for t in self.tried
        ]


def path_scores(
    params: dict[str, Any], Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray, walk_all: bool
) -> list[dict[str, Any]]:
    """Validation accuracy and log-loss at each L2 point a head fitted on ``Xtr`` walked (warm-started)."""
    from .estimator import SoftmaxHead

    p = dict(params)
    if p.get("l2") is not None:  # a fixed strength: a one-point "grid"
        p["l2_grid"], p["l2"] = (float(p["l2"]),), None
    if walk_all:
        p["path_patience"] = None
    head = SoftmaxHead(**p).fit(Xtr, ytr, Xva, yva)
    return [
        {"l2": e["l2"], "accuracy": e["val_accuracy"], "log_loss": e["val_loss"]}
        for e in head.path_
        if "val_accuracy" in e
    ]


def _best(tried: list[dict[str, Any]]) -> dict[str, Any]:
    return max(tried, key=lambda t: (t["accuracy"], -t["log_loss"]))


def select_features(
    train: dict[str, np.ndarray],
    y_train: np.ndarray,
    val: dict[str, np.ndarray] | None,
    y_val: np.ndarray | None,
    params: dict[str, Any],
    *,
    cv_below: int = CV_BELOW,
    folds: int = CV_FOLDS,
    seed: int = 0,
) -> Selection:
    """Choose the feature set (the keys of ``train``, named as :func:`feature_name` names them) and the L2
    strength. ``params``: the :class:`SoftmaxHead` parameters (an ``l2`` in them is kept fixed; only the
    features are then chosen). ``val`` (same keys) and ``y_val``: the validation rows; with fewer than
    ``cv_below`` of them (or none), stratified ``folds``-fold cross-validation over train + val decides."""
    names = list(train)
    n_val = 0 if y_val is None else len(y_val)
    if n_val >= cv_below and val is not None and y_val is not None:
        tried = []
        for name in names:
            for r in path_scores(params, train[name], y_train, val[name], y_val, walk_all=False):
                tried.append({"features": name, **r})
        best = _best(tried)
        desc = f"validation split ({n_val} rows)"
        return Selection(_as_set(best["features"]), float(best["l2"]), "split", desc, tried)
    return _select_by_cv(train, y_train, val, y_val, params, folds, seed)


def _select_by_cv(
    train: dict[str, np.ndarray],
    y_train: np.ndarray,
    val: dict[str, np.ndarray] | None,
    y_val: np.ndarray | None,
    params: dict[str, Any],
    folds: int,
    seed: int,
) -> Selection:
    y = np.concatenate([y_train, y_val]) if y_val is not None and len(y_val) else np.asarray(y_train)
    X = {
        n: (np.vstack([train[n], val[n]]) if val is not None and y_val is not None and len(y_val) else train[n])
        for n in train
    }
    splits = cv_folds(
        y,
        folds,
        seed,
        "to choose the features by cross-validation",
        "pass --features final (or a stage), or add images",
    )
    k = len(splits)
    scores: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for tr, va in splits:
        for name in X:
            for r in path_scores(params, X[name][tr], y[tr], X[name][va], y[va], walk_all=True):
                scores.setdefault((name, r["l2"]), []).append((r["accuracy"], r["log_loss"]))
    tried = [
        {
            "features": name,
            "l2": l2,
            "accuracy": float(np.mean([a for a, _ in s])),
            "log_loss": float(np.mean([b for _, b in s])),
            "accuracy_std": float(np.std([a for a, _ in s])),
            "folds": len(s),
        }
        for (name, l2), s in scores.items()
        if len(s) == k
    ]
    best = _best(tried)
    desc = f"stratified {k}-fold cross-validation over {len(y)} rows (seed {seed})"
    return Selection(_as_set(best["features"]), float(best["l2"]), "cv", desc, tried)


def cv_folds(y: np.ndarray, folds: int, seed: int, what: str, hint: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled ``(train, val)`` index folds over labels ``y``: ``folds`` of them, fewer when the
    smallest class has fewer rows (at least 2); a :class:`UsageError` (``too few labelled rows ... {what}``,
    ``hint``) when there are not two classes or two rows per fold. The one fold maker of the feature and
    head choices."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(np.unique(y, return_inverse=True)[1])
    k = int(min(folds, max(2, counts.min())))
    if len(counts) < 2 or len(y) < 2 * k:
        raise UsageError(f"too few labelled rows ({len(y)}) {what}", hint)
    with warnings.catch_warnings():  # a class with fewer rows than folds: scikit-learn warns, we report it
        warnings.simplefilter("ignore", UserWarning)
        return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def _as_set(name: str) -> FeatureSet:
    return None if name == FINAL else name.split("+")
