"""Calibration: ECE / reliability on constructed probabilities, an overconfident head whose recorded
temperature brings ECE down in `rt evaluate`, and the `uncertain` marking of `--min-confidence`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from planted import write_cache, write_head
from typer.testing import CliRunner

from resnet_transfer.base import UsageError
from resnet_transfer.cli import app
from resnet_transfer.head import (
    UNCERTAIN,
    calibration_report,
    expected_calibration_error,
    log_loss,
    mark_uncertain,
    reliability,
    softmax,
)
from resnet_transfer.models import EvaluateConfig, evaluate

runner = CliRunner()


def test_ece_is_the_gap_between_confidence_and_accuracy() -> None:
    probs = np.tile([0.8, 0.2], (100, 1))
    calibrated = np.r_[np.zeros(80), np.ones(20)].astype(int)  # 80% right at confidence 0.8
    coin = np.r_[np.zeros(50), np.ones(50)].astype(int)  # 50% right at confidence 0.8
    assert expected_calibration_error(calibrated, probs) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(coin, probs) == pytest.approx(0.8 - 0.5)
    r = reliability(coin, probs, n_bins=10)
    assert sum(r["count"]) == 100 and r["count"][8] == 100  # 0.8 falls in the bin [0.8, 0.9)
    assert r["accuracy"][8] == pytest.approx(0.5) and r["accuracy"][0] is None


def test_log_loss_is_the_mean_negative_log_likelihood() -> None:
    rng = np.random.default_rng(0)
    p = softmax(rng.normal(size=(50, 3)))
    y = rng.integers(0, 3, 50)
    assert log_loss(y, p) == pytest.approx(-np.mean(np.log(p[np.arange(50), y])))


def _overconfident(tmp_path: Path, sharpen: float = 4.0) -> tuple[Path, Path]:
    """Labels drawn from softmax(z) (calibrated by construction); the head outputs sharpen * z and records
    temperature = sharpen, which undoes it exactly."""
    rng = np.random.default_rng(1)
    z = rng.normal(scale=1.5, size=(3000, 4))
    p = softmax(z)
    y = (rng.random((len(p), 1)) < p.cumsum(1)).argmax(1)
    classes = ["a", "b", "c", "d"]
    cache = write_cache(tmp_path / "test.h5", sharpen * z, y, classes)
    head = write_head(tmp_path / "head", np.eye(4), np.zeros(4), classes, temperature=sharpen)
    return cache, head


def test_overconfident_head_ece_drops_after_temperature(tmp_path: Path) -> None:
    cache, head = _overconfident(tmp_path)
    rep = evaluate(EvaluateConfig(head, cache=cache, out=tmp_path / "eval")).report
    cal = rep["calibration"]
    assert cal["temperature"] == 4.0
    assert cal["ece"]["before"] > 0.1 and cal["ece"]["after"] < cal["ece"]["before"] / 3
    assert cal["log_loss"]["after"] < cal["log_loss"]["before"]
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["calibration"]["ece"] == cal["ece"]


def test_evaluate_prints_log_loss_and_ece(tmp_path: Path) -> None:
    cache, head = _overconfident(tmp_path)
    res = runner.invoke(app, ["evaluate", str(head), "--cache", str(cache), "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    assert "log-loss" in res.output and "ECE" in res.output and "T=4" in res.output
    assert "reliability.png" in res.output


def test_calibration_report_with_temperature_one_is_unchanged() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(40, 3))
    y = rng.integers(0, 3, 40)
    r = calibration_report(y, logits, 1.0)
    assert r["ece"]["before"] == r["ece"]["after"] and r["log_loss"]["before"] == r["log_loss"]["after"]
    with pytest.raises(UsageError):
        softmax(logits, 0.0)


def test_mark_uncertain_replaces_low_confidence_predictions() -> None:
    rows = [{"prediction": "cat", "probability": 0.9}, {"prediction": "dog", "probability": 0.4}]
    assert mark_uncertain(rows, 0.5) == 1
    assert rows[0]["prediction"] == "cat" and rows[0]["uncertain"] is False
    assert rows[1]["prediction"] == UNCERTAIN and rows[1]["guess"] == "dog" and rows[1]["uncertain"] is True
    assert mark_uncertain(rows, None) == 0
    with pytest.raises(UsageError):
        mark_uncertain(rows, 1.5)
