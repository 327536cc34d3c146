"""The one neighbour search: exact blockwise search equals scikit-learn's brute-force cosine neighbours (also
across block edges and on float16 input), the faiss index returns the full-feature cosines of true rows
with its measured recall, and ``auto`` says which path it took and why (never a silent skip)."""

from __future__ import annotations

import numpy as np
import pytest
from planted import blobs

from resnet_transfer.base import Reporter, UsageError, set_reporter
from resnet_transfer.head import neighbors as nb
from resnet_transfer.head import search


def _data(n: int = 600, d: int = 24, seed: int = 0) -> np.ndarray:
    X, _ = blobs(n // 4, 4.0 * np.eye(4, d), spread=1.0, seed=seed)
    return X + 2.0  # all positive, like ReLU features: centring matters


def _sklearn(ref: np.ndarray, queries: np.ndarray, k: int, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.neighbors import NearestNeighbors

    knn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(ref - mean)
    return knn.kneighbors(queries - mean)


@pytest.mark.parametrize("block", [nb.BLOCK, 64])  # one block, and many blocks with a running top-k
def test_exact_equals_sklearn_for_queries(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    monkeypatch.setattr(nb, "BLOCK", block)
    X, Q = _data(600), _data(100, seed=1)
    res = search(X, Q, 7, search="exact")
    d, i = _sklearn(X, Q, 7, X.mean(0))
    np.testing.assert_array_equal(res.index, i)
    np.testing.assert_allclose(res.distance, d, atol=1e-5)
    assert res.info["path"] == "exact" and "asked for" in res.info["why"]


def test_self_join_leaves_each_row_out_but_keeps_its_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nb, "BLOCK", 50)
    X = _data(300)
    X[10] = X[200]  # an exact copy: each is the other's nearest neighbour (similarity 1), never itself
    res = search(X, None, 5, search="exact")
    assert not (res.index == np.arange(len(X))[:, None]).any()
    assert res.index[10, 0] == 200 and res.index[200, 0] == 10
    assert res.similarity[10, 0] == pytest.approx(1.0, abs=1e-5)
    _, i = _sklearn(X, X, 6, X.mean(0))  # sklearn's own row first (or its copy at the same distance)
    theirs = [set(row[row != r]) for r, row in enumerate(i)]
    assert np.mean([set(a) <= t | {10, 200} for a, t in zip(res.index, theirs)]) == 1.0
    assert np.all(np.diff(res.similarity, axis=1) <= 1e-7)  # highest first


def test_float16_input_is_read_as_stored_and_gives_the_float32_answer() -> None:
    X = _data(400).astype(np.float16)
    a = search(X, None, 5, search="exact")
    b = search(X.astype(np.float32), None, 5, search="exact")
    np.testing.assert_array_equal(a.index, b.index)
    assert X.dtype == np.float16  # not converted in place


def test_exclude_leaves_out_a_sampled_querys_own_row() -> None:
    X = _data(200)
    rows = np.array([3, 50, 120])
    res = search(X, X[rows], 4, exclude=rows, search="exact")
    full = search(X, None, 4, search="exact")
    np.testing.assert_array_equal(res.index, full.index[rows])


def test_k_is_capped_by_the_rows_there_are() -> None:
    X = _data(8)
    assert search(X, None, 20, search="exact").index.shape == (8, 7)
    assert search(X, X[:2], 20, search="exact").index.shape == (2, 8)
    with pytest.raises(UsageError):
        search(X, None, 0)


def test_auto_is_exact_when_small_and_says_so() -> None:
    res = search(_data(200), None, 3)
    assert res.info["path"] == "exact" and "fast enough" in res.info["why"]


def test_auto_without_faiss_runs_exact_and_says_how_to_get_the_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nb, "index_available", lambda: False)
    monkeypatch.setattr(nb, "EXACT_WORK", 1.0)
    monkeypatch.setattr(nb, "INDEX_MIN_ROWS", 10)
    rep = Reporter(verbose=False)
    previous = set_reporter(rep)
    try:
        res = search(_data(200), None, 3)
    finally:
        set_reporter(previous)
    assert res.info["path"] == "exact" and "faiss is not installed" in res.info["why"]
    assert any("resnet_transfer[ann]" in w for w in rep.warnings)
    with pytest.raises(UsageError, match="faiss") as exc:
        search(_data(200), None, 3, search="index")
    assert "resnet_transfer[ann]" in (exc.value.hint or "")
    assert nb.too_slow(10**6, 10**6, 2048) is not None and "--knn-search exact" in nb.too_slow(10**6, 10**6, 2048)
    assert nb.too_slow(10**6, 10**6, 2048, "exact") is None
    with pytest.raises(UsageError, match="not known"):
        search(_data(20), None, 3, search="fast")


def _low_rank(n: int, dim: int, seed: int) -> np.ndarray:
    """Features of few underlying directions spread over ``dim`` values (as CNN features are: the top 128
    principal directions of random-init ResNet-50 features hold 97% of their variance)."""
    mix = np.random.default_rng(99).normal(size=(24, dim)) / 5.0
    X = _data(n, 24, seed) @ mix
    return (X + 0.01 * np.random.default_rng(seed).normal(size=X.shape)).astype(np.float32)


@pytest.mark.parametrize("dim", [24, 300])  # the unit vectors as they are, and a PCA of them
def test_index_returns_true_cosines_and_its_measured_recall(monkeypatch: pytest.MonkeyPatch, dim: int) -> None:
    pytest.importorskip("faiss")
    monkeypatch.setattr(nb, "PCA_DIM", 64)
    X, Q = _low_rank(2000, dim, 0), _low_rank(300, dim, 1)
    res = search(X, Q, 10, search="index")
    exact = search(X, Q, 10, search="exact")
    info = res.info
    assert info["path"] == "index" and info["library"].startswith("faiss")
    assert ("PCA" in info["index"]) == (dim > 64)
    true_recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.index, exact.index)])
    assert true_recall > 0.8 and abs(info["recall_at_k"] - true_recall) < 0.1
    assert info["recall_queries"] == 300
    U, V = nb.Unit(Q, X.mean(0)).rows(0, len(Q)), nb.Unit(X, X.mean(0))
    direct = np.einsum("qd,qkd->qk", U, V.take(res.index.reshape(-1)).reshape(len(Q), 10, -1))
    np.testing.assert_allclose(res.similarity, direct, atol=2e-2)  # bf16 re-ranking: the cosines of those rows


def test_index_self_join_never_returns_the_row_itself() -> None:
    pytest.importorskip("faiss")
    X = _data(1500, 32)
    res = search(X, None, 5, search="index")
    assert not (res.index == np.arange(len(X))[:, None]).any()
    assert res.info["recall_at_k"] > 0.8 and 0 <= res.info["recall_at_1"] <= 1


def test_low_index_recall_is_measured_and_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    """Isotropic noise in 300 dimensions: a 64-component PCA keeps too little of it to find neighbours; the
    measured recall says so (it matches the true recall) and a warning names the exact search."""
    pytest.importorskip("faiss")
    monkeypatch.setattr(nb, "PCA_DIM", 64)
    X, Q = _data(2000, 300), _data(300, 300, seed=1)
    rep = Reporter(verbose=False)
    previous = set_reporter(rep)
    try:
        res = search(X, Q, 10, search="index")
    finally:
        set_reporter(previous)
    exact = search(X, Q, 10, search="exact")
    true_recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.index, exact.index)])
    assert true_recall < 0.9 and abs(res.info["recall_at_k"] - true_recall) < 0.1
    assert any("--search exact" in w for w in rep.warnings)
