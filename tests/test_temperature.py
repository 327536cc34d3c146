"""Temperature scaling: planted over- and under-confident logits, the summary, the HeadModule path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resnet_transfer.head import (
    HeadModule,
    build_head_module,
    calibration_summary,
    fit_temperature,
    nll_rows,
    predict_logits,
    predict_probabilities,
)


def calibrated(n: int = 4000, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z): calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, k))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    return z, y


@pytest.mark.parametrize("factor", [4.0, 1.0, 1 / 3])
def test_fit_temperature_recovers_a_planted_scale(factor: float) -> None:
    z, y = calibrated()
    t = fit_temperature(z * factor, y)  # over-confident (x4), calibrated, under-confident (/3)
    assert t == pytest.approx(factor, rel=0.15)


def test_calibration_summary_improves_an_overconfident_head() -> None:
    z, y = calibrated(seed=1)
    s = calibration_summary(z * 5, y, fit_temperature(z * 5, y))
    assert s["log_loss"]["after"] < s["log_loss"]["before"] - 0.1
    assert s["ece"]["after"] < 0.5 * s["ece"]["before"]
    assert s["temperature"] > 3 and not s["on_bound"]
    assert s["n"] == len(y)


def test_temperature_never_worsens_the_nll_and_defaults_to_one() -> None:
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0)) == 1.0
    z = np.array([[2.0, 0.0], [0.0, 2.0]])
    t = fit_temperature(z, np.array([0, 1]))  # all right: sharpening lowers the NLL, down to the bound
    assert t < 1.0


def test_head_module_applies_temperature_only_in_predict_proba() -> None:
    torch.manual_seed(0)
    m = HeadModule(6, 3)
    x = torch.randn(10, 6)
    with torch.no_grad():
        raw = m(x)
    m.temperature = 2.5
    with torch.no_grad():
        assert torch.equal(m(x), raw)  # forward (training, finetune) stays the raw logits
    torch.testing.assert_close(m.predict_proba(x), torch.softmax(raw / 2.5, 1))
    assert m.config["temperature"] == 2.5
    again = build_head_module(m.config)
    again.load_state_dict(m.state_dict())
    X = x.numpy()
    np.testing.assert_allclose(predict_probabilities(again, X), torch.softmax(raw / 2.5, 1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(predict_logits(again, X), raw.detach().numpy(), rtol=1e-5, atol=1e-6)
    # a head written before temperatures existed: no key, T = 1
    old = {k: v for k, v in m.config.items() if k != "temperature"}
    assert build_head_module(old).temperature == 1.0


def test_nll_rows_at_the_fitted_temperature_ignore_a_change_of_confidence() -> None:
    """What `rt finetune --monitor val_loss_cal` compares: two candidates whose logits differ by a scale
    (the same ranking, other confidence) have the same calibrated loss, while their raw losses differ."""
    z, y = calibrated(n=600, seed=2)
    raw = [float(nll_rows(z * f, y).mean()) for f in (1.0, 4.0)]
    cal = [float(nll_rows(z * f, y, fit_temperature(z * f, y)).mean()) for f in (1.0, 4.0)]
    assert raw[1] > raw[0] + 0.3
    assert cal[1] == pytest.approx(cal[0], abs=2e-3)
    assert nll_rows(z, y).shape == (600,) and float(nll_rows(z, y).min()) >= 0.0
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(nll_rows(z, y), -np.log(p[np.arange(len(y)), y]), rtol=1e-10)
