"""`rt suggest` on a planted pool: 30 copies of one hard picture, 30 other uncertain images spread out, 40
confident ones. Uncertainty alone would suggest five copies of the hard picture; the picks must be the
uncertain images, one copy at most, and unlike each other. The manifest's paths lead to the pool's files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from planted import write_cache, write_head, write_images

from resnet_transfer.base import DataError, UsageError, file_digest
from resnet_transfer.images import list_images
from resnet_transfer.tools import SuggestConfig, diverse_top, suggest, uncertainty

DIM = 8


def _pool() -> np.ndarray:
    rng = np.random.default_rng(0)
    hard = np.zeros(DIM)
    hard[1] = 5.0
    copies = hard + 1e-3 * rng.normal(size=(30, DIM))  # the boundary is x0 = 0: maximally uncertain
    spread = 5.0 * rng.normal(size=(30, DIM))
    spread[:, 0] = rng.uniform(-0.3, 0.3, 30)  # near the boundary, in many directions
    sure = 5.0 * rng.normal(size=(40, DIM))
    sure[:, 0] = rng.choice([-6.0, 6.0], 40)
    return np.concatenate([copies, spread, sure]).astype(np.float32)


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    X = _pool()
    paths = [f"pool/img{i:03d}.png" for i in range(len(X))]
    write_images(tmp_path / "data", paths)
    cache = write_cache(tmp_path / "pool.h5", X, [-1] * len(X), ["left", "right"], paths)
    w = np.zeros((2, DIM))
    w[0, 0], w[1, 0] = -1.0, 1.0
    head = write_head(tmp_path / "head", w, np.zeros(2), ["left", "right"])
    return {"X": X, "paths": paths, "cache": cache, "head": head, "root": tmp_path / "data", "tmp": tmp_path}


def test_uncertainty_alone_picks_copies_of_one_picture() -> None:
    X = _pool()
    logits = np.stack([-X[:, 0], X[:, 0]], 1)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert set(np.argsort(-uncertainty(p, "margin"))[:5]) <= set(range(30))  # what diversity must undo


def test_picks_are_uncertain_and_diverse(setup: dict) -> None:
    out = setup["tmp"] / "labels" / "to-label.csv"
    res = suggest(SuggestConfig(head=setup["head"], pool=setup["cache"], out=out, n=5, root=setup["root"]))
    picked = [setup["paths"].index(Path(r["path"]).relative_to(setup["root"].resolve()).as_posix()) for r in res.rows]
    assert len(picked) == 5
    assert sum(i < 30 for i in picked) <= 1  # one copy of the hard picture at most
    assert all(i < 60 for i in picked)  # no confident image
    Xc = setup["X"] - setup["X"].mean(0)
    Xn = Xc[picked] / np.linalg.norm(Xc[picked], axis=1, keepdims=True)
    cos = Xn @ Xn.T
    assert cos[~np.eye(5, dtype=bool)].max() < 0.99
    assert [r["uncertainty"] for r in res.rows] == sorted((r["uncertainty"] for r in res.rows), reverse=True)


def test_manifest_paths_lead_to_the_same_files(setup: dict) -> None:
    out = setup["tmp"] / "labels" / "to-label.csv"
    res = suggest(SuggestConfig(head=setup["head"], pool=setup["cache"], out=out, n=4, root=setup["root"]))
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["path", "label"] and all(r[1] == "" for r in rows[1:]) and len(rows) == 5
    assert all(not Path(r[0]).is_absolute() for r in rows[1:])  # relative to the manifest's folder
    # fill in the labels, then read the manifest as `rt extract` does
    filled = out.with_name("filled.csv")
    filled.write_text("path,label\n" + "".join(f"{r[0]},left\n" for r in rows[1:]))
    listed = list_images(filled, allow_outside=True)
    files = [Path(listed.root) / p for p in listed.paths]
    assert [file_digest(f) for f in files] == [file_digest(r["path"]) for r in res.rows]
    assert out.with_suffix(".json").exists() and out.with_suffix(".png").stat().st_size > 100


def test_refusals(setup: dict, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="csv"):
        suggest(SuggestConfig(head=setup["head"], pool=setup["cache"], out=tmp_path / "x.txt", root=setup["root"]))
    with pytest.raises(DataError, match=r"(?s)its images were not found \(looked in .*pass --root"):
        suggest(SuggestConfig(head=setup["head"], pool=setup["cache"], out=tmp_path / "x.csv"))
    labelled = write_cache(tmp_path / "l.h5", setup["X"][:4], [0, 1, 0, 1], ["left", "right"])
    with pytest.raises(DataError, match="no unlabelled"):
        suggest(SuggestConfig(head=setup["head"], pool=labelled, out=tmp_path / "x.csv"))


def test_diverse_top_keeps_order_and_size() -> None:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 6))
    s = rng.random(200)
    picks = diverse_top(X, s, 10)
    assert len(set(picks.tolist())) == 10 and list(s[picks]) == sorted(s[picks], reverse=True)
    assert len(diverse_top(X[:3], s[:3], 10)) == 3


def test_diverse_top_on_float16_features_as_a_cache_stores_them() -> None:
    """diverse_top reads the mean and the scanned rows only: float16 input gives the float32 answer."""
    rng = np.random.default_rng(4)
    X = np.abs(rng.normal(size=(3000, 32))).astype(np.float16)
    s = rng.random(3000)
    np.testing.assert_array_equal(diverse_top(X, s, 8), diverse_top(X.astype(np.float32), s, 8))
    assert X.dtype == np.float16
