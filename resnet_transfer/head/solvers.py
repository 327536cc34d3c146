"""The solvers behind :class:`head.SoftmaxHead`, as functions on a head module and numpy arrays.

In the manner of scikit-learn's ``linear_model/_logistic.py``: the estimator validates its parameters and
data and owns the fitted state; these functions do the numerical work on already-checked arrays.

* :func:`fit_full` -- one full-batch fit at a fixed L2: L-BFGS (linear head: loss and gradient by hand;
  MLP: autograd) or scikit-learn's ``LogisticRegression`` (``solver="sklearn"``, the reference).
* :func:`l2_path` -- the L2 strength chosen on validation rows, walking a grid from strong to weak with
  warm starts (the curvature history is carried along the path).
Minibatch AdamW (``fit_adamw`` and its batch sources) is in ``minibatch.py``.

``module`` is a :class:`head.HeadModule` (``mean``/``scale`` buffers, ``net``); its standardisation
(:func:`head.set_standardisation`) and logits (:func:`head.predict_logits`) live with it in head.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ..base import get_reporter
from ..images import stratified_split
from .module import predict_logits

SOLVERS = ("lbfgs", "adamw", "onecycle", "sklearn")
# L2 strengths tried on the validation split (per-sample mean loss, standardised features), strong -> weak
DEFAULT_L2_GRID = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
DEFAULT_L2 = 1e-3  # used when there is no validation data to choose with
DEFAULT_WEIGHT_DECAY = 1e-4  # adamw's decoupled weight decay when l2 is not given
SELECT_ROWS = 4096  # L2 is selected on at most this many training rows, then fitted on all of them
# L-BFGS iteration budgets: generous where an evaluation is cheap (rows x features below LARGE), short
# (warm-started) above it, where each evaluation is two passes over a large matrix
LARGE = 10_000_000
ITER_SMALL, ITER_LARGE, PATH_ITER_SMALL, PATH_ITER_LARGE = 100, 8, 30, 5


SMALL_PROBLEM = 1 << 20  # feature values below which a fit runs on one thread


@contextmanager
def threads_for(values: int) -> Iterator[None]:
    """One torch thread for a small problem (``values`` = rows x features), the caller's setting otherwise.

    A tiny fit is thousands of sub-millisecond ops; with two threads each op waits for the other thread
    at an OpenMP barrier, which on a busy machine costs milliseconds (measured here: 6 ms per addmm +
    log_softmax of a 29 x 8 problem with 2 threads, 0.04 ms with 1), so a 36-row fit took seconds."""
    before = torch.get_num_threads()
    if values >= SMALL_PROBLEM or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def iteration_budget(values: int, path: bool, given: int | None = None) -> int:
    """L-BFGS iterations: ``given`` when set, else by the training problem's size (rows x features)."""
    if given is not None:
        return int(given)
    large = values >= LARGE
    if path:
        return PATH_ITER_LARGE if large else PATH_ITER_SMALL
    return ITER_LARGE if large else ITER_SMALL


def use_bf16(X: np.ndarray, precision: str) -> bool:
    """bf16 matmuls for the linear L-BFGS: asked for, or (auto) a CPU with native bf16 and a feature
    matrix large enough for the one-off conversion to pay (>= 4M values)."""
    if precision in ("bf16", "fp32"):
        return precision == "bf16"
    from ..base import cpu_supports_bf16

    return X.size >= 4_000_000 and cpu_supports_bf16()


# ---------------------------------------------------------------------------------------------- L-BFGS


