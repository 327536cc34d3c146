"""Out-of-distribution scorers (head/ood.py, ood_store.py) and where they are used: fit-head, predict, evaluate,
export, finetune, an old head directory without them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from typer.testing import CliRunner

from resnet_transfer.base import ood_metrics
from resnet_transfer.cli import app
from resnet_transfer.head import SCORERS, fit_ood, make_scorer, read_model_dir, read_ood

runner = CliRunner()


def _blobs(n: int, seed: int, shift: float = 0.0, d: int = 16, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points around ``classes`` well separated centres (fixed by seed 0), moved by ``shift``."""
    centres = np.random.default_rng(0).normal(size=(classes, d)) * 4
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return centres[y] + rng.normal(size=(n, d)) + shift, y


def _logits(X: np.ndarray) -> np.ndarray:
    centres = np.random.default_rng(0).normal(size=(3, X.shape[1])) * 4
    return -((X[:, None, :] - centres[None]) ** 2).sum(-1) / 8  # a nearest-centre classifier's logits


# ------------------------------------------------------------------------------------------- the scorers


@pytest.mark.parametrize("name", ["knn", "mahalanobis"])
def test_feature_scorers_score_far_points_higher(name: str) -> None:
    X, y = _blobs(300, 1)
    near, _ = _blobs(100, 2)
    far, _ = _blobs(100, 3, shift=6.0)
    s = make_scorer(name).fit(X, y)
    s_near, s_far = s.score(near, _logits(near)), s.score(far, _logits(far))
    assert ood_metrics(s_near, s_far)["auroc"] > 0.99
    assert np.median(s_far) > np.quantile(s_near, 0.95)


@pytest.mark.parametrize("name", ["energy", "msp"])
def test_logit_scorers_score_unsure_rows_higher(name: str) -> None:
    sure = np.array([[9.0, 0.0, 0.0], [0.0, 8.0, 1.0]])
    unsure = np.array([[0.1, 0.0, 0.0], [1.0, 1.0, 1.0]])
    s = make_scorer(name).fit(np.zeros((2, 4)), np.array([0, 1]))
    assert s.score(None, unsure).min() > s.score(None, sure).max()


def test_knn_is_the_kth_neighbour_on_unit_vectors() -> None:
    X = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    s = make_scorer("knn", k=2).fit(X, np.array([0, 1, 0]))
    q = np.array([[5.0, 0.0]])  # unit (1, 0): cosines 1, 0, 0.707 -> the 2nd nearest has cosine 0.707
    assert s.score(q)[0] == pytest.approx(np.sqrt(2 - 2 * np.sqrt(0.5)), abs=2e-3)  # float16 bank


def test_mahalanobis_shrinkage_matches_scikit_learn() -> None:
    from sklearn.covariance import ledoit_wolf

    X, y = _blobs(40, 4, d=30)  # fewer rows than twice the features: shrinkage matters
    s = make_scorer("mahalanobis").fit(X, y)
    means = np.stack([X[y == c].mean(0) for c in range(3)])
    cov, shrink = ledoit_wolf(X - means[y], assume_centered=True)
    assert s.shrinkage_ == pytest.approx(shrink, rel=1e-6)
    assert np.allclose(np.linalg.inv(s.precision_.astype(np.float64)), cov, rtol=1e-3, atol=1e-4)


def test_ood_metrics_known_answers() -> None:
    m = ood_metrics([0.0, 0.1, 0.2], [1.0, 2.0])
    assert m["auroc"] == 1.0 and m["fpr_at_95_tpr"] == 0.0
    m = ood_metrics([1.0, 2.0], [0.0, 0.1, 0.2])
    assert m["auroc"] == 0.0 and m["fpr_at_95_tpr"] == 1.0


def test_threshold_accepts_95_percent_of_validation_rows() -> None:
    X, y = _blobs(300, 1)
    Xv, _ = _blobs(200, 5)
    model, report = fit_ood(X, y, _logits(X), Xv, _logits(Xv))
    assert set(model.scorers) == set(SCORERS) and report["scorer"] == "knn"
    for name in SCORERS:
        accepted = (model.score(Xv, _logits(Xv), name) <= model.threshold(name)).mean()
        assert 0.95 <= accepted <= 0.96


