"""`SoftmaxHead`: a scikit-learn classifier (``BaseEstimator`` + ``ClassifierMixin``) that fits a HeadModule.

Its parameters are declared once, in ``__init__`` (``get_params``, ``set_params``, ``clone``, ``repr`` and
``FitHeadConfig`` derive from that signature); its fitted state ends in ``_`` (``classes_``,
``n_features_in_``, ``module_``, ``l2_``, ``path_``, ``history_``, ``n_iter_``, ...). It works in
``cross_val_score``, ``GridSearchCV`` and ``Pipeline``, and passes scikit-learn's estimator checks except
the few listed (with reasons) in tests/test_head.py.

* ``lbfgs`` (default): full-batch L-BFGS on the (class-weighted, label-smoothed) cross-entropy plus
  ``l2/2 * ||W||^2`` in standardised feature space. With ``l2=None`` the strength is chosen on a validation
  split from a grid, walking the grid from strong to weak regularisation with warm starts (the
  linear-probe protocol); the selection runs on a subsample of large training sets, then the chosen
  strength is fitted on all rows (and, when the split was internal, on train + validation).
* ``adamw``: minibatch AdamW with early stopping on the validation loss; :meth:`SoftmaxHead.fit_chunks`
  streams the training rows (e.g. ``FeatureCache.iter_chunks``) when they do not fit in memory.
* ``onecycle``: minibatch AdamW under a fixed one-cycle schedule for ``epochs`` (fastai's way of
  training a head; ``l2`` is the weight decay, default 0.01). With ``hidden=512, dropout=0.5,
  norm="batch"`` it trains fastai's head on the pooled features (``rt fit-head --head mlp``).
* ``sklearn``: scikit-learn's ``LogisticRegression`` (lbfgs) on the standardised features, the reference.

The numerical work is in head_solvers.py. Bad parameters or data raise :class:`HeadInputError`, a
``UsageError`` naming the argument that is also a ``ValueError`` (what scikit-learn's tools expect).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from ..base import get_reporter
from ..images import stratified_split
from . import minibatch as mb
from . import solvers as hs
from .inputs import (
    HeadInputError,
    HeadNotFittedError,
    check_features,
    check_labels,
)
from .module import NORMS, HeadModule, predict_logits, predict_probabilities, set_standardisation

DEFAULT_L2_GRID = hs.DEFAULT_L2_GRID
DEFAULT_L2 = hs.DEFAULT_L2
SOLVERS = hs.SOLVERS
ONECYCLE_WEIGHT_DECAY = 0.01  # fastai's default (decoupled, true weight decay)


class SoftmaxHead(ClassifierMixin, BaseEstimator):
    """A softmax (multinomial logistic) head on feature vectors.

    Parameters
    ----------
    solver: ``lbfgs`` | ``adamw`` | ``sklearn`` (see the module docstring).
    l2: L2 strength on the weights (mean loss + ``l2/2 ||W||^2`` on standardised features); ``None``
        chooses it from ``l2_grid`` on validation data (lbfgs, sklearn); for adamw it is the decoupled
        weight decay (default 1e-4).
    hidden, dropout: ``hidden > 0`` makes a one-hidden-layer MLP (lbfgs, adamw or onecycle).
    norm: ``none`` or ``batch`` (BatchNorm before each linear layer, dropout/2 on the input: fastai's
        head; needs ``hidden`` and solver adamw or onecycle).
    class_weight: ``None``, ``"balanced"`` (n / (k * n_c)), or a ``{label: weight}`` dict.
    label_smoothing: in [0, 1).
    max_iter, path_iter: L-BFGS iterations of the final fit and per grid point; ``None``: 100 / 30 for
        small problems, 8 / 5 (warm-started) when rows x features >= 10M, where each iteration is costly.
    path_patience: the L2 walk stops after this many grid points in a row worse than the best; ``None``
        walks the whole grid (what cross-validation over the grid needs).
    precision: ``auto`` (bf16 matmuls for large linear L-BFGS fits on CPUs with native bf16), ``fp32``,
        ``bf16``.
    epochs, batch_size, lr, patience: AdamW settings (early stopping after ``patience`` epochs without a
        lower validation loss; the best epoch is kept); onecycle runs exactly ``epochs``.
    val_fraction: the stratified validation share taken from the training rows when ``fit`` gets no
        ``X_val`` and needs one. ``refit``: after choosing ``l2`` on such an internal split, fit again on
        all rows.
    num_classes: fix the outputs to labels ``0..num_classes-1`` (classes absent from ``y`` get outputs
        too); default: the sorted unique labels of ``y``.
    seed: every random choice (split, subsample, minibatch order, init).
    """

    def __init__(
        self,
        solver: str = "lbfgs",
        *,
        l2: float | None = None,
        l2_grid: tuple[float, ...] = DEFAULT_L2_GRID,
        hidden: int = 0,
        dropout: float = 0.0,
        norm: str = "none",
        class_weight: str | dict[Any, float] | None = None,
        label_smoothing: float = 0.0,
        max_iter: int | None = None,
        path_iter: int | None = None,
        path_patience: int | None = 2,
        precision: str = "auto",
        epochs: int = 100,
        batch_size: int = 256,
        lr: float = 1e-3,
        patience: int = 5,
        val_fraction: float = 0.2,
        refit: bool = True,
        num_classes: int | None = None,
        seed: int = 0,
    ) -> None:
        self.solver = solver
        self.l2 = l2
        self.l2_grid = l2_grid
        self.hidden = hidden
        self.dropout = dropout
        self.norm = norm
        self.class_weight = class_weight
        self.label_smoothing = label_smoothing
        self.max_iter = max_iter
        self.path_iter = path_iter
        self.path_patience = path_patience
        self.precision = precision
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.patience = patience
        self.val_fraction = val_fraction
        self.refit = refit
        self.num_classes = num_classes
        self.seed = seed

    # -- parameters
    def set_params(self, **params: Any) -> SoftmaxHead:
        valid = self.get_params(deep=False)
        for k in params:
            if k not in valid:
                raise HeadInputError(f"SoftmaxHead has no parameter {k!r}", f"valid: {', '.join(valid)}")
        return super().set_params(**params)

    def _validate_hyperparameters(self) -> None:
        """Check every parameter (at the start of ``fit``, as scikit-learn does, not in ``__init__``)."""
        bad = self._first_bad_parameter()
        if bad is not None:
            raise HeadInputError(*bad)

    def _first_bad_parameter(self) -> tuple[str, str | None] | None:
        if self.solver not in SOLVERS:
            return f"--solver {self.solver!r} is not known", f"use one of: {', '.join(SOLVERS)}"
        if self.l2 is not None and not (self.l2 >= 0 and math.isfinite(self.l2)):
            return f"--l2 {self.l2} must be a finite number >= 0", None
        if not self.l2_grid or any(not (g > 0) for g in self.l2_grid):
            return f"l2_grid {self.l2_grid!r} must be a non-empty list of positive numbers", None
        if self.hidden < 0:
            return f"--hidden {self.hidden} must be 0 (linear) or a positive width", None
        if not 0.0 <= self.dropout < 1.0:
            return f"--dropout {self.dropout} must be in [0, 1)", None
        if self.norm not in NORMS:
            return f"--norm {self.norm!r} is not known", f"use one of: {', '.join(NORMS)}"
        if self.norm == "batch" and (not self.hidden or self.solver not in ("adamw", "onecycle")):
            return "norm='batch' (fastai's head) needs --hidden > 0 and solver adamw or onecycle", "use --head mlp"
        if not 0.0 <= self.label_smoothing < 1.0:
            return f"--label-smoothing {self.label_smoothing} must be in [0, 1)", None
        if self.class_weight not in (None, "balanced") and not isinstance(self.class_weight, dict):
            return (
                f"--class-weight {self.class_weight!r} is not known",
                "use 'balanced', None or a {label: weight} dict",
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            return f"--precision {self.precision!r} is not known", "use auto, fp32 or bf16"
        for name in ("max_iter", "path_iter", "path_patience", "epochs", "batch_size", "patience"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                return f"{name}={getattr(self, name)} must be at least 1", None
        if not self.lr > 0:
            return f"--lr {self.lr} must be positive", None
        if not 0.0 <= self.val_fraction < 1.0:
            return f"val_fraction={self.val_fraction} must be in [0, 1)", "use e.g. 0.2"
        if self.solver == "sklearn" and self.hidden:
            return "--solver sklearn fits a linear head only", "drop --hidden, or use --solver lbfgs/adamw"
        if self.num_classes is not None and int(self.num_classes) < 2:
            return f"num_classes={self.num_classes} must be at least 2", None
        return None

    # -- labels
    def encode(self, y: Any, name: str = "y") -> np.ndarray:
        """Labels -> output indices 0..K-1 in ``classes_`` order (an error naming the unknown labels)."""
        y = np.asarray(y)
        idx = np.clip(np.searchsorted(self.classes_, y), 0, len(self.classes_) - 1)
        bad = self.classes_[idx] != y
        if bad.any():
            unknown = sorted({str(v) for v in y[bad]})[:10]
            raise HeadInputError(
                f"{name}: label(s) {', '.join(unknown)} are not among the classes ({len(self.classes_)})",
                "use labels seen in y, or set num_classes",
            )
        return idx.astype(np.int64)

    def _set_classes(self, y: np.ndarray) -> None:
        if self.num_classes is not None:
            k = int(self.num_classes)
            if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k:
                raise HeadInputError(
                    f"y: with num_classes={k} labels must be integers 0..{k - 1} (found {y.min()}..{y.max()})"
                )
            self.classes_ = np.arange(k)
        else:
            self.classes_ = np.unique(y)
            if len(self.classes_) < 2:
                raise HeadInputError(
                    f"y: only one class ({self.classes_[0]!r}) present", "a classifier needs 2+ classes"
                )

    def _class_weights(self, counts: np.ndarray) -> np.ndarray:
        """Per-class weights from the training class ``counts`` (``class_weight``)."""
        k = len(self.classes_)
        if self.class_weight == "balanced":
            return np.where(counts > 0, counts.sum() / (k * np.maximum(counts, 1)), 0.0)
        per_class = np.ones(k)
        if isinstance(self.class_weight, dict):
            for label, w in self.class_weight.items():
                per_class[self.encode(np.asarray([label]), "class_weight")[0]] = float(w)
        return per_class

    def _new_module(self, dim: int) -> HeadModule:
        torch.manual_seed(self.seed)  # before the module: its init is part of the result
        return HeadModule(dim, len(self.classes_), int(self.hidden), float(self.dropout), norm=self.norm)

    # -- fitting
    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None, sample_weight: Any = None) -> SoftmaxHead:
        """Fit on ``X`` (n, d) and labels ``y``. ``X_val``/``y_val`` (optional) choose ``l2`` and drive early
        stopping; without them a stratified ``val_fraction`` of ``X`` is held out when needed."""
        self._validate_hyperparameters()
        X = check_features(X, "X")
        with hs.threads_for(X.size):
            return self._fit_arrays(X, y, X_val, y_val, sample_weight)

    def _fit_arrays(self, X: np.ndarray, y: Any, X_val: Any, y_val: Any, sample_weight: Any) -> SoftmaxHead:
        t0 = time.perf_counter()
        y = check_labels(y, "y", len(X))
        self._set_classes(y)
        yi = self.encode(y, "y")
        val, external = self._external_validation(X, X_val, y_val)
        w_all = self._class_weights(np.bincount(yi, minlength=len(self.classes_)).astype(np.float64))[yi]
        if sample_weight is not None:
            sw = np.asarray(sample_weight, dtype=np.float64)
            if sw.shape != (len(X),) or (sw < 0).any() or not np.isfinite(sw).all():
                raise HeadInputError("sample_weight: expected one non-negative finite weight per row of X")
            if not sw.sum() > 0:
                raise HeadInputError("sample_weight: all weights are zero", "give some rows a positive weight")
            w_all = w_all * sw
        train_rows = np.arange(len(X))
        if val is None and (self.solver == "adamw" or (self.l2 is None and self.solver != "onecycle")):
            train_rows, val = self._internal_split(X, yi)
        internal = val is not None and not external
        # the protocol: choose l2 on the split, then fit on every row (standardised with every row)
        refit_all = internal and self.refit and self.l2 is None and self.solver not in ("adamw", "onecycle")
        all_rows = refit_all or len(train_rows) == len(X)
        Xt = X if all_rows else X[train_rows]  # the only copy of the training rows, and only without refit
        self.n_features_in_ = X.shape[1]
        self.module_ = self._new_module(X.shape[1])
        set_standardisation(self.module_, Xt)
        self.path_: list[dict[str, Any]] = []
        self.history_: list[dict[str, Any]] = []
        if self.solver == "adamw":
            self._run_adamw(mb.ArraySource(X, yi, w_all, self.batch_size, train_rows), val)
        elif self.solver == "onecycle":
            self.l2_ = float(self.l2 if self.l2 is not None else ONECYCLE_WEIGHT_DECAY)
            rows = slice(None) if all_rows else train_rows
            self.history_, self.n_iter_ = mb.fit_onecycle(
                self.module_,
                Xt,
                yi[rows],
                w_all[rows],
                lr=self.lr,
                weight_decay=self.l2_,
                epochs=self.epochs,
                batch_size=self.batch_size,
                label_smoothing=self.label_smoothing,
                seed=self.seed,
            )
        else:
            l2 = self.l2
            if l2 is None and val is not None:
                l2, self.path_ = hs.l2_path(
                    self.module_,
                    self._solver_factory(),
                    X,
                    train_rows,
                    yi,
                    w_all,
                    val,
                    grid=self.l2_grid,
                    path_iter=hs.iteration_budget(len(train_rows) * X.shape[1], True, self.path_iter),
                    patience=self.path_patience,
                    seed=self.seed,
                )
            self.l2_ = float(DEFAULT_L2 if l2 is None else l2)
            rows = slice(None) if all_rows else train_rows
            self._run_full(Xt, yi[rows], w_all[rows])
        self.refit_ = refit_all
        self.val_score_ = float(self.score_indices(*val)) if val is not None and not refit_all else None
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _external_validation(
        self, X: np.ndarray, X_val: Any, y_val: Any
    ) -> tuple[tuple[np.ndarray, np.ndarray] | None, bool]:
        if (X_val is None) != (y_val is None):
            raise HeadInputError("X_val and y_val must be given together")
        if X_val is None:
            return None, False
        Xv = check_features(X_val, "X_val", X.shape[1])
        return (Xv, self.encode(check_labels(y_val, "y_val", len(Xv)), "y_val")), True

    def _internal_split(self, X: np.ndarray, yi: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """A stratified ``val_fraction`` of the rows for validation, or none (with a warning) when too few."""
        tr, va = stratified_split(yi, self.val_fraction, self.seed)
        if len(va) >= 2 and len(np.unique(yi[va])) >= 2:
            return tr, (X[va], yi[va])
        get_reporter().warn(
            f"too few rows ({len(X)}) for a validation split: "
            + ("training for a fixed number of epochs" if self.solver == "adamw" else f"using l2={DEFAULT_L2}")
        )
        return np.arange(len(X)), None

    def _solver_factory(self) -> Callable[[np.ndarray, np.ndarray, np.ndarray], hs.FullBatchSolver]:
        def make(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> hs.FullBatchSolver:
            return hs.make_solver(
                self.module_,
                X,
                y,
                w,
                solver=self.solver,
                label_smoothing=self.label_smoothing,
                precision=self.precision,
                seed=self.seed,
            )

        return make

    def _run_full(self, X: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        budget = hs.iteration_budget(X.size, False, self.max_iter)
        self.n_iter_ = hs.fit_full(self._solver_factory()(X, y, w), self.l2_, budget)
        self.path_.append({"l2": self.l2_, "final_fit_rows": len(X), "iterations": self.n_iter_})

    def _run_adamw(self, source: mb.BatchSource, val: tuple[np.ndarray, np.ndarray] | None) -> None:
        self.l2_ = float(self.l2 if self.l2 is not None else hs.DEFAULT_WEIGHT_DECAY)
        self.history_, self.n_iter_ = mb.fit_adamw(
            self.module_,
            source,
            val,
            lr=self.lr,
            weight_decay=self.l2_,
            epochs=self.epochs,
            patience=self.patience,
            label_smoothing=self.label_smoothing,
            seed=self.seed,
        )

    def fit_chunks(
        self,
        chunks: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]],
        X_val: Any = None,
        y_val: Any = None,
        num_features: int | None = None,
    ) -> SoftmaxHead:
        """Fit with AdamW on rows streamed in chunks: ``chunks(epoch)`` yields ``(X, y)`` blocks (a new,
        preferably shuffled pass per epoch, e.g. ``lambda e: cache.iter_chunks(rows, shuffle=True,
        seed=e)``). Memory stays at one block plus the validation arrays. Needs ``num_classes``."""
        self._validate_hyperparameters()
        if self.solver != "adamw":
            raise HeadInputError(f"streaming needs --solver adamw (not {self.solver})", "use --solver adamw")
        if self.num_classes is None:
            raise HeadInputError("fit_chunks needs num_classes (the labels are not known in advance)")
        t0 = time.perf_counter()
        self.classes_ = np.arange(int(self.num_classes))
        dims: list[int] = [num_features] if num_features is not None else []

        def checked(epoch: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
            for xb, yb in chunks(epoch):
                xb = check_features(xb, "chunk", dims[0] if dims else None)
                dims[:] = [xb.shape[1]]
                yield xb, self.encode(check_labels(yb, "chunk labels", len(xb)), "chunk labels")

        # first pass: standardisation statistics and class counts (float64 sums)
        n, mean, std, counts = mb.stream_statistics(checked(-1), len(self.classes_))
        if not n or not dims:
            raise HeadInputError("fit_chunks: the training stream yielded no rows")
        per_class = self._class_weights(counts)
        val, _ = self._external_validation(np.zeros((1, dims[0]), np.float32), X_val, y_val)
        self.n_features_in_ = dims[0]
        self.module_ = self._new_module(dims[0])
        set_standardisation(self.module_, None, mean, std)
        self.path_ = []
        self._run_adamw(
            mb.ChunkSource(chunks, lambda yb: self.encode(yb, "chunk labels"), per_class, self.batch_size), val
        )
        self.refit_ = False
        self.val_score_ = float(self.score_indices(*val)) if val is not None else None
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    # -- prediction
    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "module_")

    def _checked(self, X: Any) -> np.ndarray:
        try:
            check_is_fitted(self)
        except NotFittedError as exc:
            raise HeadNotFittedError("this SoftmaxHead is not fitted yet", "call fit(X, y) first") from exc
        return check_features(X, "X", self.n_features_in_)

    def logits(self, X: Any) -> np.ndarray:
        """Raw logits, (n, n_classes), columns in ``classes_`` order (no temperature)."""
        X = self._checked(X)
        return predict_logits(self.module_, X)

    def decision_function(self, X: Any) -> np.ndarray:
        """scikit-learn's convention: the logits (n, n_classes); for two classes, the (n,) margin of the
        second class over the first (``> 0`` predicts ``classes_[1]``)."""
        z = self.logits(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, (n, n_classes), columns in ``classes_`` order (the module's temperature
        applied: ``softmax(logits / T)``)."""
        X = self._checked(X)
        return predict_probabilities(self.module_, X)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row (labels from ``classes_``)."""
        z = self.logits(X)
        return self.classes_[z.argmax(1)]

    def score_indices(self, X: np.ndarray, yi: np.ndarray) -> float:
        """Accuracy against output indices (``encode(y)``) rather than labels."""
        return float((self.logits(X).argmax(1) == yi).mean())

    @classmethod
    def from_module(cls, module: HeadModule, classes: Any = None) -> SoftmaxHead:
        """Wrap a loaded :class:`HeadModule` (e.g. from a model directory) to predict with it."""
        head = cls(hidden=module.hidden, dropout=module.dropout, norm=module.norm, num_classes=module.num_classes)
        head.module_ = module.eval()
        head.classes_ = np.asarray(classes) if classes is not None else np.arange(module.num_classes)
        head.n_features_in_ = module.in_features
        return head
