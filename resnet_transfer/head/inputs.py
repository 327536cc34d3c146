"""What :class:`SoftmaxHead` accepts: feature arrays and labels checked the way scikit-learn checks them,
and the errors (``UsageError`` subclasses that are also the ``ValueError``/``TypeError``/``NotFittedError``
scikit-learn's tools expect) that name the bad argument."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse
from sklearn.exceptions import NotFittedError
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d

from ..base import UsageError


class HeadInputError(UsageError, ValueError):
    """A bad parameter or array given to :class:`SoftmaxHead` (a ``UsageError`` and a ``ValueError``)."""


class HeadInputTypeError(HeadInputError, TypeError):
    """An array that cannot be read as numbers at all (also a ``TypeError``, as numpy raises)."""


class HeadNotFittedError(UsageError, NotFittedError):
    """``predict`` & co. on a :class:`SoftmaxHead` that was not fitted (scikit-learn's ``NotFittedError``)."""


def check_features(X: Any, name: str = "X", dim: int | None = None) -> np.ndarray:
    """``X`` as a C-contiguous float32 (n, d) array of finite values, or a :class:`HeadInputError` naming it."""
    if scipy.sparse.issparse(X):
        raise HeadInputError(f"{name}: sparse input is not supported", f"pass {name}.toarray()")
    if np.iscomplexobj(np.asarray(X)):
        raise HeadInputError(f"{name}: Complex data not supported", f"pass the real features as {name}")
    try:
        arr = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise HeadInputTypeError(
            f"{name}: cannot be read as a float array ({exc})", f"pass {name} as an (n, d) array"
        ) from exc
    if arr.ndim != 2:
        raise HeadInputError(
            f"{name}: expected a 2-d array (n_samples, n_features), got shape {arr.shape}",
            "Reshape your data: X.reshape(-1, 1) for a single feature, X.reshape(1, -1) for a single row",
        )
    if arr.shape[0] == 0:
        raise HeadInputError(f"{name}: no rows")
    if arr.shape[1] == 0:
        raise HeadInputError(f"{name}: 0 feature(s) (shape={arr.shape}) while a minimum of 1 is required.")
    if dim is not None and arr.shape[1] != dim:
        raise HeadInputError(
            f"{name}: {arr.shape[1]} features, the head expects {dim}",
            f"use features of the same backbone and stages (X has {arr.shape[1]} features, but SoftmaxHead "
            f"is expecting {dim} features as input)",
        )
    if not np.isfinite(arr).all():
        raise HeadInputError(f"{name}: contains NaN or infinite values", "re-extract the features or drop those rows")
    arr = np.ascontiguousarray(arr)
    return arr if arr.flags.writeable else arr.copy()  # torch.from_numpy wants writeable memory


def check_labels(y: Any, name: str = "y", n: int | None = None) -> np.ndarray:
    """``y`` as a 1-d array of class labels (a column vector is flattened with a warning, as in scikit-learn)."""
    if y is None:
        raise HeadInputError(f"{name}: SoftmaxHead requires y to be passed, but the target y is None")
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = column_or_1d(arr, warn=True)
    if arr.ndim != 1:
        raise HeadInputError(f"{name}: expected a 1-d array of labels, got shape {arr.shape}")
    if n is not None and len(arr) != n:
        raise HeadInputError(f"{name}: {len(arr)} labels for {n} rows", "give one label per row of the features")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        what = "NaN" if np.isnan(arr).any() else "infinity or a value too large for dtype('float64')"
        raise HeadInputError(f"{name}: Input y contains {what}.")
    try:
        check_classification_targets(arr)
    except ValueError as exc:
        raise HeadInputError(
            f"{name}: {exc}", "give class labels (integers or strings), not continuous values"
        ) from exc
    return arr
