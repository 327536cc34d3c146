"""kNN beside the head: k chosen on validation (or by cross-validation), reported next to the head."""

from __future__ import annotations

import numpy as np
import pytest
from planted import blobs

from resnet_transfer.head import CosineKnn, choose_k, fit_knn, knn_report
from resnet_transfer.head import knn as knn_module


def _noisy(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping clusters with 25% of the labels flipped: one neighbour copies the noise, many
    neighbours vote it away."""
    X, y = blobs(100, np.array([[3.0, 0, 0], [0, 3.0, 0]]), spread=1.0, seed=seed)
    rng = np.random.default_rng(seed)
    flip = rng.random(len(y)) < 0.25
    return X, np.where(flip, 1 - y, y)


def test_k_chosen_on_validation_is_the_best_tried_and_beats_one_neighbour() -> None:
    X, y = _noisy(0)
    Xv, yv = blobs(50, np.array([[3.0, 0, 0], [0, 3.0, 0]]), spread=1.0, seed=1)  # clean validation labels
    choice = choose_k(X, y, Xv, yv)
    assert choice.scores[choice.k] == max(choice.scores.values())
    assert choice.k > 1 and choice.scores[choice.k] > choice.scores[1]
    assert "validation" in choice.how


def test_k_by_cross_validation_without_validation_rows() -> None:
    X, y = _noisy(2)
    choice = choose_k(X, y)
    assert "cross-validation" in choice.how and choice.k > 1
    assert set(choice.scores) <= {1, 3, 5, 7, 10, 15, 20, 30}


def test_cosine_knn_ignores_the_scale_of_a_row() -> None:
    X, y = blobs(20, np.array([[5.0, 0], [0, 5.0]]), spread=0.5, seed=3)
    knn = fit_knn(X - X.mean(0), y, 3)
    probe = np.array([[4.0, -1.0], [-1.0, 4.0]]) - X.mean(0)
    np.testing.assert_array_equal(knn.predict(probe), knn.predict(probe * 10))


def test_report_compares_with_the_head() -> None:
    X, y = _noisy(4)
    Xv, yv = blobs(30, np.array([[3.0, 0, 0], [0, 3.0, 0]]), spread=1.0, seed=5)
    head_pred = np.zeros(len(yv), dtype=int)  # a "head" that always says class 0
    rep = knn_report(X, y, Xv, yv, head_pred)
    assert 0.5 < rep["accuracy"] <= 1.0 and rep["n"] == len(yv)
    assert rep["disagreements"] == int((head_pred != fit_knn(X, y, rep["k"]).predict(Xv)).sum())
    assert rep["agreement_with_head"] == pytest.approx(1 - rep["disagreements"] / len(yv))


def test_predictions_equal_scikit_learns_distance_weighted_cosine_knn() -> None:
    """The same votes as KNeighborsClassifier(metric="cosine", weights="distance") on centred features,
    including a query that is an exact copy of a training row (distance 0: that row alone decides)."""
    from sklearn.neighbors import KNeighborsClassifier

    X, y = _noisy(6)
    Xq, _ = blobs(40, np.array([[3.0, 0, 0], [0, 3.0, 0]]), spread=1.5, seed=7)
    Xq[0] = X[17]
    mean = X.mean(0)
    for k in (1, 5, 15):
        theirs = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance", algorithm="brute")
        want = theirs.fit(X - mean, y).predict(Xq - mean)
        np.testing.assert_array_equal(CosineKnn(k, "exact").fit(X.astype(np.float16), y).predict(Xq), want)
    assert CosineKnn(5).fit(X, y).predict(Xq[:1])[0] == y[17]


def test_leave_one_out_on_a_sample_searches_all_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above LOO_QUERIES rows the k choice classifies a seeded sample of rows, each by its neighbours among
    all the other rows (not a subsample of the reference)."""
    monkeypatch.setattr(knn_module, "LOO_QUERIES", 50)
    X, y = _noisy(8)
    choice = choose_k(X, y)
    assert "50 training rows (neighbours among all 200)" in choice.how
    assert choice.to_dict()["choice_search"]["reference_rows"] == 200


def test_report_says_which_search_ran() -> None:
    X, y = _noisy(9)
    Xv, yv = blobs(30, np.array([[3.0, 0, 0], [0, 3.0, 0]]), spread=1.0, seed=10)
    rep = knn_report(X, y, Xv, yv, search="exact")
    assert rep["search"]["path"] == "exact" and rep["search"]["query_rows"] == len(yv)