def test_unknown_examples_choose_the_scorer_that_separates_them() -> None:
    X, y = _blobs(300, 1)
    Xv, _ = _blobs(100, 5)
    far, _ = _blobs(50, 6, shift=40.0)  # far away, yet confidently classified: the logits cannot tell
    _, report = fit_ood(X, y, _logits(X), Xv, _logits(Xv), unknown=(far, _logits(far)))
    assert report["scorer"] in ("knn", "mahalanobis")
    assert report["unknown"]["scorers"]["knn"]["auroc"] > report["unknown"]["scorers"]["msp"]["auroc"]
    assert "AUROC" in report["chosen_by"]


def test_storage_round_trip(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    X, y = _blobs(120, 1)
    Xv, _ = _blobs(50, 5)
    model, _ = fit_ood(X, y, _logits(X), Xv, _logits(Xv))
    arrays, meta = model.state()
    save_file(arrays, str(tmp_path / "ood.safetensors"))
    back = read_ood(tmp_path, {"ood": json.loads(json.dumps(meta))})
    assert back is not None and back.scorer == model.scorer and back.scorers["knn"].bank_.dtype == np.float16
    q, _ = _blobs(20, 9, shift=1.0)
    for name in SCORERS:
        assert np.allclose(back.score(q, _logits(q), name), model.score(q, _logits(q), name), rtol=1e-5)
        assert back.threshold(name) == model.threshold(name)
    assert read_ood(tmp_path, {}) is None


# ---------------------------------------------------------------------------------------------- the CLI


def _ok(*args: object) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.stdout


@pytest.fixture(scope="module")
def unknown_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("unknown"), per_class=4, seed=3, classes=("blob",)) / "blob"


