"""`rt curve`: label-efficiency curves from two caches ("would labelling more images help?").

For each ``k`` (labelled images per class) and each seed, ``k`` training rows per class are drawn, the
softmax head (:class:`SoftmaxHead`, the linear probe, with `rt fit-head`'s protocol: L2 chosen on a
stratified split, then refitted on all ``k`` rows) and a cosine kNN (``k`` neighbours chosen by
cross-validation on the same rows) are fitted on them, and both are scored on every labelled row of the test
cache. Subsets are nested: a seed's ``k=5`` images are among its ``k=10`` ones, so a curve's steps show the
effect of more data, not of another draw.

Per ``k``: the mean over seeds and a 95% **t-interval** over seeds (``mean +- t(0.975, s-1) * sd / sqrt(s)``,
scipy's Student t): the uncertainty of the mean from the choice of the k-subset, for this test set. It does not
cover the test set's own sampling error (a binomial term, reported separately as ``test_se``). Every
per-seed score is kept in the JSON. Only head fits run: seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..base import DataError, UsageError, atomic_write_json, get_reporter, save_png

METHODS = ("probe", "knn")
ALL = 0  # k = 0 stands for "every training row"


@dataclass
class CurveConfig:
    train: Path
    test: Path
    ks: Sequence[int] = (5, 10, 20, 50)  # 0 = all training rows
    seeds: int = 10
    out: Path = Path("curve")
    l2: float | None = None  # None: chosen per fit on a split of the k-subset, as rt fit-head does
    knn: bool = True
    plot: bool = True
    knn_search: str = "auto"  # neighbour search of the kNN fits: auto | exact | index


@dataclass
class CurveResult:
    report: dict[str, Any]
    files: list[Path] = field(default_factory=list)


def t_interval(scores: Sequence[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """``(mean, low, high)`` of a Student-t interval for the mean of ``scores`` (``None`` bounds for one
    score: no interval from a single seed)."""
    from scipy.stats import t

    x = np.asarray(scores, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, None, None
    half = float(t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return mean, mean - half, mean + half


def nested_subsets(y: np.ndarray, ks: Sequence[int], seed: int, n_classes: int) -> dict[int, np.ndarray]:
    """For one seed: ``{k: row indices}`` with ``k`` rows of every class (0 = all rows), nested in ``k``."""
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(np.flatnonzero(y == c)) for c in range(n_classes)]
    out = {}
    for k in ks:
        out[k] = np.sort(np.concatenate([p if k == ALL else p[:k] for p in perms]))
    return out


def _fit_scores(
    X: np.ndarray,
    y: np.ndarray,
    Xt: np.ndarray,
    yt: np.ndarray,
    seed: int,
    n_classes: int,
    l2: float | None,
    knn: bool,
    knn_search: str,
) -> dict[str, float]:
    from sklearn.metrics import accuracy_score

    from ..head import SoftmaxHead, choose_k, fit_knn

    head = SoftmaxHead("lbfgs", l2=l2, num_classes=n_classes, seed=seed).fit(X, y)
    out = {"probe": float(accuracy_score(yt, head.predict(Xt)))}
    if knn:
        k = choose_k(X, y, search=knn_search, seed=seed).k
        out["knn"] = float(accuracy_score(yt, fit_knn(X, y, k, knn_search).predict(Xt)))
    return out


def score_subsets(
    rows_features: Callable[[np.ndarray], np.ndarray],
    y: np.ndarray,
    Xt: np.ndarray,
    yt: np.ndarray,
    subsets: Sequence[dict[int, np.ndarray]],
    n_classes: int,
    *,
    l2: float | None = None,
    knn: bool = True,
    knn_search: str = "auto",
) -> dict[int, dict[str, list[float]]]:
    """``{k: {method: [test accuracy per seed]}}``: the probe (and the kNN) fitted on each seed's k-subset of
    the training rows (``rows_features(rows)`` gives their features, ``y`` every training label) and scored
    on ``(Xt, yt)``. The one scoring loop of `rt curve` and `rt compare`; per-fit messages stay quiet."""
    import torch

    from ..base import Reporter, set_reporter

    rep = get_reporter()
    ks = list(subsets[0]) if subsets else []
    scores: dict[int, dict[str, list[float]]] = {k: {m: [] for m in METHODS if m == "probe" or knn} for k in ks}
    quiet = Reporter(verbose=False)  # per-fit messages (the chosen l2 of 40 fits) stay out of the output
    previous = set_reporter(quiet)
    threads = torch.get_num_threads()
    # many tiny fits: one thread each (an OpenMP team's start-up and sync cost more than the fit itself,
    # 10-40x on a busy 2-core machine)
    torch.set_num_threads(1)
    try:
        for seed, by_k in enumerate(subsets):
            for k, rows in by_k.items():
                fit = _fit_scores(rows_features(rows), y[rows], Xt, yt, seed, n_classes, l2, knn, knn_search)
                for m, s in fit.items():
                    scores[k][m].append(s)
    finally:
        torch.set_num_threads(threads)
        set_reporter(previous)
    for w in dict.fromkeys(quiet.warnings):
        rep.warn(w)
    return scores


def check_ks(ks: Sequence[int], seeds: int, y: np.ndarray, classes: list[str], where: Any) -> list[int]:
    """The ``ks`` (images per class, 0 = all) every class of the labels ``y`` can fill, sorted, "all" last;
    the others left out with a warning naming ``where`` (the training data). Bad values are usage errors."""
    if seeds < 1:
        raise UsageError(f"--seeds {seeds} must be at least 1", "e.g. --seeds 10")
    out = sorted({int(k) for k in ks}, key=lambda k: (k == ALL, k))
    if not out or any(k < 0 for k in out):
        raise UsageError(f"--k {list(ks)}: give images per class as positive integers (or 'all')", "e.g. --k 5,10,20")
    counts = np.bincount(y, minlength=len(classes))
    fewest = int(counts.min())
    too_big = [k for k in out if k != ALL and k > fewest]
    if too_big:
        get_reporter().warn(
            f"k={', '.join(map(str, too_big))} left out: class {classes[int(counts.argmin())]!r} has {fewest} "
            f"training images in {where}"
        )
    out = [k for k in out if k not in too_big]
    if not out:
        raise DataError(f"--k {list(ks)}: every k exceeds the {fewest} images of the smallest class", "use smaller k")
    return out


@dataclass
class _Data:
    """The rows the curve's fits use: training features of the rows some subset holds (as stored, e.g.
    float16), their positions, the subsets per seed, and the test rows (float32)."""

    X: np.ndarray
    y: np.ndarray  # labels of every labelled training row
    needed: np.ndarray  # the labelled-row positions X holds, sorted
    subsets: list[dict[int, np.ndarray]]
    ks: list[int]
    Xt: np.ndarray
    yt: np.ndarray
    classes: list[str]

    def subset(self, rows: np.ndarray) -> np.ndarray:
        return self.X[np.searchsorted(self.needed, rows)]


def _load(cfg: CurveConfig) -> _Data:
    """Check the caches, draw every seed's nested subsets, then read only the training rows they hold (in
    whole chunks, as stored): the cost follows the k-subsets, not the size of the training cache."""
    from ..cache import FeatureCache

    with FeatureCache(cfg.train) as tr, FeatureCache(cfg.test) as te:
        te.check_identity(tr.identity, f"the training cache {tr.path}")
        classes = list(tr.classes)
        rows = tr.labelled
        if not len(rows):
            raise DataError(f"--train {cfg.train}: no labelled rows", "extract a labelled folder or manifest")
        trows, yt = te.labelled_as(
            classes, f"--test {cfg.test} (classes of {cfg.train})", "use a test cache of the same classes"
        )
        y = tr.labels[rows]
        ks = check_ks(cfg.ks, cfg.seeds, y, classes, cfg.train)
        subsets = [nested_subsets(y, ks, seed, len(classes)) for seed in range(cfg.seeds)]
        needed = np.unique(np.concatenate([r for sub in subsets for r in sub.values()]))
        get_reporter().info(
            f"reading {len(needed):,} of the {len(rows):,} training rows of {cfg.train} (the rows the subsets use)"
        )
        X = tr.features(rows[needed], dtype=None)
        return _Data(X, y, needed, subsets, ks, te.features(trows), yt, classes)


def summarize(scores: dict[int, dict[str, list[float]]], n_test: int) -> list[dict[str, Any]]:
    """Per ``k`` and method: mean, 95% t-interval over seeds, sd, the test set's binomial error and the scores."""
    out = []
    for k, by_method in scores.items():
        for m, xs in by_method.items():
            mean, lo, hi = t_interval(xs)
            out.append(
                {
                    "k": "all" if k == ALL else k,
                    "method": m,
                    "seeds": len(xs),
                    "mean": mean,
                    "low": lo,
                    "high": hi,
                    "sd": float(np.std(xs, ddof=1)) if len(xs) > 1 else None,
                    "test_se": float(np.sqrt(max(mean * (1 - mean), 0.0) / max(n_test, 1))),
                    "scores": xs,
                }
            )
    return out


