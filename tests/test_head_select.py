"""Choosing the head's features (final / pooled stages / concatenations) and L2 on validation data.

The selection runs on in-memory candidate matrices; fit-head on a real cache written with the pooled
features of two stages (``CacheWriter(..., pooled_dims=...)``, what `rt extract --pool-stages` stores).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from resnet_transfer.backbone import BackboneIdentity
from resnet_transfer.base import Reporter, UsageError, set_reporter
from resnet_transfer.cache import CacheWriter, FeatureCache
from resnet_transfer.head import (
    CV_BELOW,
    FitHeadConfig,
    build_head_module,
    feature_candidates,
    feature_name,
    fit_head,
    read_model_dir,
    select_features,
)
from resnet_transfer.images import TransformConfig


@pytest.fixture(autouse=True)
def quiet() -> Reporter:
    rep = Reporter(verbose=False)
    prev = set_reporter(rep)
    yield rep
    set_reporter(prev)


def planted(n: int, k: int = 3, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``final``: pure noise; ``layer3``: informative; ``layer4``: weakly informative."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    final = rng.normal(size=(n, 12)).astype(np.float32)
    layer3 = (rng.normal(size=(n, 8)) + 3.0 * np.eye(8)[y]).astype(np.float32)
    layer4 = (rng.normal(size=(n, 6)) + 0.5 * np.eye(6)[y]).astype(np.float32)
    return {"final": final, "layer3": layer3, "layer4": layer4, "layer3+layer4": np.hstack([layer3, layer4])}, y


def test_feature_candidates() -> None:
    assert feature_candidates([], "auto") == [None]
    assert feature_candidates(["layer3", "layer4"], "auto") == [None, ["layer3"], ["layer4"], ["layer3", "layer4"]]
    assert feature_candidates(["layer3", "layer4"], "final") == [None]
    assert feature_candidates(["layer3", "layer4"], "layer4+layer3") == [["layer4", "layer3"]]
    assert feature_name(["layer3", "layer4"]) == "layer3+layer4" and feature_name(None) == "final"
    with pytest.raises(UsageError, match=r"--features 'layer2'.*layer3, layer4"):
        feature_candidates(["layer3", "layer4"], "layer2")
    with pytest.raises(UsageError, match="pool-stages"):
        feature_candidates([], "layer3")


def _split(cands: dict[str, np.ndarray], y: np.ndarray, n_val: int):
    tr, va = np.arange(n_val, len(y)), np.arange(n_val)
    return {k: v[tr] for k, v in cands.items()}, y[tr], {k: v[va] for k, v in cands.items()}, y[va]


def test_tiny_validation_sets_choose_by_cross_validation() -> None:
    cands, y = planted(36)  # 12 per class: a 20% split would hold 7 rows
    train, ytr, val, yva = _split(cands, y, 6)
    sel = select_features(train, ytr, val, yva, {"num_classes": 3})
    assert sel.method == "cv" and "fold" in sel.description
    assert sel.features == ["layer3"] or sel.features == ["layer3", "layer4"]  # never the noise
    names = {t["features"] for t in sel.tried}
    assert names == set(cands)
    full = [t for t in sel.tried if t["features"] == "final"]
    assert len(full) == 9 and all(t["folds"] == 5 for t in full)  # the whole grid, every fold
    best = max(sel.tried, key=lambda t: (t["accuracy"], -t["log_loss"]))
    assert (best["features"], best["l2"]) == (sel.name, sel.l2)
    assert any(r[-1] == "<- chosen" for r in sel.table_rows())


def test_large_validation_sets_choose_on_the_split() -> None:
    cands, y = planted(300, seed=1)
    train, ytr, val, yva = _split(cands, y, CV_BELOW + 30)
    sel = select_features(train, ytr, val, yva, {"num_classes": 3})
    assert sel.method == "split" and sel.name in ("layer3", "layer3+layer4")
    final_acc = max(t["accuracy"] for t in sel.tried if t["features"] == "final")
    chosen_acc = max(t["accuracy"] for t in sel.tried if t["features"] == sel.name)
    assert chosen_acc > final_acc + 0.3  # noise vs. signal


def test_a_fixed_l2_only_chooses_the_features() -> None:
    cands, y = planted(36, seed=2)
    train, ytr, val, yva = _split(cands, y, 6)
    sel = select_features(train, ytr, val, yva, {"num_classes": 3, "l2": 0.01})
    assert sel.l2 == 0.01 and {t["l2"] for t in sel.tried} == {0.01}


# ------------------------------------------------------------------------------------ fit-head, staged


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    """A real cache with the pooled features of two stages (``pooled/<stage>``) and content keys."""
    cands, y = planted(45, seed=3)
    ident = BackboneIdentity("timm:resnet18", "resnet18", "none", "random:seed=0", TransformConfig(64, 73), 12)
    classes = ["a", "b", "c"]
    path = tmp_path / "staged.h5"
    with CacheWriter(path, ident, classes, pooled_dims={"layer3": 8, "layer4": 6}) as w:
        paths = [f"{classes[c]}/{i}.png" for i, c in enumerate(y)]
        pooled = {"layer3": cands["layer3"], "layer4": cands["layer4"]}
        w.write_part(paths, list(y), cands["final"], keys=[f"{i:032x}" for i in range(45)], pooled=pooled)
        w.finalize()
    with FeatureCache(path) as fc:
        assert fc.pooled_stages == ["layer3", "layer4"] and len(fc.keys) == 45
    return path


def test_fit_head_chooses_the_stage_and_records_it(staged: Path, tmp_path: Path, quiet: Reporter) -> None:
    out = tmp_path / "head"
    res = fit_head(FitHeadConfig(cache=staged, out=out))
    sel = res.report["feature_selection"]
    assert sel["method"] == "cv"  # 45 rows: the 20% split holds 9
    assert sel["chosen"] in ("layer3", "layer3+layer4")
    assert {t["features"] for t in sel["tried"]} == {"final", "layer3", "layer4", "layer3+layer4"}
    md = read_model_dir(out)
    assert md.head_config["features"] == res.report["features"] == sel["chosen"].split("+")
    assert md.head_config["in_features"] == {"layer3": 8, "layer3+layer4": 14}[sel["chosen"]]
    assert build_head_module(md.head_config).features == md.head_config["features"]
    if res.report["head_selection"]["chosen"] == "linear":  # the MLP head has its own weight decay
        assert res.report["l2"] == sel["l2"]
    assert res.report["head_selection"]["method"] == "cv"  # the head is chosen on the chosen features
    assert res.report["accuracy"] >= 0.7  # the informative stage, on the 9 held-out rows (chance: 0.33)
    # the recorded split: content keys of train and validation rows, disjoint, covering every row
    split = json.loads((out / "split.json").read_text())
    assert split["seed"] == 0 and split["val_fraction"] == 0.2
    assert len(split["val"]) == res.report["n_val"] == 9 and len(split["train"]) == 36
    assert not set(split["train"]) & set(split["val"])
    keys = FeatureCache(staged).keys
    assert set(split["train"]) | set(split["val"]) == set(keys)


def test_fit_head_features_final_and_plain_caches_change_nothing(staged: Path, tmp_path: Path) -> None:
    res = fit_head(FitHeadConfig(cache=staged, out=tmp_path / "h", features="final"))
    assert "feature_selection" not in res.report and res.report["features"] is None
    assert "features" not in read_model_dir(tmp_path / "h").head_config
    with pytest.raises(UsageError, match="--features"):
        fit_head(FitHeadConfig(cache=staged, out=tmp_path / "h2", features="layer9"))
    with pytest.raises(UsageError, match="memory budget"):  # stage features are fitted in memory
        fit_head(FitHeadConfig(cache=staged, out=tmp_path / "h3", features="layer3", max_memory_gb=1e-9))


def test_cli_features_option(staged: Path, tmp_path: Path) -> None:
    from resnet_transfer.cli import app

    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["fit-head", "--cache", str(staged), "--out", str(out), "--features", "layer4"])
    assert r.exit_code == 0, r.output
    assert "features and l2 tried" in r.output and "layer4" in r.output
    assert read_model_dir(out).head_config["features"] == ["layer4"]