class FullBatchSolver:
    """One full-batch fit at a time, warm-started from the module's current parameters."""

    def run(self, l2: float, max_iter: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError


class _LBFGSBase(FullBatchSolver):
    """Full-batch L-BFGS on a flat parameter vector with a backtracking (Armijo) line search.

    The curvature history survives a change of ``l2`` along the regularisation path: the L2 term is
    quadratic, so each stored gradient difference ``y`` is corrected by ``(l2_new - l2_old) * P s``
    exactly (``P`` masks the penalised entries)."""

    history = 10
    # subclasses set theta (flat params), penalty_mask; define loss_grad(theta) -> (data loss, grad), write_back()
    theta: torch.Tensor
    penalty_mask: torch.Tensor

    def __init__(self) -> None:
        self.S: list[torch.Tensor] = []
        self.Y: list[torch.Tensor] = []
        self.l2: float | None = None

    def loss_grad(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def write_back(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _fg(self, theta: torch.Tensor, l2: float) -> tuple[float, torch.Tensor]:
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


class LinearLBFGS(_LBFGSBase):
    """The linear head's loss and gradient by hand, standardisation folded into the weights so the
    (large) feature matrix is used as is: logits = X (W*s)^T + b - (W*s) m. Two matmuls per evaluation.

    ``bf16``: keep X in bfloat16 and run both matmuls in bf16 (fp32 accumulation; softmax, loss and the
    optimiser state stay fp32). ~2.7x faster on CPUs with native bf16; gradients carry ~0.4% relative
    rounding, far below what changes a classifier fitted to a validation-chosen L2."""

    def __init__(
        self, module: nn.Module, X: np.ndarray, y: np.ndarray, w: np.ndarray, smoothing: float, bf16: bool = False
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
        k, d = self.k, self.d
        with torch.no_grad():
            lin.weight.copy_(self.theta[: k * d].view(k, d))
            lin.bias.copy_(self.theta[k * d :])


class AutogradLBFGS(_LBFGSBase):
    """L-BFGS for the MLP head (autograd; dropout is off during the full-batch fit)."""

    def __init__(self, module: nn.Module, X: np.ndarray, y: np.ndarray, w: np.ndarray, smoothing: float) -> None:
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


class SklearnLogistic(FullBatchSolver):
    """scikit-learn's LogisticRegression (lbfgs, one BLAS thread: the fastest setting measured here) on
    the standardised features; warm-started along the L2 path. ``C = 1 / (l2 * sum of weights)``."""

    def __init__(self, module: nn.Module, X: np.ndarray, y: np.ndarray, w: np.ndarray, seed: int) -> None:
        from sklearn.linear_model import LogisticRegression

        self.module = module
        self.Xs = (X - module.mean.numpy()) * module.scale.numpy()
        self.y = y
        self.w = np.asarray(w, dtype=np.float64)
        self.present = np.unique(y)
        self.model = LogisticRegression(warm_start=True, random_state=seed)

    def run(self, l2: float, max_iter: int) -> int:
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
        W = np.zeros(tuple(lin.weight.shape), np.float32)
        b = np.full(lin.bias.shape, -30.0, np.float32)  # classes absent from training: never predicted
        W[self.present] = coef
        b[self.present] = icpt
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
        return int(np.max(self.model.n_iter_))


def make_solver(
    module: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    *,
    solver: str,
    label_smoothing: float = 0.0,
    precision: str = "auto",
    seed: int = 0,
) -> FullBatchSolver:
    """The full-batch solver for ``module`` (``solver`` = ``lbfgs`` or ``sklearn``) on rows ``X``/``y``
    (output indices) with per-row weights ``w``."""
    if solver == "sklearn":
        return SklearnLogistic(module, X, y, w, seed)
    if not isinstance(module.net, nn.Linear):
        return AutogradLBFGS(module, X, y, w, label_smoothing)
    return LinearLBFGS(module, X, y, w, label_smoothing, use_bf16(X, precision))


def fit_full(solver: FullBatchSolver, l2: float, max_iter: int) -> int:
    """Run ``solver`` at a fixed ``l2`` for at most ``max_iter`` iterations; the iterations used."""
    return solver.run(float(l2), int(max_iter))


def validation_scores(module: nn.Module, X_val: np.ndarray, y_val: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``module`` on validation rows (``y_val``: output indices)."""
    with torch.no_grad():
        logits = torch.from_numpy(predict_logits(module, X_val))
        acc = float((logits.argmax(1).numpy() == y_val).mean())
        loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(np.asarray(y_val, np.int64))))
    return acc, loss


def l2_path(
    module: nn.Module,
    make: Callable[[np.ndarray, np.ndarray, np.ndarray], FullBatchSolver],
    X: np.ndarray,
    rows: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    *,
    grid: Iterable[float],
    path_iter: int,
    patience: int | None = 2,
    seed: int = 0,
) -> tuple[float, list[dict[str, Any]]]:
    """Choose the L2 strength on ``val``: walk ``grid`` strong -> weak with warm starts on (a stratified
    subsample of at most ``SELECT_ROWS`` of) the training ``rows``; keep the strength with the best
    validation accuracy (ties: lower validation loss), stopping after ``patience`` grid points in a row
    worse than the best (``None``: the whole grid). ``module`` is left at the chosen point. Returns ``(l2, path)``, one entry per point tried."""
    if len(rows) > SELECT_ROWS:
        sub, _ = stratified_split(y[rows], 1.0 - SELECT_ROWS / len(rows), seed)
        rows = rows[sub]
    Xs, ys, ws = X[rows], y[rows], w[rows]
    path: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    best_l2, best_state, worse = None, None, 0
    solver = make(Xs, ys, ws)
    for l2 in sorted(grid, reverse=True):
        iters = solver.run(float(l2), path_iter)
        acc, loss = validation_scores(module, *val)
        path.append({"l2": float(l2), "val_accuracy": acc, "val_loss": loss, "iterations": iters})
        if best is None or (acc, -loss) > best:
            best, best_l2, worse = (acc, -loss), float(l2), 0
            best_state = {k: v.clone() for k, v in module.state_dict().items()}
        else:
            worse += 1
            if patience is not None and worse >= patience:
                break
    assert best_state is not None and best_l2 is not None and best is not None
    module.load_state_dict(best_state)
    get_reporter().info(
        f"l2 chosen on {len(val[1])} validation rows ({len(Xs)} training rows): {best_l2:g} "
        f"(val accuracy {best[0]:.4f})"
    )
    return best_l2, path