@pytest.fixture(scope="module")
def ood_head(image_folder: Path, unknown_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ood")
    _ok("extract", "--data", image_folder, "--model", "resnet18", "--weights", "none", "--image-size", "32",
        "--out", tmp / "train.h5", "--precision", "fp32")  # fmt: skip
    _ok("fit-head", "--cache", tmp / "train.h5", "--out", tmp / "head", "--ood", unknown_folder)
    return tmp / "head"


def test_fit_head_stores_the_scorers_and_says_which(ood_head: Path) -> None:
    md = read_model_dir(ood_head)
    assert (ood_head / "ood.safetensors").exists() and "ood.safetensors" in md.meta["files"]
    entry = md.meta["ood"]
    assert set(entry["scorers"]) == set(SCORERS) and entry["scorer"] in SCORERS
    report = json.loads((ood_head / "report.json").read_text())["ood"]
    assert report["scorer"] == entry["scorer"] and "--ood" in report["chosen_by"]
    assert set(report["unknown"]["scorers"]) == set(SCORERS)


def test_predict_rows_carry_the_score_in_every_format(ood_head: Path, unknown_folder: Path) -> None:
    rows = json.loads(_ok("predict", ood_head, unknown_folder, "--json", "--precision", "fp32"))["predictions"]
    assert all(isinstance(r["ood_score"], float) and isinstance(r["unknown"], bool) for r in rows)
    threshold = read_model_dir(ood_head).meta["ood"]["threshold"]
    assert all(r["unknown"] == (r["ood_score"] > threshold) for r in rows)
    csv = _ok("predict", ood_head, unknown_folder, "--csv").splitlines()
    assert csv[0].startswith("path,class_1,") and csv[0].endswith(",ood_score,unknown") and len(csv) == 1 + len(rows)
    table = _ok("predict", ood_head, unknown_folder)
    assert "ood score" in table and "unknown" in table


def test_reject_unknown_and_threshold_override(ood_head: Path, unknown_folder: Path) -> None:
    low = json.loads(_ok("predict", ood_head, unknown_folder, "--json", "--reject-unknown", "--ood-threshold", "-1e9"))
    assert all(r["unknown"] and r["prediction"] == "unknown" and r["guess"] for r in low["predictions"])
    high = json.loads(_ok("predict", ood_head, unknown_folder, "--json", "--reject-unknown", "--ood-threshold", "1e9"))
    assert not any(r["unknown"] or r["prediction"] == "unknown" for r in high["predictions"])
    csv = _ok("predict", ood_head, unknown_folder, "--csv", "--reject-unknown", "--ood-threshold", "-1e9")
    assert csv.splitlines()[0].startswith("path,prediction,class_1,")
    assert all(line.split(",")[1] == "unknown" and line.endswith(",true") for line in csv.splitlines()[1:])
    res = runner.invoke(app, ["predict", str(ood_head), str(unknown_folder), "--ood-scorer", "nope"])
    assert res.exit_code == 2 and "nope" in res.output and "mahalanobis" in res.output


def test_evaluate_ood_reports_every_scorer_beside_msp(ood_head: Path, test_folder: Path, unknown_folder: Path, tmp_path: Path) -> None:  # fmt: skip
    out = _ok("evaluate", ood_head, "--data", test_folder, "--ood", unknown_folder, "--json", "--out", tmp_path,
              "--ood-scorer", "mahalanobis")  # fmt: skip
    ood = json.loads(out)["ood"]
    assert ood["scorer"] == "mahalanobis" and set(ood["scorers"]) == set(SCORERS)
    assert ood["auroc"] == ood["scorers"]["mahalanobis"]["auroc"] and 0.0 <= ood["fpr_at_95_tpr"] <= 1.0
    assert ood["n_out"] == 4 and (tmp_path / "ood_scores.png").stat().st_size > 1000
    assert ood["accuracy_accepted"] is None or 0.0 <= ood["accuracy_accepted"] <= 1.0
    text = _ok("evaluate", ood_head, "--data", test_folder, "--ood", unknown_folder)
    assert "out-of-distribution" in text and "msp" in text


def test_onnx_carries_the_score_predict_gives(ood_head: Path, unknown_folder: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch

    from resnet_transfer.head import predict_logits
    from resnet_transfer.models import load_classifier

    md = read_model_dir(ood_head)
    ood = read_ood(ood_head, md.meta)
    for scorer in ("knn", "mahalanobis"):  # the feature scorers in the graph (energy, msp: the logits alone)
        d = tmp_path / scorer
        d.mkdir()
        for f in ood_head.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        meta = json.loads((d / "meta.json").read_text())
        meta["ood"]["scorer"] = scorer
        (d / "meta.json").write_text(json.dumps(meta))
        _ok("export", d, "--format", "onnx")
        side = json.loads((d / "model.onnx.json").read_text())["ood"]
        assert side["in_graph"] and side["scorer"] == scorer and side["output"] == "ood_score"
        pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
        logits, score = ort.InferenceSession(str(d / "model.onnx")).run(None, {"pixels": pixels.numpy()})
        clf, _ = load_classifier(d, normalize=True)
        with torch.no_grad():
            t = md.identity.transform
            x = (pixels - torch.tensor(t.mean).view(1, 3, 1, 1)) / torch.tensor(t.std).view(1, 3, 1, 1)
            feats = clf.pooled(x).numpy()
        z = predict_logits(clf.head, feats)
        want = ood.score(feats, z, scorer)  # what `rt predict` computes
        assert np.allclose(score, want, rtol=1e-3, atol=1e-4) and np.allclose(logits, z, rtol=1e-4, atol=1e-4)
    # the last export against `rt predict` itself, on the same images through the project's own transform
    from resnet_transfer.images import list_images, normalized_batches

    rows = json.loads(_ok("predict", d, unknown_folder, "--json", "--precision", "fp32"))["predictions"]
    t = md.identity.transform
    x = torch.cat([b[0] for b in normalized_batches(list_images(unknown_folder), t, 8, "cpu")])
    pixels = (x * torch.tensor(t.std).view(1, 3, 1, 1) + torch.tensor(t.mean).view(1, 3, 1, 1)).contiguous()
    _, score = ort.InferenceSession(str(d / "model.onnx")).run(None, {"pixels": pixels.numpy()})
    assert np.allclose(score, [r["ood_score"] for r in rows], rtol=1e-3, atol=1e-4)


def test_an_old_head_directory_without_scorers_still_predicts(ood_head: Path, unknown_folder: Path, tmp_path: Path) -> None:  # fmt: skip
    old = tmp_path / "old"
    old.mkdir()
    for f in ood_head.iterdir():
        if f.name != "ood.safetensors":
            (old / f.name).write_bytes(f.read_bytes())
    meta = json.loads((old / "meta.json").read_text())
    del meta["ood"], meta["files"]["ood.safetensors"]
    (old / "meta.json").write_text(json.dumps(meta))
    rows = json.loads(_ok("predict", old, unknown_folder, "--json"))["predictions"]
    assert rows and not any("ood_score" in r or "unknown" in r for r in rows)
    assert "ood score" not in _ok("predict", old, unknown_folder)
    res = runner.invoke(app, ["predict", str(old), str(unknown_folder), "--reject-unknown"])
    assert res.exit_code == 2 and "no out-of-distribution scorer" in res.output and "fit-head" in res.output
    _ok("export", old, "--format", "onnx")
    assert json.loads((old / "model.onnx.json").read_text())["ood"]["in_graph"] is False


def test_finetune_stores_scorers_on_the_final_backbone(image_folder: Path, tmp_path: Path) -> None:
    _ok("finetune", "--data", image_folder, "--model", "resnet18", "--weights", "none", "--unfreeze", "all",
        "--out", tmp_path / "ft", "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--precision", "fp32")  # fmt: skip
    md = read_model_dir(tmp_path / "ft")
    ood = read_ood(md.path, md.meta)
    assert ood is not None and set(ood.scorers) == set(SCORERS)
    report = json.loads((tmp_path / "ft" / "report.json").read_text())["ood"]
    assert report["fitted_on"].startswith("18 training rows") and "validation" in report["threshold_on"]


def test_review_filters_the_rows_unlike_the_training_data(tmp_path: Path) -> None:
    from dataclasses import replace

    from review_data import make_review_set
    from safetensors.numpy import save_file

    from resnet_transfer.base import UsageError
    from resnet_transfer.tools.review import ReviewConfig, build_state
    from resnet_transfer.tools.review.state import Query

    rs = make_review_set(tmp_path, audit=False)
    cfg = ReviewConfig(cache=rs.cache, head=rs.head, root=rs.root, manifest=tmp_path / "fixes.csv")
    with pytest.raises(UsageError, match="no out-of-distribution scorer"):
        build_state(cfg).select(Query(verdict="unknown"))
    labelled = np.array([i for i, c in enumerate(rs.labels) if c >= 0])
    model, _ = fit_ood(rs.X[labelled], np.array(rs.labels)[labelled], _logits(rs.X[labelled]), None, None)
    scores = model.score(rs.X, None, "knn")
    model.thresholds["knn"] = float(np.sort(scores)[-2])  # exactly one row above it: the farthest
    arrays, meta = model.state()
    save_file(arrays, str(rs.head / "ood.safetensors"))
    head_meta = json.loads((rs.head / "meta.json").read_text())
    (rs.head / "meta.json").write_text(json.dumps({**head_meta, "ood": meta}))
    rows = build_state(replace(cfg, manifest=tmp_path / "fixes2.csv")).select(Query(verdict="unknown"))
    assert rows.tolist() == [int(np.argmax(scores))]


def test_info_names_the_scorer(ood_head: Path) -> None:
    info = json.loads(_ok("info", ood_head, "--json"))
    assert info["ood"]["scorer"] in SCORERS and sorted(info["ood"]["scorers"]) == sorted(SCORERS)
