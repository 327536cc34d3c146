"""`rt fit-head`, `rt predict`, `rt evaluate` end to end on generated images (random-init ResNet-18 at 64 px).

One cache per session: the random backbone gives weak but real features, and the classes differ in colour
and shape, so a head on them must beat chance (1/3) on held-out images by a wide margin.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from typer.testing import CliRunner

from resnet_transfer.backbone import BackboneIdentity
from resnet_transfer.base import DataError, IdentityMismatch, Reporter, UsageError, set_reporter
from resnet_transfer.cache import CacheWriter, ExtractConfig, FeatureCache, extract
from resnet_transfer.cli import app
from resnet_transfer.head import FitHeadConfig, fit_head
from resnet_transfer.images import TransformConfig
from resnet_transfer.models import EvaluateConfig, PredictConfig, evaluate, predict

runner = CliRunner()
SIZE = 64


@pytest.fixture(scope="session")
def train_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 images per class (the 8-per-class `image_folder` leaves too few rows for a validation split)."""
    return make_image_folder(tmp_path_factory.mktemp("train20"), per_class=20, seed=0)


def _extract(data: Path, out: Path) -> Path:
    extract(ExtractConfig(data=data, out=out, model="resnet18", weights="none", image_size=SIZE))
    return out


@pytest.fixture(scope="session")
def train_cache(train_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _extract(train_folder, tmp_path_factory.mktemp("c") / "train.h5")


@pytest.fixture(scope="session")
def test_cache(test_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _extract(test_folder, tmp_path_factory.mktemp("c") / "test.h5")


@pytest.fixture(scope="session")
def head_dir(train_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("h") / "head"
    fit_head(FitHeadConfig(cache=train_cache, out=out, classes=3))
    return out


@pytest.fixture
def reporter() -> Reporter:
    rep = Reporter(verbose=False)
    prev = set_reporter(rep)
    yield rep
    set_reporter(prev)


def test_head_directory_holds_everything_to_predict(head_dir: Path, train_cache: Path) -> None:
    meta = json.loads((head_dir / "meta.json").read_text())
    assert meta["kind"] == "head" and meta["classes"] == ["circle", "square", "triangle"]
    assert meta["identity"] == FeatureCache(train_cache).identity.to_dict()
    assert meta["head"]["type"] == "linear" and meta["head"]["in_features"] == 512
    assert (head_dir / "head.safetensors").exists()
    report = json.loads((head_dir / "report.json").read_text())
    assert report["n_train"] + report["n_val"] == 60 and report["n_val"] == 12
    assert 0.0 <= report["accuracy"] <= 1.0
    assert set(report["per_class"]) == {"circle", "square", "triangle"}
    assert set(report["per_class"]["circle"]) == {"precision", "recall", "f1", "support"}
    assert sum(report["per_class"][c]["support"] for c in report["classes"]) == 12
    cm = np.asarray(report["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 12
    assert report["accuracy"] == pytest.approx(np.trace(cm) / 12)
    assert report["l2"] > 0 and report["l2_path"] and report["solver"] == "lbfgs"
    assert report["seconds"] > 0
    png = (head_dir / "confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_head_predicts_held_out_images_well_above_chance(head_dir: Path, test_folder: Path) -> None:
    res = evaluate(EvaluateConfig(head_dir, data=test_folder))
    assert res.report["n"] == 18
    assert res.report["accuracy"] >= 0.7  # chance is 1/3
    pred = predict(PredictConfig(head_dir, [test_folder], top=2))
    assert len(pred.rows) == 18 and not pred.skipped
    acc = np.mean([Path(r["path"]).parent.name == r["prediction"] for r in pred.rows])
    assert acc == pytest.approx(res.report["accuracy"])
    row = pred.rows[0]
    assert len(row["top"]) == 2 and row["top"][0][1] >= row["top"][1][1]
    np.testing.assert_allclose(pred.probabilities.sum(1), 1.0, rtol=1e-5)


def test_evaluate_on_cache_matches_images(head_dir: Path, test_cache: Path, test_folder: Path) -> None:
    by_cache = evaluate(EvaluateConfig(head_dir, cache=test_cache)).report
    by_images = evaluate(EvaluateConfig(head_dir, data=test_folder)).report
    # the same backbone, transform and precision: the same decisions on (nearly) every image
    assert abs(by_cache["accuracy"] - by_images["accuracy"]) <= 1 / 18 + 1e-9
    assert by_cache["n"] == 18


def test_tta_shapes_and_probabilities(head_dir: Path, test_folder: Path) -> None:
    files = sorted((test_folder / "circle").iterdir())[:3]
    plain = predict(PredictConfig(head_dir, files, top=3))
    for mode in ("flip", "tencrop"):
        res = predict(PredictConfig(head_dir, files, top=3, tta=mode))
        assert res.probabilities.shape == (3, 3)
        np.testing.assert_allclose(res.probabilities.sum(1), 1.0, rtol=1e-5)
        assert not np.allclose(res.probabilities, plain.probabilities)  # the views do change the average
    with pytest.raises(UsageError, match="--tta"):
        predict(PredictConfig(head_dir, files, tta="rotate"))


def test_predict_skips_unreadable_images(head_dir: Path, test_folder: Path, tmp_path: Path, reporter: Reporter) -> None:
    good = sorted((test_folder / "square").iterdir())[0]
    shutil.copy(good, tmp_path / good.name)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "empty.png").write_bytes(b"")
    res = predict(PredictConfig(head_dir, [tmp_path]))
    assert len(res.rows) == 1 and Path(res.rows[0]["path"]).name == good.name
    assert sorted(Path(p).name for p, _ in res.skipped) == ["broken.jpg", "empty.png"]
    assert any("could not be read" in w for w in reporter.warnings)


def test_class_count_mismatch_lists_the_classes(train_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as exc:
        fit_head(FitHeadConfig(cache=train_cache, out=tmp_path / "h", classes=2))
    msg = str(exc.value)
    assert "--classes 2" in msg and "3 classes" in msg
    assert "circle (20)" in msg and "square (20)" in msg and "triangle (20)" in msg
    assert not (tmp_path / "h").exists()


def test_classes_omitted_are_taken_from_the_cache(train_cache: Path, tmp_path: Path) -> None:
    res = fit_head(FitHeadConfig(cache=train_cache, out=tmp_path / "h", solver="adamw", lr=1e-2))
    assert res.report["classes"] == ["circle", "square", "triangle"]
    assert res.report["solver"] == "adamw" and res.report["history"]


def _tiny_cache(path: Path, counts: dict[str, int], dim: int = 8) -> Path:
    ident = BackboneIdentity("timm:resnet18", "resnet18", "none", "random:seed=0", TransformConfig(64, 73), dim)
    classes = list(counts)
    rng = np.random.default_rng(0)
    paths, labels, feats = [], [], []
    for i, (c, n) in enumerate(counts.items()):
        for j in range(n):
            paths.append(f"{c}/{j}.png")
            labels.append(i)
            feats.append(rng.normal(size=dim) + 4 * np.eye(dim)[i])
    with CacheWriter(path, ident, classes) as w:
        w.write_part(paths, labels, np.maximum(np.asarray(feats, np.float32), 0))
        w.finalize()
    return path


def test_tiny_classes_warn_never_crash(tmp_path: Path, reporter: Reporter) -> None:
    cache = _tiny_cache(tmp_path / "t.h5", {"a": 6, "b": 5, "c": 1, "d": 0})
    res = fit_head(FitHeadConfig(cache=cache, out=tmp_path / "h"))
    text = " ".join(res.warnings)
    assert "'c'" in text and "single image" in text
    assert "'d'" in text and "never predict" in text
    assert res.report["class_counts"] == {"a": 6, "b": 5, "c": 1, "d": 0}
    assert res.report["per_class"]["c"]["support"] == 0  # nothing of c was held out
    assert (tmp_path / "h" / "meta.json").exists()


def test_too_few_rows_for_validation_still_fits(tmp_path: Path, reporter: Reporter) -> None:
    cache = _tiny_cache(tmp_path / "t.h5", {"a": 1, "b": 1})
    res = fit_head(FitHeadConfig(cache=cache, out=tmp_path / "h"))
    assert res.report["accuracy"] is None and res.report["n_val"] == 0
    assert any("too few images" in w for w in res.warnings)
    assert not (tmp_path / "h" / "confusion.png").exists()


def test_a_single_class_is_a_clear_error(tmp_path: Path) -> None:
    cache = _tiny_cache(tmp_path / "t.h5", {"a": 5, "b": 0})
    with pytest.raises(DataError, match="at least 2 classes"):
        fit_head(FitHeadConfig(cache=cache, out=tmp_path / "h"))


def test_separate_validation_cache(train_cache: Path, test_cache: Path, tmp_path: Path) -> None:
    res = fit_head(FitHeadConfig(cache=train_cache, val=test_cache, out=tmp_path / "h", class_weight="balanced"))
    assert res.report["n_train"] == 60 and res.report["n_val"] == 18
    assert res.report["validation"] == str(test_cache)
    assert res.report["accuracy"] >= 0.7


def test_identity_mismatch_is_refused(head_dir: Path, train_cache: Path, tmp_path: Path) -> None:
    other = _tiny_cache(tmp_path / "other.h5", {"circle": 4, "square": 4, "triangle": 4})
    with pytest.raises(IdentityMismatch, match="another backbone"):
        evaluate(EvaluateConfig(head_dir, cache=other))
    with pytest.raises(IdentityMismatch):
        fit_head(FitHeadConfig(cache=train_cache, val=other, out=tmp_path / "h"))


def test_out_directory_is_not_clobbered(train_cache: Path, head_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--overwrite"):
        fit_head(FitHeadConfig(cache=train_cache, out=head_dir))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        fit_head(FitHeadConfig(cache=train_cache, out=tmp_path / "busy"))


def test_streaming_fit_when_over_the_memory_budget(train_cache: Path, tmp_path: Path, reporter: Reporter) -> None:
    with FeatureCache(train_cache) as fc:
        f16 = fc.n * fc.dim * 2  # the stored rows fit the budget, a float32 copy of them does not
    budget = 1.5 * f16 / 1e9
    res = fit_head(FitHeadConfig(cache=train_cache, out=tmp_path / "h", max_memory_gb=budget, lr=1e-2))
    assert res.report["streamed"] and res.report["solver"] == "adamw"
    assert any("streaming" in w for w in res.warnings)
    assert res.report["accuracy"] >= 0.5
    knn = res.report["knn"]  # a streamed head still gets its kNN: it reads the rows as stored (float16)
    assert "skipped" not in knn and knn["search"]["path"] == "exact" and 0.0 <= knn["accuracy"] <= 1.0
    tiny = fit_head(FitHeadConfig(cache=train_cache, out=tmp_path / "t", max_memory_gb=1e-6, lr=1e-2))
    assert "--max-memory-gb" in tiny.report["knn"]["skipped"]  # says why, and how to see it


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_fit_predict_evaluate(train_cache: Path, test_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-head"
    r = runner.invoke(app, ["fit-head", "--cache", str(train_cache), "--classes", "3", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{") :])["n_val"] == 12
    r = runner.invoke(app, ["predict", str(out), str(test_folder / "circle"), "--top", "2", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout[r.stdout.index("{") :])
    assert len(data["predictions"]) == 6 and len(data["predictions"][0]["top"]) == 2
    r = runner.invoke(app, ["predict", str(out), str(test_folder / "square"), "--csv"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert lines[0].startswith("path,class_1,probability_1") and len(lines) == 7
    r = runner.invoke(app, ["predict", str(out), str(test_folder / "square")])
    assert r.exit_code == 0 and "#1" in r.stdout
    r = runner.invoke(app, ["evaluate", str(out), "--data", str(test_folder)])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("accuracy: ")
    assert "precision" in r.stdout and "confusion matrix" in r.stdout
    r = runner.invoke(app, ["evaluate", str(out), "--data", str(test_folder), "--json"])
    rep = json.loads(r.stdout[r.stdout.index("{") :])
    assert rep["n"] == 18 and rep["accuracy"] >= 0.7


def test_cli_errors_are_one_line(train_cache: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["fit-head", "--cache", str(train_cache), "--classes", "5", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2
    assert "error: --classes 5" in r.output and "circle (20)" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["evaluate", str(tmp_path / "nothing"), "--data", str(tmp_path)])
    assert r.exit_code == 2 and "error:" in r.output


def test_cli_help_teaches() -> None:
    for cmd in ("fit-head", "predict", "evaluate"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "Examples" in r.output and f"rt {cmd}" in r.output


# -------------------------------------------------------------------------------------------- temperature


def test_fit_head_calibrates_on_validation(head_dir: Path) -> None:
    report = json.loads((head_dir / "report.json").read_text())
    meta = json.loads((head_dir / "meta.json").read_text())
    cal = report["calibration"]
    assert cal["n"] == report["n_val"] == 12
    assert cal["temperature"] == report["temperature"] == meta["head"].get("temperature", 1.0) > 0
    assert cal["log_loss"]["after"] <= cal["log_loss"]["before"] + 1e-9  # T minimises exactly this
    for key in ("before", "after"):
        assert 0.0 <= cal["ece"][key] <= 1.0


def test_an_overconfident_head_gets_a_temperature_above_one(tmp_path: Path, reporter: Reporter) -> None:
    """Overlapping classes, a nearly unregularised head: confident on the training rows, often wrong on
    the validation rows; the temperature must soften it and lower the validation log-loss."""
    ident = BackboneIdentity("timm:resnet18", "resnet18", "none", "random:seed=0", TransformConfig(64, 73), 16)
    rng = np.random.default_rng(3)
    y = np.arange(240) % 3
    X = np.maximum(rng.normal(size=(240, 16)) + 0.6 * np.eye(16)[y], 0).astype(np.float32)
    with CacheWriter(tmp_path / "c.h5", ident, ["a", "b", "c"]) as w:
        w.write_part([f"{c}/{i}.png" for i, c in enumerate(np.array(["a", "b", "c"])[y])], list(y), X)
        w.finalize()
    res = fit_head(FitHeadConfig(cache=tmp_path / "c.h5", out=tmp_path / "h", l2=1e-6, val_fraction=0.5))
    cal = res.report["calibration"]
    assert cal["temperature"] > 1.5
    assert cal["log_loss"]["after"] < cal["log_loss"]["before"] - 0.1
    assert cal["ece"]["after"] < cal["ece"]["before"]


def test_predict_uses_the_recorded_temperature(head_dir: Path, test_folder: Path, tmp_path: Path) -> None:
    from resnet_transfer.head import HEAD_FILE, read_model_dir, write_model_dir

    md = read_model_dir(head_dir)

    def with_temperature(t: float) -> Path:
        return write_model_dir(
            tmp_path / f"t{t:g}",
            kind="head",
            identity=md.identity,
            classes=md.classes,
            head_config={**md.head_config, "temperature": t},
            tensors={HEAD_FILE: md.load_tensors(HEAD_FILE)},
        )

    files = sorted((test_folder / "circle").iterdir())[:3]
    flat = predict(
        PredictConfig(with_temperature(1000.0), files, top=3)
    ).probabilities  # unsaturated: reveals the logits
    warm = predict(PredictConfig(with_temperature(3.0), files, top=3)).probabilities
    z = np.log(flat) * 1000.0  # the logits up to a per-row constant
    expect = np.exp((z - z.max(1, keepdims=True)) / 3.0)
    np.testing.assert_allclose(warm, expect / expect.sum(1, keepdims=True), rtol=1e-3, atol=1e-5)
    assert flat.max() < 0.5 and not np.allclose(flat, warm)


def test_two_class_head_fits_with_its_knn_baseline(tmp_path: Path, reporter: Reporter) -> None:
    """Two classes: scikit-learn's decision_function is then (n,), the kNN beside the fit must not use it."""
    cache = _tiny_cache(tmp_path / "t.h5", {"a": 10, "b": 10})
    res = fit_head(FitHeadConfig(cache=cache, out=tmp_path / "h"))
    assert res.report["accuracy"] is not None and res.report["calibration"]["n"] == res.report["n_val"]
    assert "accuracy" in res.report["knn"] or "skipped" in res.report["knn"]
