"""The softmax head: a torch module (used by predict and finetune) and, built around it, an estimator.

``HeadModule`` is the contract shared by every consumer: ``(x - mean) * scale`` (feature standardisation
stored as buffers, identity by default), then a linear layer, or ``hidden`` -> ReLU -> dropout -> linear
for an MLP. Its ``config`` dict is what model directories record under ``head``.

:class:`SoftmaxHead` is a scikit-learn-style estimator on numpy arrays that fits a ``HeadModule``:

* ``lbfgs`` (default): full-batch L-BFGS on the (class-weighted, label-smoothed) cross-entropy plus
  ``l2/2 * ||W||^2`` in standardised feature space. With ``l2=None`` the strength is chosen on a validation
  split from a grid, walking the grid from strong to weak regularisation with warm starts (the
  linear-probe protocol); the selection runs on a subsample of large training sets, then the chosen
  strength is fitted on all rows (and, when the split was internal, on train + validation).
* ``adamw``: minibatch AdamW with early stopping on the validation loss; :meth:`SoftmaxHead.fit_chunks`
  streams the training rows (e.g. ``FeatureCache.iter_chunks``) when they do not fit in memory.
* ``sklearn``: scikit-learn's ``LogisticRegression`` (lbfgs) on the standardised features, the reference.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import stratified_split
from .errors import UsageError
from .report import get_reporter


class HeadModule(nn.Module):
    """Standardise, then linear (or a one-hidden-layer MLP) to ``num_classes`` logits."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.hidden = int(hidden)
        self.dropout = float(dropout)
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))
        if hidden:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
            )
        else:
            self.net = nn.Linear(in_features, num_classes)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "type": "mlp" if self.hidden else "linear",
            "in_features": self.in_features,
            "num_classes": self.num_classes,
            "hidden": self.hidden,
            "dropout": self.dropout,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() - self.mean) * self.scale)


def build_head_module(config: dict[str, Any]) -> HeadModule:
    """A fresh :class:`HeadModule` from a recorded ``config`` (load its state dict afterwards)."""
    return HeadModule(
        int(config["in_features"]),
        int(config["num_classes"]),
        int(config.get("hidden", 0)),
        float(config.get("dropout", 0.0)),
    )


# ------------------------------------------------------------------------------------------ estimator

SOLVERS = ("lbfgs", "adamw", "sklearn")
# L2 strengths tried on the validation split (per-sample mean loss, standardised features), strong -> weak
DEFAULT_L2_GRID = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
DEFAULT_L2 = 1e-3  # used when there is no validation data to choose with
SELECT_ROWS = 4096  # L2 is selected on at most this many training rows, then fitted on all of them
# L-BFGS iteration budgets: generous where an evaluation is cheap (rows x features below LARGE), short
# (warm-started) above it, where each evaluation is two passes over a large matrix
LARGE = 10_000_000
ITER_SMALL, ITER_LARGE, PATH_ITER_SMALL, PATH_ITER_LARGE = 100, 8, 30, 5


