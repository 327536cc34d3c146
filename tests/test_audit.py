"""`rt audit` on planted features: an exact and a near duplicate, train/test leakage, a flipped label,
a small class and an outlier are each found (and nothing is found where nothing was planted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from planted import PlantedSet, blobs, write_cache, write_planted

from resnet_transfer.tools import AuditConfig, audit, exact_groups, label_issues, near_pairs, outliers

CLASSES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    rng = np.random.default_rng(0)
    centres = 6.0 * np.eye(4, 16)
    X, y = blobs(30, centres[:3], spread=1.0, seed=0)
    Xd, yd = blobs(8, centres[3:], spread=1.0, seed=1)  # class d: 8 images against 30
    X, y = np.concatenate([X, Xd]), np.concatenate([y, yd + 3])
    y[5] = 2  # a class-a image labelled c
    X[25] = X[10]  # an exact duplicate (same features, same class)
    X[20] = X[12] + 0.01 * rng.normal(size=16)  # a near duplicate of another
    X[60] = 6.0 * np.eye(16)[10]  # an outlier: a direction no class uses
    paths = [f"{CLASSES[c]}/img{i:03d}.png" for i, c in enumerate(y)]
    tmp = tmp_path_factory.mktemp("audit")
    train = write_cache(tmp / "train.h5", X, y, CLASSES, paths)
    Xt, yt = blobs(5, centres, spread=1.0, seed=2)
    Xt[0] = X[70]  # leaked: the same image in the test set
    Xt[1] = X[75] + 0.01 * rng.normal(size=16)  # nearly leaked
    test = write_cache(tmp / "test.h5", Xt, yt, CLASSES, [f"t{i:02d}.png" for i in range(len(yt))])
    res = audit(AuditConfig(cache=train, test=test, out=tmp / "out"))
    return {"report": res.report, "paths": paths, "tmp": tmp, "y": y, "X": X}


def test_exact_and_near_duplicates_in_train(planted: dict) -> None:
    d = planted["report"]["duplicates"]
    p = planted["paths"]
    assert d["key"] == "content key"
    assert [sorted(g) for g in d["exact"]] == [sorted([p[10], p[25]])]
    near = {frozenset((n["a"], n["b"])) for n in d["near"]}
    assert frozenset((p[12], p[20])) in near
    assert frozenset((p[10], p[25])) not in near  # reported as exact, not again as near
    rows = [i for n in [*d["near"], *d["leakage_near"]] for i in n["rows"]]
    assert rows and all(type(i) is int for i in rows)  # numpy ints reached audit.json as strings


def test_leakage_across_train_and_test(planted: dict) -> None:
    d = planted["report"]["duplicates"]
    p = planted["paths"]
    assert [(x["train"], x["test"]) for x in d["leakage_exact"]] == [(p[70], "t00.png")]
    assert (p[75], "t01.png") in [(x["train"], x["test"]) for x in d["leakage_near"]]
    assert all(x["test"] not in ("t02.png", "t03.png") for x in d["leakage_near"])


def test_flipped_label_ranks_first(planted: dict) -> None:
    le = planted["report"]["label_errors"]
    top = le["rows"][0]
    assert top["path"] == planted["paths"][5] and top["given"] == "c" and top["suggested"] == "a"
    assert le["flagged"] <= 3  # the clusters are clean apart from the planted flip (and the outlier)


def test_small_class_and_outlier(planted: dict) -> None:
    rep = planted["report"]
    assert rep["imbalance"]["small_classes"] == ["d"]
    counts = np.bincount(planted["y"])  # 30, 29, 31 (one a labelled c), 8
    assert rep["imbalance"]["ratio"] == pytest.approx(counts.max() / counts.min())
    assert rep["outliers"]["rows"][0]["path"] == planted["paths"][60]


def test_writes_json_and_contact_sheet(planted: dict) -> None:
    out = planted["tmp"] / "out"
    assert json.loads((out / "audit.json").read_text())["rows"] == len(planted["y"])
    assert (out / "audit.png").stat().st_size > 500


def test_building_blocks() -> None:
    assert exact_groups(["x", "y", "x", "z", "y"]) == [[0, 2], [1, 4]]
    A = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01]])
    assert [(i, j) for i, j, _ in near_pairs(A, None, 0.99)] == [(0, 2)]
    assert near_pairs(A, np.array([[0.0, 2.0]]), 0.99)[0][:2] == (1, 0)
    X, y = blobs(20, 5.0 * np.eye(2, 4), spread=1.0, seed=3)
    probs, flagged, _ = label_issues(X, y)
    assert probs.shape == (40, 2) and not flagged.any()


# ---------------------------------------------------------------------- a planted cache, both searches


@pytest.fixture(scope="module")
def planted_set(tmp_path_factory: pytest.TempPathFactory) -> PlantedSet:
    """3,000 training rows of 512 float16 features in 10 classes, with exact and near duplicates, flipped
    labels and outliers planted, and 300 test rows of which some are (near) copies of training rows."""
    tmp = tmp_path_factory.mktemp("planted")
    return write_planted(tmp, 3000, test_rows=300, n_classes=10, dim=512, rate=0.005, seed=1)


@pytest.fixture(scope="module", params=["exact", "index"])
def planted_audit(request: pytest.FixtureRequest, planted_set: PlantedSet) -> dict:
    if request.param == "index":
        pytest.importorskip("faiss")
    out = planted_set.train.parent / f"out-{request.param}"
    cfg = AuditConfig(planted_set.train, planted_set.test, out, top=20, sheet=False, search=request.param)
    return audit(cfg).report


def test_planted_duplicates_and_leaks_are_found(planted_set: PlantedSet, planted_audit: dict) -> None:
    ps, d = planted_set, planted_audit["duplicates"]
    assert ps.duplicates and ps.near and ps.leaks and ps.near_leaks
    exact = {frozenset(g) for g in d["exact_rows"]}
    assert all(frozenset(p) in exact for p in ps.duplicates)
    near = {tuple(n["rows"]) for n in d["near"]}
    assert all((min(a, b), max(a, b)) in near for a, b in ps.near)
    assert {tuple(x["rows"]) for x in d["leakage_exact"]} == set(ps.leaks)
    assert set(ps.near_leaks) <= {tuple(x["rows"]) for x in d["leakage_near"]}
    assert len(d["near"]) <= 2 * len(ps.near)  # nothing much beyond what was planted


def test_planted_label_errors_and_outliers_are_found(planted_set: PlantedSet, planted_audit: dict) -> None:
    ps = planted_set
    listed = {r["row"] for r in planted_audit["label_errors"]["rows"]}
    assert ps.label_errors and np.mean([i in listed for i in ps.label_errors]) >= 0.9
    top = {r["row"] for r in planted_audit["outliers"]["rows"]}
    assert ps.outliers and np.mean([i in top for i in ps.outliers]) >= 0.9


def test_the_report_says_which_search_ran(planted_audit: dict) -> None:
    train, test = planted_audit["neighbours"]["train"], planted_audit["neighbours"]["test"]
    assert train["path"] == test["path"] and train["k"] == 20 and test["k"] == 5
    assert train["reference_rows"] == 3000 and test["query_rows"] == 300
    if train["path"] == "index":
        assert train["recall_at_k"] >= 0.9 and train["recall_queries"] == 500
        assert "PCA" in train["index"]
    assert set(planted_audit["seconds"]) == {"load", "neighbours", "label_errors", "outliers"}


def test_lof_from_the_neighbour_graph_equals_scikit_learns() -> None:
    from sklearn.neighbors import LocalOutlierFactor

    X, _ = blobs(60, 4.0 * np.eye(3, 8), spread=1.0, seed=4)
    X[7] = 9.0 * np.eye(8)[6]  # an outlier
    for k in (5, 20):
        want = -LocalOutlierFactor(n_neighbors=k, metric="cosine", algorithm="brute").fit(X).negative_outlier_factor_
        np.testing.assert_allclose(outliers(X, k), want, rtol=1e-4)
    assert int(np.argmax(outliers(X))) == 7
