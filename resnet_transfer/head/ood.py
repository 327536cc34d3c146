"""Out-of-distribution scorers: how far an image's features lie from the training data ("none of the above").

One small class per scorer, each fitted on the training rows only (never on examples of the unknown), each
giving a score where **higher = farther from the training data**:

* ``knn``: the distance to the k-th nearest training feature, both L2-normalised (Sun et al., ICML 2022,
  "Out-of-Distribution Detection with Deep Nearest Neighbors"). The bank is the training features as unit
  vectors in float16, searched with the package's one neighbour search (:mod:`.neighbors`: exact in blocks,
  or faiss's index), so it scales like the cache tools. ``k`` defaults to 1% of the training rows, 1..50.
* ``mahalanobis``: the smallest Mahalanobis distance to a class mean under one covariance shared by the
  classes (Lee et al., NeurIPS 2018), the covariance shrunk by Ledoit and Wolf's rule (accumulated in blocks,
  so it never needs the rows in memory at once; it also keeps the matrix invertible when there are fewer rows
  than features).
* ``energy``: ``-logsumexp(logits)`` of the head's untempered logits (Liu et al., NeurIPS 2020).
* ``msp``: ``1 - max softmax(logits)``, the baseline (Hendrycks and Gimpel, 2017).

Each scorer has ``fit(train_features, train_labels, head)``, ``score(features, logits)``, and
``state()`` / ``from_state(params, arrays)`` for the head directory (JSON parameters + named arrays). The
threshold of a scorer is the score that accepts ``ACCEPT`` (95%) of the validation rows.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..base import UsageError
from .neighbors import BLOCK, normalise, search

ACCEPT = 0.95  # the share of validation rows the default threshold accepts
KNN_K_MAX = 50  # Sun et al. use k=50 on CIFAR-10's 50,000 rows; k defaults to 1% of the rows, 1..KNN_K_MAX


class Scorer:
    """The interface every scorer follows (see the module docstring)."""

    name: ClassVar[str] = ""
    needs_features: ClassVar[bool] = True  # False: the logits alone (energy, msp)
    describe: ClassVar[str] = ""

    def fit(self, train_features: Any, train_labels: np.ndarray, head: Any = None) -> Scorer:
        return self

    def score(self, features: Any, logits: np.ndarray | None) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(JSON-able parameters, named arrays)``: what the head directory stores."""
        return {}, {}

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> Scorer:
        return cls()


def _logits(logits: np.ndarray | None, name: str) -> np.ndarray:
    if logits is None:
        raise UsageError(f"the {name} out-of-distribution score needs the head's logits")
    return np.asarray(logits, dtype=np.float64)


class EnergyScorer(Scorer):
    """``-logsumexp(z)`` of the untempered logits ``z`` (the free energy at T = 1): low for the training data."""

    name = "energy"
    needs_features = False
    describe = "energy: -logsumexp of the head's logits (Liu et al. 2020)"

    def score(self, features: Any, logits: np.ndarray | None) -> np.ndarray:
        z = _logits(logits, self.name)
        top = z.max(1)
        return -(top + np.log(np.exp(z - top[:, None]).sum(1)))


class MspScorer(Scorer):
    """``1 - max softmax(z)``: the baseline every other scorer is compared with."""

    name = "msp"
    needs_features = False
    describe = "msp: 1 - the largest softmax probability (the baseline)"

    def score(self, features: Any, logits: np.ndarray | None) -> np.ndarray:
        z = _logits(logits, self.name)
        e = np.exp(z - z.max(1, keepdims=True))
        return 1.0 - e.max(1) / e.sum(1)


