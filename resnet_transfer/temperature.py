"""Temperature scaling of a head's logits (Guo et al. 2017), fitted on validation rows.

:func:`fit_temperature` finds ``T > 0`` minimising the mean negative log-likelihood of
``softmax(logits / T)`` (a bounded 1-D search on ``log T``); ``T > 1`` softens an over-confident head,
``T < 1`` sharpens an under-confident one, and the predicted class never changes.
:func:`calibration_summary` reports validation log-loss (scikit-learn's ``log_loss``) and expected
calibration error before and after. :func:`expected_calibration_error` is the one ECE of the package
until calibration.py (h-tools) lands; the lead folds the two.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# the search interval for T; an optimum on a bound is reported (it usually means too few or too easy rows)
T_MIN, T_MAX = 0.05, 20.0
ECE_BINS = 15


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    z = logits / t
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def fit_temperature(logits: Any, y: Any) -> float:
    """The temperature in [``T_MIN``, ``T_MAX``] minimising the validation NLL of ``softmax(logits / T)``;
    ``y`` are column indices of ``logits``. 1.0 when it does not lower the NLL (or there are no rows)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    yi = np.asarray(y, dtype=np.int64)
    if z.ndim != 2 or len(z) == 0 or len(yi) != len(z):
        return 1.0
    res = minimize_scalar(
        lambda u: _nll(z, yi, math.exp(u)),
        bounds=(math.log(T_MIN), math.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-4},
    )
    t = float(math.exp(res.x))
    return t if _nll(z, yi, t) < _nll(z, yi, 1.0) else 1.0


def expected_calibration_error(probabilities: Any, y: Any, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 confidence: the share-weighted mean over ``n_bins`` equal-
    width confidence bins of ``|accuracy - mean confidence|`` (``y``: column indices)."""
    p = np.asarray(probabilities, dtype=np.float64)
    yi = np.asarray(y, dtype=np.int64)
    if len(p) == 0:
        return float("nan")
    conf = p.max(1)
    correct = (p.argmax(1) == yi).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        sel = bins == b
        ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def calibration_summary(logits: Any, y: Any, temperature: float, num_classes: int | None = None) -> dict[str, Any]:
    """Validation log-loss and ECE at ``T = 1`` and at ``temperature`` (``y``: column indices)."""
    from sklearn.metrics import log_loss

    z = np.asarray(logits, dtype=np.float64)
    yi = np.asarray(y, dtype=np.int64)
    labels = list(range(num_classes if num_classes is not None else z.shape[1]))
    before, after = _softmax(z), _softmax(z / temperature)
    return {
        "temperature": float(temperature),
        "n": len(yi),
        "log_loss_before": float(log_loss(yi, before, labels=labels)),
        "log_loss_after": float(log_loss(yi, after, labels=labels)),
        "ece_before": expected_calibration_error(before, yi),
        "ece_after": expected_calibration_error(after, yi),
        "ece_bins": ECE_BINS,
        "on_bound": not (T_MIN * 1.01 < temperature < T_MAX / 1.01),
    }