def curve(cfg: CurveConfig) -> CurveResult:
    """Fit the probe (and the kNN) on nested k-per-class subsets of ``cfg.train`` for ``cfg.seeds`` seeds,
    score on ``cfg.test``; write ``curve.json`` and ``curve.png`` under ``cfg.out``; print the table."""
    rep = get_reporter()
    t0 = time.perf_counter()
    data = _load(cfg)
    y, Xt, yt, classes = data.y, data.Xt, data.yt, data.classes
    scores = score_subsets(
        data.subset, y, Xt, yt, data.subsets, len(classes), l2=cfg.l2, knn=cfg.knn, knn_search=cfg.knn_search
    )
    summary = summarize(scores, len(yt))
    if cfg.seeds < 2:
        rep.warn("one seed: no interval (pass --seeds 5 or more)")
    report = {
        "kind": "curve",
        "train": str(cfg.train),
        "test": str(cfg.test),
        "classes": classes,
        "n_train": len(y),
        "rows_read": len(data.needed),
        "n_test": len(yt),
        "seeds": cfg.seeds,
        "l2": cfg.l2 if cfg.l2 is not None else "chosen per fit",
        "interval": "95% t-interval (Student t) over seeds of the k-subset; the test set's own error: test_se",
        "subsets": "nested in k per seed (seed s draws one permutation per class)",
        "curve": summary,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    rows = [[r["k"], r["method"], f"{r['mean']:.3f}", _ci(r), r["seeds"]] for r in summary]
    rep.table(
        f"test accuracy on {len(yt)} images ({cfg.seeds} seeds, 95% t-interval)",
        ["k/class", "method", "mean", "95% interval", "seeds"],
        rows,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [atomic_write_json(out / "curve.json", report)]
    if cfg.plot:
        files.append(plot_curve(report, out / "curve.png"))
    rep.info(f"wrote {', '.join(map(str, files))} in {report['seconds']:.1f}s")
    return CurveResult(report, files)


def _ci(r: dict[str, Any]) -> str:
    return "-" if r["low"] is None else f"{r['low']:.3f} - {r['high']:.3f}"


def plot_curve(report: dict[str, Any], path: str | Path) -> Path:
    """Accuracy against images per class (log scale), one line per method with 95% error bars."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    try:
        # "all" sits at the training set's mean images per class (right of the largest k)
        largest = max((r["k"] for r in report["curve"] if r["k"] != "all"), default=1)
        full = max(report["n_train"] / len(report["classes"]), largest * 1.5)
        for m, shift in zip(METHODS, (0.97, 1.03)):  # side by side, so the error bars do not hide each other
            pts = [r for r in report["curve"] if r["method"] == m]
            if not pts:
                continue
            xs = [(full if r["k"] == "all" else r["k"]) * shift for r in pts]
            ys = [r["mean"] for r in pts]
            err = [
                [0 if r["low"] is None else r["mean"] - r["low"] for r in pts],
                [0 if r["high"] is None else r["high"] - r["mean"] for r in pts],
            ]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label="linear probe" if m == "probe" else "cosine kNN")
        ax.set_xscale("log")
        ax.minorticks_off()
        ticks = sorted({full if r["k"] == "all" else r["k"] for r in report["curve"]})
        ax.set_xticks(ticks, [f"all ({full:.0f})" if t == full else str(t) for t in ticks])
        ax.set_xlabel("labelled images per class")
        ax.set_ylabel(f"test accuracy ({report['n_test']} images)")
        ax.set_title(f"{Path(report['train']).name}: mean and 95% t-interval, {report['seeds']} seeds", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return save_png(fig, path)
    finally:
        plt.close(fig)