def default_k(n_rows: int) -> int:
    """1% of the training rows, at least 1 and at most ``KNN_K_MAX``."""
    return int(min(KNN_K_MAX, max(1, n_rows // 100)))


class KnnScorer(Scorer):
    """Distance from the L2-normalised features to their k-th nearest L2-normalised training feature
    (``sqrt(2 - 2 cos)``, the Euclidean distance of unit vectors)."""

    name = "knn"
    describe = "knn: distance to the k-th nearest training feature, L2-normalised (Sun et al. 2022)"

    def __init__(self, k: int | None = None, search: str = "auto") -> None:
        self.k, self.search = k, search
        self.bank_: np.ndarray | None = None

    def fit(self, train_features: Any, train_labels: np.ndarray, head: Any = None) -> KnnScorer:
        n = len(train_features)
        if n < 1:
            raise UsageError("the kNN out-of-distribution score needs training rows")
        self.k = min(int(self.k or default_k(n)), n)
        bank = np.empty(train_features.shape, dtype=np.float16)
        for lo in range(0, n, BLOCK):
            bank[lo : lo + BLOCK] = normalise(np.asarray(train_features[lo : lo + BLOCK], dtype=np.float32))
        self.bank_ = bank
        return self

    def _similarity(self, features: Any, k: int, leave_out: bool = False) -> np.ndarray:
        assert self.bank_ is not None, "fit the scorer first"
        zero = np.zeros(self.bank_.shape[1], dtype=np.float32)  # no centring: plain unit vectors
        nb = search(self.bank_, None if leave_out else features, k, zero, self.search, what="out-of-distribution kNN")
        if nb.similarity.shape[1] < k:  # fewer reference rows than k (leave-one-out on a tiny bank)
            return np.full(len(nb.similarity), -1.0) if not nb.similarity.size else nb.similarity[:, -1]
        return nb.similarity[:, k - 1].astype(np.float64)

    def score(self, features: Any, logits: np.ndarray | None = None) -> np.ndarray:
        assert self.k is not None
        return _distance(self._similarity(features, self.k))

    def score_training(self) -> np.ndarray:
        """Each training row's score among the other training rows (leave-one-out): the threshold's rows when
        there are no validation rows."""
        assert self.k is not None
        return _distance(self._similarity(None, self.k, leave_out=True))

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        assert self.bank_ is not None
        return {"k": int(self.k or 1), "metric": "euclidean of unit vectors"}, {"bank": self.bank_}

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> KnnScorer:
        s = cls(int(params["k"]))
        s.bank_ = np.asarray(arrays["bank"], dtype=np.float16)
        return s


def _distance(similarity: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip(2.0 - 2.0 * similarity, 0.0, None))


class MahalanobisScorer(Scorer):
    """The smallest squared Mahalanobis distance to a class mean, one shared (Ledoit-Wolf shrunk) covariance."""

    name = "mahalanobis"
    describe = "mahalanobis: to the nearest class mean, shared covariance (Lee et al. 2018)"

    def __init__(self) -> None:
        self.means_: np.ndarray | None = None  # (classes with rows, dim)
        self.precision_: np.ndarray | None = None  # (dim, dim), the inverse shrunk covariance
        self.shrinkage_: float = 0.0

    def fit(self, train_features: Any, train_labels: np.ndarray, head: Any = None) -> MahalanobisScorer:
        y = np.asarray(train_labels)
        classes = np.unique(y)
        d = train_features.shape[1]
        sums = np.zeros((len(classes), d))
        for lo in range(0, len(y), BLOCK):
            B = np.asarray(train_features[lo : lo + BLOCK], dtype=np.float64)
            np.add.at(sums, np.searchsorted(classes, y[lo : lo + BLOCK]), B)
        means = sums / np.bincount(np.searchsorted(classes, y), minlength=len(classes))[:, None]
        cov, self.shrinkage_ = _shrunk_covariance(train_features, np.searchsorted(classes, y), means)
        self.means_ = means.astype(np.float32)
        self.precision_ = np.linalg.inv(cov).astype(np.float32)
        return self

    def score(self, features: Any, logits: np.ndarray | None = None) -> np.ndarray:
        assert self.means_ is not None and self.precision_ is not None, "fit the scorer first"
        P, M = self.precision_.astype(np.float64), self.means_.astype(np.float64)
        m = np.einsum("cd,de,ce->c", M, P, M)
        out = np.empty(len(features))
        for lo in range(0, len(features), BLOCK):
            X = np.asarray(features[lo : lo + BLOCK], dtype=np.float64)
            XP = X @ P
            d = (XP * X).sum(1)[:, None] - 2.0 * XP @ M.T + m[None, :]
            out[lo : lo + BLOCK] = d.min(1)
        return np.maximum(out, 0.0)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        assert self.means_ is not None and self.precision_ is not None
        return {"shrinkage": self.shrinkage_, "covariance": "shared, Ledoit-Wolf"}, {
            "means": self.means_,
            "precision": self.precision_,
        }

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> MahalanobisScorer:
        s = cls()
        s.means_ = np.asarray(arrays["means"], dtype=np.float32)
        s.precision_ = np.asarray(arrays["precision"], dtype=np.float32)
        s.shrinkage_ = float(params.get("shrinkage", 0.0))
        return s


def _shrunk_covariance(X: Any, yi: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, float]:
    """The within-class covariance of ``X`` (rows centred on their class mean) shrunk towards ``mu * I`` by
    Ledoit and Wolf's formula (as scikit-learn's ``ledoit_wolf(assume_centered=True)``), summed block by block."""
    n, d = X.shape
    S = np.zeros((d, d))
    fourth = 0.0
    for lo in range(0, n, BLOCK):
        B = np.asarray(X[lo : lo + BLOCK], dtype=np.float64) - means[yi[lo : lo + BLOCK]]
        S += B.T @ B
        fourth += float(((B * B).sum(1) ** 2).sum())
    S /= n
    mu = float(np.trace(S)) / d
    delta = float(((S - mu * np.eye(d)) ** 2).sum())
    beta = min(delta, max(0.0, (fourth / n - float((S * S).sum())) / n))
    shrink = beta / delta if delta > 0 else 1.0
    cov = (1.0 - shrink) * S + shrink * mu * np.eye(d)
    if mu <= 0:  # every row on its class mean: any positive scale will do
        cov = np.eye(d)
    return cov, float(shrink)


SCORERS: dict[str, type[Scorer]] = {s.name: s for s in (KnnScorer, MahalanobisScorer, EnergyScorer, MspScorer)}


def make_scorer(name: str, **params: Any) -> Scorer:
    """An unfitted scorer by name (``knn``, ``mahalanobis``, ``energy``, ``msp``)."""
    if name not in SCORERS:
        raise UsageError(f"out-of-distribution scorer {name!r} is not known", f"use one of {', '.join(SCORERS)}")
    return SCORERS[name](**params)


def accept_threshold(scores: np.ndarray, accept: float = ACCEPT) -> float:
    """The score at or below which ``accept`` of ``scores`` fall (the rows a threshold accepts)."""
    s = np.asarray(scores, dtype=np.float64)
    if not len(s):
        raise UsageError("no rows to set an out-of-distribution threshold on")
    return float(np.quantile(s, accept, method="higher"))
