"""`rt fit-head`: train a softmax head on a feature cache and write a head directory.

cache -> class checks -> stratified split (or a separate --val cache) -> :class:`SoftmaxHead` (in memory,
or AdamW streamed from the cache when the rows do not fit) -> model directory (meta.json +
head.safetensors) + report.json + confusion.png.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, UsageError
from .fsutil import atomic_write_json
from .report import get_reporter

VAL_NOTE = (
    "accuracy is on the validation rows, which also chose l2 / the early-stopping epoch: slightly "
    "optimistic; `rt evaluate` on images the head never saw gives an unbiased figure"
)


@dataclass
class FitHeadConfig:
    """Everything `rt fit-head` needs; the CLI fills it from its options."""

    cache: Path
    out: Path
    classes: int | None = None
    val: Path | None = None
    val_fraction: float = 0.2
    seed: int = 0
    solver: str = "lbfgs"
    l2: float | None = None
    hidden: int = 0
    dropout: float = 0.0
    class_weight: str | None = None  # None | "balanced"
    label_smoothing: float = 0.0
    max_iter: int | None = None  # None: by problem size (see SoftmaxHead)
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    patience: int = 5
    max_memory_gb: float | None = None  # above this, stream from the cache (adamw); default: 40% of RAM
    overwrite: bool = False
    plot: bool = True


@dataclass
class FitHeadResult:
    out: Path
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _memory_budget_bytes(cfg: FitHeadConfig) -> float:
    if cfg.max_memory_gb is not None:
        return cfg.max_memory_gb * 1e9
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8e9
    return 0.4 * total


def _class_counts(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    return {c: int((labels == i).sum()) for i, c in enumerate(classes)}


def _check_classes(cfg: FitHeadConfig, cache: Any) -> list[str]:
    classes = list(cache.classes)
    counts = _class_counts(cache.labels, classes)
    listing = ", ".join(f"{c} ({n})" for c, n in counts.items())
    if cfg.classes is not None and cfg.classes != len(classes):
        raise UsageError(
            f"--classes {cfg.classes}, but {cache.path} holds {len(classes)} classes: {listing or 'none'}",
            f"pass --classes {len(classes)} (or omit it), or re-extract from a folder with the classes you want",
        )
    with_rows = [c for c, n in counts.items() if n > 0]
    if len(with_rows) < 2:
        raise DataError(
            f"{cache.path}: labelled images for {len(with_rows)} class(es) only ({listing or 'none'})",
            "a classifier needs images of at least 2 classes: add them and run `rt extract` again",
        )
    return classes


def fit_head(cfg: FitHeadConfig) -> FitHeadResult:
    """Fit a head on ``cfg.cache`` and write the head directory ``cfg.out``; returns the report."""
    from .cache import FeatureCache
    from .head import SoftmaxHead, stratified_split
    from .modeldir import META, write_model_dir
    from .report import classification_metrics, plot_confusion

    rep = get_reporter()
    warn_start = len(rep.warnings)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", "give a directory name, e.g. --out my-head/")
    if (out / META).exists() and not cfg.overwrite:
        raise UsageError(f"--out {out} already holds a head/model", "pass --overwrite, or choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / META).exists():
        raise UsageError(f"--out {out} exists and is not empty", "choose a new or empty directory")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise UsageError(f"--val-fraction {cfg.val_fraction} must be between 0 and 1", "use e.g. 0.2")

    t0 = time.perf_counter()
    cache = FeatureCache(cfg.cache)
    with cache:
        classes = _check_classes(cfg, cache)
        k = len(classes)
        labelled = cache.labelled
        labels = cache.labels[labelled]
        counts = np.bincount(labels, minlength=k)
        for i, c in enumerate(classes):
            if counts[i] == 0:
                rep.warn(f"class {c!r} has no images in {cache.path}: the head will never predict it")

        # validation rows: a separate cache, or a stratified split with a fixed seed
        X_val = y_val = None
        if cfg.val is not None:
            vcache = FeatureCache(cfg.val)
            with vcache:
                vcache.check_identity(cache.identity, f"the training cache {cache.path}")
                vrows, y_val = vcache.labelled_as(
                    classes,
                    f"--val {cfg.val} (classes of {cache.path})",
                    "use a validation cache extracted from a folder with the same class folders",
                )
                X_val = vcache.features(vrows)
            train_rows = labelled
            val_desc = str(cfg.val)
        else:
            tr, va = stratified_split(labels, cfg.val_fraction, cfg.seed)
            small = [classes[i] for i in range(k) if 0 < counts[i] < 2]
            if small:
                rep.warn(
                    f"class(es) {', '.join(repr(c) for c in small)} have a single image: none of it is held out "
                    "for validation (the validation figures do not cover them)"
                )
            if len(va) < 2 or len(np.unique(labels[va])) < 2:
                rep.warn(
                    f"too few images ({len(labelled)}) for a validation split: fitting on all of them with "
                    f"{'l2=' + str(cfg.l2) if cfg.l2 is not None else 'the default l2'} and reporting no accuracy"
                )
                tr, va = np.arange(len(labelled)), np.zeros(0, np.int64)
            train_rows = labelled[tr]
            val_desc = f"stratified {cfg.val_fraction:g} split of {cfg.cache} (seed {cfg.seed})"
            if len(va):
                X_val, y_val = cache.features(labelled[va]), labels[va]

        head = SoftmaxHead(
            cfg.solver,
            l2=cfg.l2,
            hidden=cfg.hidden,
            dropout=cfg.dropout,
            class_weight=cfg.class_weight,
            label_smoothing=cfg.label_smoothing,
            max_iter=cfg.max_iter,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            patience=cfg.patience,
            num_classes=k,
            seed=cfg.seed,
        )
        y_train = cache.labels[train_rows]
        need = len(train_rows) * cache.dim * 4 * (1.5 if cfg.solver == "lbfgs" else 1.0)
        streamed = need > _memory_budget_bytes(cfg)
        if streamed:
            if cfg.solver != "adamw":
                rep.warn(
                    f"{len(train_rows)} x {cache.dim} features need ~{need / 1e9:.1f} GB, over the memory budget "
                    f"(--max-memory-gb): streaming from the cache with --solver adamw instead of {cfg.solver}"
                )
                head.set_params(solver="adamw")
            rep.info(f"streaming {len(train_rows)} rows from {cache.path} in chunks (AdamW)")
            rows_sorted = np.sort(train_rows)
            head.fit_chunks(
                lambda e: cache.iter_chunks(rows_sorted, shuffle=e >= 0, seed=cfg.seed * 1000 + max(e, 0)),
                X_val,
                y_val,
                num_features=cache.dim,
            )
        else:
            rep.info(
                f"fitting a {'MLP (' + str(cfg.hidden) + ' hidden)' if cfg.hidden else 'linear'} head on "
                f"{len(train_rows)} rows x {cache.dim} features, {k} classes, solver {head.solver}"
            )
            head.fit(cache.features(train_rows), y_train, X_val, y_val)
        identity = cache.identity
        cache_path = str(cache.path)
        from .knn import knn_beside_fit

        knn = knn_beside_fit(cache, train_rows, y_train, X_val, y_val, head, streamed)

    train_seconds = float(head.fit_seconds_)
    metrics = None
    if X_val is not None and y_val is not None:
        pred = head.decision_function(X_val).argmax(1)
        metrics = classification_metrics(y_val, pred, classes)
    report: dict[str, Any] = {
        "kind": "fit-head",
        "accuracy": metrics["accuracy"] if metrics else None,
        "n_train": len(train_rows),
        "n_val": len(y_val) if y_val is not None else 0,
        "validation": val_desc if metrics else None,
        "solver": head.solver,
        "streamed": streamed,
        "l2": head.l2_,
        "l2_path": head.path_,
        "history": head.history_,
        "iterations": getattr(head, "n_iter_", None),
        "class_weight": cfg.class_weight,
        "label_smoothing": cfg.label_smoothing,
        "head": head.module_.config,
        "seconds": round(train_seconds, 4),
        "total_seconds": None,
        "cache": cache_path,
        "class_counts": _class_counts(labels, classes),
        "note": VAL_NOTE if metrics else "no validation rows: no accuracy measured",
    }
    if metrics:
        report.update({k2: metrics[k2] for k2 in ("per_class", "macro_f1", "balanced_accuracy", "confusion_matrix")})
    report["knn"] = knn
    report["classes"] = classes
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_model_dir(
        out,
        kind="head",
        identity=identity,
        classes=classes,
        head_config=head.module_.config,
        tensors={"head.safetensors": head.module_.state_dict()},
        extra_meta={
            "created": created,
            "fit": {"solver": head.solver, "l2": head.l2_, "cache": cache_path, "validation": report["validation"]},
        },
    )
    if metrics and cfg.plot:
        plot_confusion(metrics["confusion_matrix"], classes, out / "confusion.png", title=f"{out.name}: validation")
    report["warnings"] = rep.warnings[warn_start:]
    report["total_seconds"] = round(time.perf_counter() - t0, 4)
    atomic_write_json(out / "report.json", report)
    acc = f"validation accuracy {metrics['accuracy']:.4f} on {metrics['n']} rows" if metrics else "no validation"
    rep.info(f"wrote {out}: {acc}; l2={head.l2_:g}; trained in {train_seconds:.2f}s")
    return FitHeadResult(out, report, list(report["warnings"]))
