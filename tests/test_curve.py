"""`rt curve` on planted clusters: per-k means with t-intervals that contain them and narrow with more
seeds, nested k-subsets, the table/JSON/PNG, and k values a class cannot fill left out with a warning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from planted import blobs, write_cache
from typer.testing import CliRunner

from resnet_transfer.base import Reporter, set_reporter
from resnet_transfer.cli import app
from resnet_transfer.tools import CurveConfig, curve, nested_subsets, t_interval

CENTRES = 1.5 * np.eye(3, 8)  # overlapping clusters: accuracy grows with k and varies with the draw


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("curve")
    X, y = blobs(40, CENTRES, spread=1.0, seed=0)
    Xt, yt = blobs(50, CENTRES, spread=1.0, seed=1)
    return write_cache(tmp / "train.h5", X, y, ["a", "b", "c"]), write_cache(tmp / "test.h5", Xt, yt, ["a", "b", "c"])


def _width(r: dict) -> float:
    return r["high"] - r["low"]


def test_intervals_contain_the_mean_and_narrow_with_more_seeds(caches: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = caches
    few = curve(CurveConfig(train, test, ks=(2, 5, 20), seeds=3, out=tmp_path / "a", l2=1e-2, plot=False)).report
    many = curve(CurveConfig(train, test, ks=(2, 5, 20), seeds=10, out=tmp_path / "b", l2=1e-2)).report
    for r in few["curve"] + many["curve"]:
        assert r["low"] <= r["mean"] <= r["high"]
        assert r["mean"] == pytest.approx(np.mean(r["scores"])) and len(r["scores"]) == r["seeds"]
    by = {(r["k"], r["method"]): r for r in few["curve"]}
    widths_few = [_width(by[(r["k"], r["method"])]) for r in many["curve"]]
    widths_many = [_width(r) for r in many["curve"]]
    assert np.mean(widths_many) < np.mean(widths_few)
    probe = [r["mean"] for r in many["curve"] if r["method"] == "probe"]
    assert probe[-1] > probe[0]  # 20 images per class beat 2
    saved = json.loads((tmp_path / "b" / "curve.json").read_text())
    assert saved["curve"] == json.loads(json.dumps(many["curve"])) and "t-interval" in saved["interval"]
    assert (tmp_path / "b" / "curve.png").stat().st_size > 1000


def test_t_interval_matches_its_definition() -> None:
    from scipy.stats import t

    x = [0.5, 0.6, 0.7, 0.65]
    mean, lo, hi = t_interval(x)
    half = t.ppf(0.975, 3) * np.std(x, ddof=1) / 2
    assert (lo, hi) == pytest.approx((mean - half, mean + half))
    assert t_interval([0.5]) == (0.5, None, None)


def test_subsets_are_nested_with_k_per_class() -> None:
    y = np.repeat([0, 1, 2], 30)
    subs = nested_subsets(y, [2, 5, 0], seed=4, n_classes=3)
    assert [np.bincount(y[subs[k]]).tolist() for k in (2, 5)] == [[2, 2, 2], [5, 5, 5]]
    assert set(subs[2]) <= set(subs[5]) and len(subs[0]) == 90
    assert not np.array_equal(subs[5], nested_subsets(y, [5], seed=5, n_classes=3)[5])


def test_k_above_the_smallest_class_is_left_out(caches: tuple[Path, Path], tmp_path: Path) -> None:
    rep = Reporter(verbose=False)
    prev = set_reporter(rep)
    try:
        res = curve(CurveConfig(*caches, ks=(5, 100), seeds=2, out=tmp_path, l2=1e-2, knn=False, plot=False))
    finally:
        set_reporter(prev)
    assert [r["k"] for r in res.report["curve"]] == [5]
    assert any("k=100 left out" in w for w in rep.warnings)


def test_cli(caches: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = caches
    args = ["curve", "--train", str(train), "--test", str(test), "--k", "2,all", "--seeds", "3", "--l2", "0.01"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{") :])
    assert [r["k"] for r in report["curve"] if r["method"] == "probe"] == [2, "all"]
    bad = CliRunner().invoke(app, ["curve", "--train", str(train), "--test", str(test), "--k", "two"])
    assert bad.exit_code == 2 and "--k" in bad.output


def test_only_the_rows_the_subsets_hold_are_read(caches: tuple[Path, Path], tmp_path: Path) -> None:
    """The curve's cost follows its k-subsets, not the training cache: 2 seeds x 3 classes x k=2 read at most
    12 of the 120 rows; with k=all every row is read, and the scores come from the rows asked for."""
    train, test = caches
    small = curve(CurveConfig(train, test, ks=(2,), seeds=2, out=tmp_path / "s", l2=1e-2, plot=False)).report
    assert small["n_train"] == 120 and 6 <= small["rows_read"] <= 12
    full = curve(CurveConfig(train, test, ks=(2, 0), seeds=2, out=tmp_path / "f", l2=1e-2, plot=False)).report
    assert full["rows_read"] == 120
    two = [r for r in full["curve"] if r["k"] == 2]
    assert [r["scores"] for r in two] == [r["scores"] for r in small["curve"]]  # the same subsets either way
