"""Which head `rt fit-head --head` fits: a linear probe or fastai's MLP head, chosen on validation data.

``linear``: the softmax probe (L-BFGS, L2 strength chosen on validation). ``mlp``: the head fastai's
``vision_learner`` puts on a body (BatchNorm, dropout, 512 hidden units, BatchNorm, dropout, linear),
trained as fastai trains it, AdamW under one fixed one-cycle schedule, here on the cached pooled features.
On some tasks the MLP is several points better than the probe, on others the probe wins (docs/transfer.md),
so ``auto`` (the default) fits both and keeps the one with the better validation accuracy (ties: the
linear one, the simpler model): on the validation split when it has ``CV_BELOW`` (100) rows or more, else
by stratified k-fold cross-validation over every labelled row, as the feature choice does (select.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..base import UsageError, get_reporter
from .select import CV_FOLDS, cv_folds, path_scores

HEAD_TYPES = ("auto", "linear", "mlp")
# fastai's head (create_head: ps=0.5 -> 0.25 before the hidden layer, 512 units) and fit_one_cycle's
# defaults (lr 2e-3, true weight decay 0.01, batch 64); 30 epochs over the cached rows
MLP_HEAD: dict[str, Any] = {
    "solver": "onecycle",
    "hidden": 512,
    "dropout": 0.5,
    "norm": "batch",
    "epochs": 30,
    "lr": 2e-3,
    "l2": 0.01,
    "batch_size": 64,
}
# validation rows below which the head is chosen by k-fold cross-validation: a 30-row split (3% steps)
# decides between two heads a few points apart by noise; five folds over a few hundred rows cost seconds
CV_BELOW = 100
# head parameters that fix what kind of head is wanted: given any of them, `auto` makes no choice
SHAPE_PARAMS = ("solver", "hidden", "dropout", "norm", "l2")


@dataclass
class HeadChoice:
    """What ``--head`` resolved to, how, and the scores of everything tried."""

    chosen: str  # linear | mlp
    params: dict[str, Any]  # the SoftmaxHead parameters to fit with
    method: str  # given | split | cv | none
    description: str
    tried: list[dict[str, Any]] = field(default_factory=list)  # head, accuracy, log_loss (+ l2, folds)

    def as_report(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "method": self.method, "description": self.description, "tried": self.tried}


def head_params(head_type: str, params: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The :class:`SoftmaxHead` parameters of ``head_type`` (``linear`` or ``mlp``): ``params`` (what fit-head
    resolved, e.g. the seed), the MLP's settings over them, what the user ``given`` over those."""
    if head_type == "mlp":
        return {**params, **MLP_HEAD, **given}
    return dict(params)


def check_head_type(head_type: str, given: dict[str, Any]) -> None:
    """A clear error for an unknown ``--head`` or one that contradicts the given head parameters."""
    if head_type not in HEAD_TYPES:
        raise UsageError(f"--head {head_type!r} is not known", f"use one of: {', '.join(HEAD_TYPES)}")
    if head_type == "linear" and (given.get("hidden") or given.get("norm", "none") != "none"):
        raise UsageError("--head linear with --hidden: a linear head has no hidden layer", "drop one of them")


def fixed_choice(head_type: str, given: dict[str, Any], params: dict[str, Any], why: str) -> HeadChoice:
    """No comparison: ``head_type`` ``linear``/``mlp`` (the MLP with fastai's settings under what is given), or
    for ``auto`` exactly the head parameters given (``--hidden 256 --solver adamw`` is that MLP, as always)."""
    kind = "mlp" if head_type == "mlp" or given.get("hidden") else "linear"
    fitted = head_params("mlp", params, given) if head_type == "mlp" else dict(params)
    return HeadChoice(kind, fitted, "given" if head_type != "auto" else "none", why)


def _mlp_scores(
    params: dict[str, Any], given: dict[str, Any], Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray
) -> dict:
    from .estimator import SoftmaxHead
    from .solvers import validation_scores

    head = SoftmaxHead(**head_params("mlp", params, given)).fit(Xtr, ytr)
    acc, loss = validation_scores(head.module_, Xva, head.encode(yva, "y_val"))
    return {"accuracy": acc, "log_loss": loss}


def choose_head(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray | None,
    y_val: np.ndarray | None,
    params: dict[str, Any],
    given: dict[str, Any] | None = None,
    *,
    cv_below: int = CV_BELOW,
    folds: int = CV_FOLDS,
    seed: int = 0,
) -> HeadChoice:
    """Fit the linear probe (along its L2 grid) and the MLP head, score both on the validation rows (or by
    cross-validation below ``cv_below`` of them), and return the better one's parameters."""
    given = dict(given or {})
    n_val = 0 if y_val is None else len(y_val)
    if X_val is not None and y_val is not None and n_val >= cv_below:
        scores = path_scores(params, X_train, y_train, X_val, y_val, walk_all=False)
        best = max(scores, key=lambda t: (t["accuracy"], -t["log_loss"]))
        tried = [
            {"head": "linear", **best},
            {"head": "mlp", **_mlp_scores(params, given, X_train, y_train, X_val, y_val)},
        ]
        method, desc = "split", f"validation split ({n_val} rows)"
    else:
        tried, k, n = _cross_validate(X_train, y_train, X_val, y_val, params, given, folds, seed)
        method, desc = "cv", f"stratified {k}-fold cross-validation over {n} rows (seed {seed})"
    win = max(tried, key=lambda t: (round(t["accuracy"], 9), t["head"] == "linear", -t["log_loss"]))
    chosen = str(win["head"])
    out = head_params(chosen, params, given)
    get_reporter().table(
        f"heads tried ({desc})",
        ["head", "accuracy", "log-loss", ""],
        [[t["head"], f"{t['accuracy']:.4f}", f"{t['log_loss']:.4f}", "<- chosen" if t is win else ""] for t in tried],
    )
    return HeadChoice(chosen, out, method, desc, tried)


def _cross_validate(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray | None,
    y_val: np.ndarray | None,
    params: dict[str, Any],
    given: dict[str, Any],
    folds: int,
    seed: int,
) -> tuple[list[dict[str, Any]], int, int]:
    has_val = X_val is not None and y_val is not None and len(y_val) > 0
    X = np.vstack([X_train, X_val]) if has_val else X_train
    y = np.concatenate([y_train, y_val]) if has_val else np.asarray(y_train)
    splits = cv_folds(y, folds, seed, "to choose the head", "pass --head linear or mlp")
    k = len(splits)
    lin: dict[float, list[tuple[float, float]]] = {}
    mlp: list[tuple[float, float]] = []
    for tr, va in splits:
        for r in path_scores(params, X[tr], y[tr], X[va], y[va], walk_all=True):
            lin.setdefault(r["l2"], []).append((r["accuracy"], r["log_loss"]))
        m = _mlp_scores(params, given, X[tr], y[tr], X[va], y[va])
        mlp.append((m["accuracy"], m["log_loss"]))

    def row(head: str, s: list[tuple[float, float]], **extra: Any) -> dict[str, Any]:
        acc = [a for a, _ in s]
        return {"head": head, **extra, "accuracy": float(np.mean(acc)), "log_loss": float(np.mean([b for _, b in s])),
                "accuracy_std": float(np.std(acc)), "folds": len(s)}  # fmt: skip

    lin_rows = [row("linear", s, l2=l2) for l2, s in lin.items() if len(s) == k]
    best_lin = max(lin_rows, key=lambda t: (t["accuracy"], -t["log_loss"]))
    return [best_lin, row("mlp", mlp)], k, len(y)
