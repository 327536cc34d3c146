"""Temperature scaling of a head's logits (Guo et al. 2017), fitted on validation rows.

:func:`fit_temperature` finds ``T > 0`` minimising the mean negative log-likelihood of
``softmax(logits / T)`` (a bounded 1-D search on ``log T``); ``T > 1`` softens an over-confident head,
``T < 1`` sharpens an under-confident one, and the predicted class never changes.
:func:`calibration_summary` reports validation log-loss and expected calibration error before and after
through calibration.py (the package's one ECE), in the format `rt evaluate` uses.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# the search interval for T; an optimum on a bound is reported (it usually means too few or too easy rows)
T_MIN, T_MAX = 0.05, 20.0


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    return float(nll_rows(logits, y, t).mean())


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


def nll_rows(logits: Any, y: Any, temperature: float = 1.0) -> np.ndarray:
    """Each row's negative log-likelihood under ``softmax(logits / temperature)`` (``y``: column indices);
    at :func:`fit_temperature`'s ``T`` their mean is the loss the calibrated model has on those rows."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    yi = np.asarray(y, dtype=np.int64)
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -logp[np.arange(len(yi)), yi]


def calibration_summary(logits: Any, y: Any, temperature: float) -> dict[str, Any]:
    """Validation log-loss and ECE at ``T = 1`` and at ``temperature`` (``y``: column indices), in
    calibration.py's report format (``log_loss``/``ece`` before and after, reliability tables), plus
    ``n`` and ``on_bound`` (the temperature sits on its search interval's edge)."""
    from .calibration import calibration_report

    report = calibration_report(np.asarray(y, dtype=np.int64), np.asarray(logits, dtype=np.float64), temperature)
    report["n"] = len(np.asarray(y))
    report["on_bound"] = not (T_MIN * 1.01 < temperature < T_MAX / 1.01)
    return report