def _check_features(X: Any, name: str, dim: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{name}: cannot be read as a float array ({exc})", f"pass {name} as an (n, d) array") from exc
    if arr.ndim != 2:
        raise UsageError(f"{name}: expected a 2-d array (n_samples, n_features), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise UsageError(f"{name}: no rows")
    if dim is not None and arr.shape[1] != dim:
        raise UsageError(
            f"{name}: {arr.shape[1]} features, the head expects {dim}", "use features of the same backbone"
        )
    if not np.isfinite(arr).all():
        raise UsageError(f"{name}: contains NaN or infinite values", "re-extract the features or drop those rows")
    return np.ascontiguousarray(arr)


def _check_labels(y: Any, name: str, n: int) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise UsageError(f"{name}: expected a 1-d array of labels, got shape {arr.shape}")
    if len(arr) != n:
        raise UsageError(f"{name}: {len(arr)} labels for {n} rows", "give one label per row of the features")
    return arr


class SoftmaxHead:
    """A softmax (multinomial logistic) head on feature vectors, scikit-learn style.

    Parameters
    ----------
    solver: ``lbfgs`` | ``adamw`` | ``sklearn`` (see the module docstring).
    l2: L2 strength on the weights (mean loss + ``l2/2 ||W||^2`` on standardised features); ``None``
        chooses it from ``l2_grid`` on validation data (lbfgs, sklearn); for adamw it is the decoupled
        weight decay (default 1e-4).
    hidden, dropout: ``hidden > 0`` makes a one-hidden-layer MLP (lbfgs or adamw).
    class_weight: ``None``, ``"balanced"`` (n / (k * n_c)), or a ``{label: weight}`` dict.
    label_smoothing: in [0, 1).
    max_iter, path_iter: L-BFGS iterations of the final fit and per grid point; ``None``: 100 / 30 for
        small problems, 8 / 5 (warm-started) when rows x features >= 10M, where each iteration is costly.
    precision: ``auto`` (bf16 matmuls for large linear L-BFGS fits on CPUs with native bf16), ``fp32``,
        ``bf16``.
    epochs, batch_size, lr, patience: AdamW settings (early stopping after ``patience`` epochs without a
        lower validation loss; the best epoch is kept).
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
        class_weight: str | dict[Any, float] | None = None,
        label_smoothing: float = 0.0,
        max_iter: int | None = None,
        path_iter: int | None = None,
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
        self.class_weight = class_weight
        self.label_smoothing = label_smoothing
        self.max_iter = max_iter
        self.path_iter = path_iter
        self.precision = precision
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.patience = patience
        self.val_fraction = val_fraction
        self.refit = refit
        self.num_classes = num_classes
        self.seed = seed

    # -- scikit-learn protocol
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        names = [
            "solver",
            "l2",
            "l2_grid",
            "hidden",
            "dropout",
            "class_weight",
            "label_smoothing",
            "max_iter",
            "path_iter",
            "precision",
            "epochs",
            "batch_size",
            "lr",
            "patience",
            "val_fraction",
            "refit",
            "num_classes",
            "seed",
        ]
        return {n: getattr(self, n) for n in names}

    def set_params(self, **params: Any) -> SoftmaxHead:
        valid = self.get_params()
        for k, v in params.items():
            if k not in valid:
                raise UsageError(f"SoftmaxHead has no parameter {k!r}", f"valid: {', '.join(valid)}")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        default = SoftmaxHead().get_params()
        changed = {k: v for k, v in self.get_params().items() if default[k] != v}
        return "SoftmaxHead(" + ", ".join(f"{k}={v!r}" for k, v in changed.items()) + ")"

    def _check_params(self) -> None:
        if self.solver not in SOLVERS:
            raise UsageError(f"--solver {self.solver!r} is not known", f"use one of: {', '.join(SOLVERS)}")
        if self.l2 is not None and not (self.l2 >= 0 and math.isfinite(self.l2)):
            raise UsageError(f"--l2 {self.l2} must be a finite number >= 0")
        if not self.l2_grid or any(not (g > 0) for g in self.l2_grid):
            raise UsageError(f"l2_grid {self.l2_grid!r} must be a non-empty list of positive numbers")
        if self.hidden < 0:
            raise UsageError(f"--hidden {self.hidden} must be 0 (linear) or a positive width")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout {self.dropout} must be in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"--label-smoothing {self.label_smoothing} must be in [0, 1)")
        if self.class_weight not in (None, "balanced") and not isinstance(self.class_weight, dict):
            raise UsageError(
                f"--class-weight {self.class_weight!r} is not known", "use 'balanced', None or a {label: weight} dict"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UsageError(f"--precision {self.precision!r} is not known", "use auto, fp32 or bf16")
        for name in ("max_iter", "path_iter", "epochs", "batch_size", "patience"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be at least 1")
        if not self.lr > 0:
            raise UsageError(f"--lr {self.lr} must be positive")
        if self.solver == "sklearn" and self.hidden:
            raise UsageError("--solver sklearn fits a linear head only", "drop --hidden, or use --solver lbfgs/adamw")
        if self.num_classes is not None and int(self.num_classes) < 2:
            raise UsageError(f"num_classes={self.num_classes} must be at least 2")

    # -- labels
    def _encode(self, y: np.ndarray, name: str) -> np.ndarray:
        """Labels -> output indices 0..K-1 (an error naming the unknown labels)."""
        idx = np.searchsorted(self.classes_, y)
        idx = np.clip(idx, 0, len(self.classes_) - 1)
        bad = self.classes_[idx] != y
        if bad.any():
            unknown = sorted({str(v) for v in np.asarray(y)[bad]})[:10]
            raise UsageError(
                f"{name}: label(s) {', '.join(unknown)} are not among the classes ({len(self.classes_)})",
                "use labels seen in y, or set num_classes",
            )
        return idx.astype(np.int64)

    def _set_classes(self, y: np.ndarray) -> None:
        if self.num_classes is not None:
            k = int(self.num_classes)
            if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k:
                raise UsageError(
                    f"y: with num_classes={k} labels must be integers 0..{k - 1} (found {y.min()}..{y.max()})"
                )
            self.classes_ = np.arange(k)
        else:
            self.classes_ = np.unique(y)
            if len(self.classes_) < 2:
                raise UsageError(f"y: only one class ({self.classes_[0]!r}) present", "a classifier needs 2+ classes")

    def _sample_weights(self, yi: np.ndarray) -> np.ndarray:
        k = len(self.classes_)
        counts = np.bincount(yi, minlength=k).astype(np.float64)
        if self.class_weight is None:
            per_class = np.ones(k)
        elif self.class_weight == "balanced":
            per_class = np.where(counts > 0, len(yi) / (k * np.maximum(counts, 1)), 0.0)
        else:
            per_class = np.ones(k)
            assert isinstance(self.class_weight, dict)
            for label, w in self.class_weight.items():
                per_class[self._encode(np.asarray([label]), "class_weight")[0]] = float(w)
        return per_class

    # -- fitting
    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None, sample_weight: Any = None) -> SoftmaxHead:
        """Fit on ``X`` (n, d) and labels ``y``. ``X_val``/``y_val`` (optional) choose ``l2`` and drive early
        stopping; without them a stratified ``val_fraction`` of ``X`` is held out when needed."""
        self._check_params()
        t0 = time.perf_counter()
        X = _check_features(X, "X")
        y = _check_labels(y, "y", len(X))
        self._set_classes(y)
        yi = self._encode(y, "y")
        external_val = X_val is not None
        if (X_val is None) != (y_val is None):
            raise UsageError("X_val and y_val must be given together")
        if external_val:
            X_val = _check_features(X_val, "X_val", X.shape[1])
            yv = self._encode(_check_labels(y_val, "y_val", len(X_val)), "y_val")
        sw = None
        if sample_weight is not None:
            sw = np.asarray(sample_weight, dtype=np.float64)
            if sw.shape != (len(X),) or (sw < 0).any() or not np.isfinite(sw).all():
                raise UsageError("sample_weight: expected one non-negative finite weight per row of X")
        per_class = self._sample_weights(yi)

        needs_val = self.solver == "adamw" or self.l2 is None
        train_rows = np.arange(len(X))
        internal_val = False
        if needs_val and not external_val:
            tr, va = stratified_split(yi, self.val_fraction, self.seed)
            if len(va) >= 2 and len(np.unique(yi[va])) >= 2:
                train_rows, internal_val = tr, True
                X_val, yv = X[va], yi[va]
            else:
                get_reporter().warn(
                    f"too few rows ({len(X)}) for a validation split: "
                    + ("training for a fixed number of epochs" if self.solver == "adamw" else f"using l2={DEFAULT_L2}")
                )
        w_all = per_class[yi] * (sw if sw is not None else 1.0)
        # the protocol: choose l2 on the split, then fit on every row (standardised with every row)
        refit_all = internal_val and self.refit and self.l2 is None and self.solver != "adamw"
        all_rows = refit_all or len(train_rows) == len(X)
        Xt = X if all_rows else X[train_rows]  # the only copy of the training rows, and only without refit
        self.n_features_in_ = X.shape[1]
        torch.manual_seed(self.seed)  # before the module: its init is part of the result
        self.module_ = HeadModule(X.shape[1], len(self.classes_), int(self.hidden), float(self.dropout))
        _set_standardisation(self.module_, Xt)
        val = (X_val, yv) if X_val is not None else None
        self.path_: list[dict[str, Any]] = []
        self.history_: list[dict[str, Any]] = []
        if self.solver == "adamw":
            self._fit_adamw(_ArraySource(X, yi, w_all, self.batch_size, train_rows), val)
            self.l2_ = float(self.l2 if self.l2 is not None else 1e-4)
        else:
            l2 = self._select_l2(X, train_rows, yi, w_all, val) if (self.l2 is None and val is not None) else self.l2
            self.l2_ = float(DEFAULT_L2 if l2 is None else l2)
            rows = slice(None) if all_rows else train_rows
            self._fit_full(Xt, yi[rows], w_all[rows], self.l2_)
        self.refit_ = refit_all
        self.val_score_ = float(self.score_indices(*val)) if val is not None and not refit_all else None
        self.fit_seconds_ = time.perf_counter() - t0
        return self

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
        self._check_params()
        if self.solver != "adamw":
            raise UsageError(f"streaming needs --solver adamw (not {self.solver})", "use --solver adamw")
        if self.num_classes is None:
            raise UsageError("fit_chunks needs num_classes (the labels are not known in advance)")
        t0 = time.perf_counter()
        self.classes_ = np.arange(int(self.num_classes))
        k = len(self.classes_)
        # first pass: standardisation statistics and class counts (float64 sums)
        n, s1, s2, counts, dim = 0, None, None, np.zeros(k), num_features
        for xb, yb in chunks(-1):
            xb = _check_features(xb, "chunk", dim)
            dim = xb.shape[1]
            yb = self._encode(_check_labels(yb, "chunk labels", len(xb)), "chunk labels")
            s1 = xb.sum(0, dtype=np.float64) if s1 is None else s1 + xb.sum(0, dtype=np.float64)
            s2 = (xb.astype(np.float64) ** 2).sum(0) if s2 is None else s2 + (xb.astype(np.float64) ** 2).sum(0)
            counts += np.bincount(yb, minlength=k)
            n += len(xb)
        if not n or s1 is None or s2 is None or dim is None:
            raise UsageError("fit_chunks: the training stream yielded no rows")
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
        if self.class_weight == "balanced":
            per_class = np.where(counts > 0, n / (k * np.maximum(counts, 1)), 0.0)
        else:
            per_class = self._sample_weights(np.zeros(0, np.int64))
        val = None
        if X_val is not None:
            X_val = _check_features(X_val, "X_val", dim)
            val = (X_val, self._encode(_check_labels(y_val, "y_val", len(X_val)), "y_val"))
        self.n_features_in_ = dim
        torch.manual_seed(self.seed)  # before the module: its init is part of the result
        self.module_ = HeadModule(dim, k, int(self.hidden), float(self.dropout))
        _set_standardisation(self.module_, None, mean, std)
        self.path_, self.history_ = [], []
        self._fit_adamw(_ChunkSource(chunks, self, per_class, self.batch_size), val)
        self.l2_ = float(self.l2 if self.l2 is not None else 1e-4)
        self.val_score_ = float(self.score_indices(*val)) if val is not None else None
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    # -- the three solvers
    def _select_l2(
        self, X: np.ndarray, rows: np.ndarray, y: np.ndarray, w: np.ndarray, val: tuple[np.ndarray, np.ndarray]
    ) -> float:
        """Walk ``l2_grid`` strong -> weak with warm starts on (a stratified subsample of at most
        ``SELECT_ROWS`` of) the training ``rows``; keep the strength with the best validation accuracy
        (ties: lower validation loss). Stops after two grid points in a row worse than the best."""
        rows_all = rows  # the budget follows the whole problem's size, not the subsample's
        if len(rows) > SELECT_ROWS:
            sub, _ = stratified_split(y[rows], 1.0 - SELECT_ROWS / len(rows), self.seed)
            rows = rows[sub]
        Xs, ys, ws = X[rows], y[rows], w[rows]
        Xv, yv = val
        best: tuple[float, float] | None = None
        best_l2, best_state, worse = float(self.l2_grid[0]), None, 0
        solver = self._make_solver(Xs, ys, ws)
        for l2 in sorted(self.l2_grid, reverse=True):
            iters = solver.run(float(l2), self._iters(len(rows_all) * X.shape[1], path=True))
            with torch.no_grad():
                logits = torch.from_numpy(predict_logits(self.module_, Xv))
                acc = float((logits.argmax(1).numpy() == yv).mean())
                loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(yv)))
            self.path_.append({"l2": float(l2), "val_accuracy": acc, "val_loss": loss, "iterations": iters})
            key = (acc, -loss)
            if best is None or key > best:
                best, best_l2, worse = key, float(l2), 0
                best_state = {k: v.clone() for k, v in self.module_.state_dict().items()}
            else:
                worse += 1
                if worse >= 2:
                    break
        if best_state is not None:
            self.module_.load_state_dict(best_state)
        get_reporter().info(
            f"l2 chosen on {len(Xv)} validation rows ({len(Xs)} training rows): {best_l2:g} "
            f"(val accuracy {best[0] if best else float('nan'):.4f})"
        )
        return best_l2

    def _iters(self, values: int, path: bool) -> int:
        """The L-BFGS iteration budget: ``path_iter`` / ``max_iter`` when set, else by the size (rows x
        features) of the training problem."""
        given = self.path_iter if path else self.max_iter
        if given is not None:
            return int(given)
        large = values >= LARGE
        if path:
            return PATH_ITER_LARGE if large else PATH_ITER_SMALL
        return ITER_LARGE if large else ITER_SMALL

    def _make_solver(self, X: np.ndarray, y: np.ndarray, w: np.ndarray) -> _Solver:
        if self.solver == "sklearn":
            return _SklearnSolver(self.module_, X, y, w, self.seed)
        if self.hidden:
            return _AutogradLBFGS(self.module_, X, y, w, self.label_smoothing)
        return _LinearLBFGS(self.module_, X, y, w, self.label_smoothing, self._use_bf16(X))

    def _use_bf16(self, X: np.ndarray) -> bool:
        """bf16 matmuls for the linear L-BFGS: asked for, or (auto) a CPU with native bf16 and a feature
        matrix large enough for the one-off conversion to pay (>= 4M values)."""
        if self.precision == "bf16":
            return True
        if self.precision == "fp32":
            return False
        from .runtime import cpu_supports_bf16

        return X.size >= 4_000_000 and cpu_supports_bf16()

    def _fit_full(self, X: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float) -> None:
        iters = self._make_solver(X, y, w).run(l2, self._iters(X.size, path=False))
        self.n_iter_ = iters
        self.path_.append({"l2": l2, "final_fit_rows": len(X), "iterations": iters})

    def _fit_adamw(self, source: _Source, val: tuple[np.ndarray, np.ndarray] | None) -> None:
        m = self.module_
        wd = float(self.l2 if self.l2 is not None else 1e-4)
        opt = torch.optim.AdamW([p for p in m.parameters()], lr=float(self.lr), weight_decay=wd)
        Xv_t = torch.from_numpy(val[0]) if val is not None else None
        yv_t = torch.from_numpy(val[1]) if val is not None else None
        best_loss, best_state, bad = math.inf, None, 0
        rep = get_reporter()
        epoch = 0
        for epoch in range(int(self.epochs)):
            m.train()
            total, count = 0.0, 0
            for xb, yb, wb in source.batches(epoch, self.seed):
                logits = m(xb)
                per = nn.functional.cross_entropy(logits, yb, reduction="none", label_smoothing=self.label_smoothing)
                loss = (per * wb).sum() / wb.sum().clamp_min(1e-12)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(xb)
                count += len(xb)
            m.eval()
            entry: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / max(count, 1)}
            if Xv_t is not None and yv_t is not None:
                with torch.no_grad():
                    lv = m(Xv_t)
                    entry["val_loss"] = float(nn.functional.cross_entropy(lv, yv_t))
                    entry["val_accuracy"] = float((lv.argmax(1) == yv_t).float().mean())
                if entry["val_loss"] < best_loss - 1e-4:
                    best_loss, bad = entry["val_loss"], 0
                    best_state = {k: v.clone() for k, v in m.state_dict().items()}
                else:
                    bad += 1
            self.history_.append(entry)
            if bad >= int(self.patience):
                rep.info(f"early stop after epoch {epoch + 1} (best val loss {best_loss:.4f})")
                break
        if best_state is not None:
            m.load_state_dict(best_state)
        m.eval()
        self.n_iter_ = epoch + 1

    # -- prediction
    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise UsageError("this SoftmaxHead is not fitted yet", "call fit(X, y) first")

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits, (n, n_classes)."""
        self._check_fitted()
        X = _check_features(X, "X", self.n_features_in_)
        return predict_logits(self.module_, X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, (n, n_classes), columns in ``classes_`` order."""
        logits = torch.from_numpy(self.decision_function(X))
        return torch.softmax(logits, 1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        self._check_fitted()
        return self.classes_[self.decision_function(X).argmax(1)]

    def score(self, X: Any, y: Any) -> float:
        """Mean accuracy on ``X``/``y``."""
        pred = self.predict(X)
        y = _check_labels(y, "y", len(pred))
        return float((pred == y).mean())

    def score_indices(self, X: np.ndarray, yi: np.ndarray) -> float:
        return float((self.decision_function(X).argmax(1) == yi).mean())

    @classmethod
    def from_module(cls, module: HeadModule, classes: Any = None) -> SoftmaxHead:
        """Wrap a loaded :class:`HeadModule` (e.g. from a model directory) to predict with it."""
        head = cls(hidden=module.hidden, dropout=module.dropout, num_classes=module.num_classes)
        head.module_ = module.eval()
        head.classes_ = np.asarray(classes) if classes is not None else np.arange(module.num_classes)
        head.n_features_in_ = module.in_features
        return head


def predict_logits(module: HeadModule, X: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Logits of ``module`` for the rows of ``X`` (float32, in batches, no grad). A linear head folds
    its standardisation into the weights (``X (W*s)^T + b - (W*s) m``), so X is never copied."""
    module.eval()
    out = []
    with torch.no_grad():
        lin = module.net if isinstance(module.net, nn.Linear) else None
        if lin is not None:
            Ws = lin.weight * module.scale
            c = lin.bias - Ws @ module.mean
        for i in range(0, len(X), batch):
            xb = torch.from_numpy(np.ascontiguousarray(X[i : i + batch], dtype=np.float32))
            out.append((torch.addmm(c, xb, Ws.T) if lin is not None else module(xb)).numpy())
    return np.concatenate(out) if out else np.zeros((0, module.num_classes), np.float32)


def _set_standardisation(
    module: HeadModule, X: np.ndarray | None, mean: np.ndarray | None = None, std: np.ndarray | None = None
) -> None:
    """mean/scale buffers from the training rows; constant features get scale 0 (they carry nothing).

    Stds are floored at a tenth of the median std: a nearly dead channel (common in random or partly
    trained backbones) would otherwise get a scale in the thousands, and once finetuning moves the features,
    the logits explode. The floor only tempers those outliers; typical features are standardised as usual."""
    if X is not None:  # numpy's row-wise accumulation is ~50x faster here than torch's column reductions
        mean = X.sum(0).astype(np.float64) / len(X)
        sq = np.einsum("ij,ij->j", X, X).astype(np.float64) / len(X)
        std = np.sqrt(np.maximum(sq - mean**2, 0.0))
    assert mean is not None and std is not None
    tiny = 1e-6 * max(float(std.max()), 1e-12)
    live = std[std > tiny]
    floor = 0.1 * float(np.median(live)) if live.size else tiny
    scale = np.where(std > tiny, 1.0 / np.maximum(std, floor), 0.0)
    module.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
    module.scale.copy_(torch.from_numpy(scale.astype(np.float32)))


# ---------------------------------------------------------------------------------------------- L-BFGS


class _Solver:
    def run(self, l2: float, max_iter: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError


class _LBFGSBase(_Solver):
    """Full-batch L-BFGS on a flat parameter vector with a backtracking (Armijo) line search.

    The curvature history survives a change of ``l2`` along the regularisation path: the L2 term is
    quadratic, so each stored gradient difference ``y`` is corrected by ``(l2_new - l2_old) * P s``
    exactly (``P`` masks the penalised entries)."""

    history = 10

    def __init__(self) -> None:
        self.S: list[torch.Tensor] = []
        self.Y: list[torch.Tensor] = []
        self.l2: float | None = None
        self.evals = 0

    # subclasses: theta (flat params), penalty_mask, loss_grad(theta) -> (data loss, grad), write_back()
    theta: torch.Tensor
    penalty_mask: torch.Tensor

    def loss_grad(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def write_back(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _fg(self, theta: torch.Tensor, l2: float) -> tuple[float, torch.Tensor]:
        self.evals += 1
        f, g = self.loss_grad(theta)
        pw = theta * self.penalty_mask
        return f + 0.5 * l2 * float(pw.dot(pw)), g + l2 * pw

    def run(self, l2: float, max_iter: int) -> int:
        if self.l2 is not None and l2 != self.l2:
            for s, y in zip(self.S, self.Y):
                y.add_(s * self.penalty_mask, alpha=l2 - self.l2)
            keep = [i for i, (s, y) in enumerate(zip(self.S, self.Y)) if float(s.dot(y)) > 1e-10]
            self.S = [self.S[i] for i in keep]
            self.Y = [self.Y[i] for i in keep]
        self.l2 = l2
        x = self.theta
        f, g = self._fg(x, l2)
        it = 0
        for it in range(1, max_iter + 1):  # noqa: B007
            d = -self._two_loop(g)
            gtd = float(g.dot(d))
            if gtd > -1e-12:  # not a descent direction: restart from the gradient
                self.S, self.Y = [], []
                d = -g
                gtd = float(g.dot(d))
            t = 1.0 if self.S else min(1.0, 1.0 / max(float(g.abs().sum()), 1e-12))
            for _ in range(20):
                fn, gn = self._fg(x + t * d, l2)
                if fn <= f + 1e-4 * t * gtd:
                    break
                t *= 0.5 if not self.S else 0.3
            else:
                break
            s = t * d
            yv = gn - g
            if float(s.dot(yv)) > 1e-10:
                self.S.append(s)
                self.Y.append(yv)
                if len(self.S) > self.history:
                    self.S.pop(0)
                    self.Y.pop(0)
            x = x + s
            converged = float(gn.abs().max()) < 1e-5 or abs(f - fn) < 1e-9 * max(1.0, abs(f))
            f, g = fn, gn
            if converged:
                break
        self.theta = x
        self.write_back()
        return it

    def _two_loop(self, g: torch.Tensor) -> torch.Tensor:
        if not self.S:
            return g.clone()
        q = g.clone()
        alphas = []
        rhos = [1.0 / float(y.dot(s)) for s, y in zip(self.S, self.Y)]
        for s, y, rho in zip(reversed(self.S), reversed(self.Y), reversed(rhos)):
            a = rho * float(s.dot(q))
            alphas.append(a)
            q.add_(y, alpha=-a)
        s, y = self.S[-1], self.Y[-1]
        q.mul_(float(s.dot(y)) / float(y.dot(y)))
        for s, y, rho, a in zip(self.S, self.Y, rhos, reversed(alphas)):
            b = rho * float(y.dot(q))
            q.add_(s, alpha=a - b)
        return q


def _targets(y: torch.Tensor, k: int, smoothing: float) -> torch.Tensor:
    t = torch.full((len(y), k), smoothing / k)
    t[torch.arange(len(y)), y] += 1.0 - smoothing
    return t


class _LinearLBFGS(_LBFGSBase):
    """The linear head's loss and gradient by hand, standardisation folded into the weights so the
    (large) feature matrix is used as is: logits = X (W*s)^T + b - (W*s) m. Two matmuls per evaluation.

    ``bf16``: keep X in bfloat16 and run both matmuls in bf16 (fp32 accumulation; softmax, loss and the
    optimiser state stay fp32). ~2.7x faster on CPUs with native bf16; gradients carry ~0.4% relative
    rounding, far below what changes a classifier fitted to a validation-chosen L2."""

    def __init__(
        self, module: HeadModule, X: np.ndarray, y: np.ndarray, w: np.ndarray, smoothing: float, bf16: bool = False
    ) -> None:
        super().__init__()
        self.module = module
        lin = module.net
        assert isinstance(lin, nn.Linear)
        self.k, self.d = lin.weight.shape
        self.X = torch.from_numpy(X)
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        if bf16:
            self.X = self.X.to(torch.bfloat16)
        wt = torch.from_numpy(np.asarray(w, dtype=np.float32))
        self.w = (wt / wt.sum().clamp_min(1e-12)).unsqueeze(1)
        self.T = _targets(torch.from_numpy(y), self.k, smoothing)
        self.m = module.mean
        self.s = module.scale
        self.theta = torch.cat([lin.weight.detach().flatten(), lin.bias.detach()]).clone()
        self.penalty_mask = torch.cat([torch.ones(self.k * self.d), torch.zeros(self.k)])

    def loss_grad(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        k, d = self.k, self.d
        W = theta[: k * d].view(k, d)
        b = theta[k * d :]
        Ws = W * self.s
        c = b - Ws @ self.m
        if self.dtype == torch.float32:
            logits = torch.addmm(c, self.X, Ws.T)
        else:
            logits = (self.X @ Ws.T.to(self.dtype)).float().add_(c)
        logp = torch.log_softmax(logits, 1)
        f = float(-(self.w * self.T * logp).sum())
        G = (logp.exp_() - self.T).mul_(self.w)
        gsum = G.sum(0)
        gWs = (G.T.to(self.dtype) @ self.X).float() - torch.outer(gsum, self.m)
        return f, torch.cat([(gWs * self.s).flatten(), gsum])

    def write_back(self) -> None:
        lin = self.module.net
        assert isinstance(lin, nn.Linear)
        k, d = self.k, self.d
        with torch.no_grad():
            lin.weight.copy_(self.theta[: k * d].view(k, d))
            lin.bias.copy_(self.theta[k * d :])


class _AutogradLBFGS(_LBFGSBase):
    """L-BFGS for the MLP head (autograd; dropout is off during the full-batch fit)."""

    def __init__(self, module: HeadModule, X: np.ndarray, y: np.ndarray, w: np.ndarray, smoothing: float) -> None:
        super().__init__()
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.X = torch.from_numpy(X)
        self.y = torch.from_numpy(y)
        wt = torch.from_numpy(np.asarray(w, dtype=np.float32))
        self.w = wt / wt.sum().clamp_min(1e-12)
        self.smoothing = smoothing
        self.theta = torch.cat([p.detach().flatten() for p in self.params]).clone()
        # weights (2-d) are penalised, biases are not
        self.penalty_mask = torch.cat([torch.full((p.numel(),), 1.0 if p.ndim > 1 else 0.0) for p in self.params])

    def _assign(self, theta: torch.Tensor) -> None:
        i = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(theta[i : i + p.numel()].view_as(p))
                i += p.numel()

    def loss_grad(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        self._assign(theta)
        self.module.eval()
        for p in self.params:
            p.grad = None
        per = nn.functional.cross_entropy(self.module(self.X), self.y, reduction="none", label_smoothing=self.smoothing)
        loss = (per * self.w).sum()
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in self.params])  # type: ignore[union-attr]

    def write_back(self) -> None:
        self._assign(self.theta)


class _SklearnSolver(_Solver):
    """scikit-learn's LogisticRegression (lbfgs, one BLAS thread: the fastest setting measured here) on
    the standardised features; warm-started along the L2 path. ``C = 1 / (l2 * sum of weights)``."""

    def __init__(self, module: HeadModule, X: np.ndarray, y: np.ndarray, w: np.ndarray, seed: int) -> None:
        from sklearn.linear_model import LogisticRegression

        self.module = module
        self.Xs = (X - module.mean.numpy()) * module.scale.numpy()
        self.y = y
        self.w = np.asarray(w, dtype=np.float64)
        self.present = np.unique(y)
        self.model = LogisticRegression(warm_start=True, random_state=seed)

    def run(self, l2: float, max_iter: int) -> int:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from threadpoolctl import threadpool_limits

        wsum = float(self.w.sum())
        self.model.set_params(C=1.0 / max(l2 * wsum, 1e-12), max_iter=max(100, max_iter))
        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model.fit(self.Xs, self.y, sample_weight=self.w)
        coef, icpt = self.model.coef_, self.model.intercept_
        if coef.shape[0] == 1:  # binary: sklearn keeps one logit; softmax([-z/2, z/2]) = sigmoid(z)
            coef = np.vstack([-coef / 2, coef / 2])
            icpt = np.array([-icpt[0] / 2, icpt[0] / 2])
        lin = self.module.net
        assert isinstance(lin, nn.Linear)
        W = np.zeros(tuple(lin.weight.shape), np.float32)
        b = np.full(lin.bias.shape, -30.0, np.float32)  # classes absent from training: never predicted
        W[self.present] = coef
        b[self.present] = icpt
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
        return int(np.max(self.model.n_iter_))


# ------------------------------------------------------------------------------------- minibatch sources


class _Source:
    def batches(self, epoch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        raise NotImplementedError  # pragma: no cover - interface


class _ArraySource(_Source):
    def __init__(self, X: np.ndarray, y: np.ndarray, w: np.ndarray, batch_size: int, rows: np.ndarray) -> None:
        self.X = torch.from_numpy(X)
        self.y = torch.from_numpy(y)
        self.w = torch.from_numpy(np.asarray(w, dtype=np.float32))
        self.rows = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        self.bs = int(batch_size)

    def batches(self, epoch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = self.rows[torch.randperm(len(self.rows), generator=g)]
        for i in range(0, len(perm), self.bs):
            idx = perm[i : i + self.bs]
            yield self.X[idx], self.y[idx], self.w[idx]


class _ChunkSource(_Source):
    """Minibatches cut from streamed blocks (e.g. whole HDF5 chunks read in shuffled order)."""

    def __init__(
        self,
        chunks: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]],
        head: SoftmaxHead,
        per_class: np.ndarray,
        batch_size: int,
    ) -> None:
        self.chunks = chunks
        self.head = head
        self.per_class = per_class.astype(np.float32)
        self.bs = int(batch_size)

    def batches(self, epoch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng(seed * 100_003 + epoch)
        for xb, yb in self.chunks(epoch):
            xb = np.ascontiguousarray(xb, dtype=np.float32)
            yi = self.head._encode(np.asarray(yb), "chunk labels")
            perm = rng.permutation(len(xb))
            for i in range(0, len(perm), self.bs):
                idx = perm[i : i + self.bs]
                yield (
                    torch.from_numpy(xb[idx]),
                    torch.from_numpy(yi[idx]),
                    torch.from_numpy(self.per_class[yi[idx]]),
                )
