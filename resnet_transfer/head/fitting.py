"""`rt fit-head`: train a softmax head on a feature cache and write a head directory.

cache -> class checks -> stratified split (or a separate --val cache) -> :class:`SoftmaxHead` (in memory,
or AdamW streamed from the cache when the rows do not fit) -> temperature fitted on the validation rows
(temperature.py) -> model directory (meta.json + head.safetensors) + report.json + confusion.png.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..base import DataError, UsageError, atomic_write_json, get_reporter
from .neighbors import SEARCHES
from .views import DEFAULT_VIEWS, add_views, parse_views

VAL_NOTE = (
    "accuracy is on the validation rows, which also chose l2 / the early-stopping epoch: slightly "
    "optimistic; `rt evaluate` on images the head never saw gives an unbiased figure"
)


def head_parameter_names() -> list[str]:
    """The :class:`SoftmaxHead` parameters (its ``__init__`` signature, the one place they are declared)."""
    from .estimator import SoftmaxHead

    return list(SoftmaxHead().get_params(deep=False))


# set by fit-head itself from the cache and the config, not by the caller
_OWNED_BY_FIT = ("num_classes", "seed", "val_fraction")


@dataclass(init=False)
class FitHeadConfig:
    """Everything `rt fit-head` needs; the CLI fills it from its options.

    Besides the options of the command itself, any :class:`SoftmaxHead` parameter (``solver``, ``l2``,
    ``hidden``, ``lr``, ...) may be given by keyword; it lands in :attr:`head` and is passed through to
    the estimator, whose ``__init__`` holds the defaults (they are not repeated here)."""

    cache: Path
    out: Path
    classes: int | None = None
    val: Path | None = None
    val_fraction: float = 0.2
    seed: int = 0
    features: str = "auto"  # auto | final | a pooled stage | stages joined by + (head_select.py)
    max_memory_gb: float | None = None  # above this, stream from the cache (adamw); default: 40% of RAM
    overwrite: bool = False
    plot: bool = True
    knn_search: str = "auto"  # the kNN beside the head: auto | exact | index (neighbors.py)
    ood: Path | None = None  # images of the unknown (cache or folder): choose the OOD scorer (ood_fit.py)
    head_type: str = "auto"  # auto | linear | mlp (choose.py)
    head: dict[str, Any] = field(default_factory=dict)  # SoftmaxHead parameters given explicitly
    views: int | str = DEFAULT_VIEWS  # augmented views per training image added to the fit: auto | K | 0 (views.py)
    hflip: bool = True  # the views' random horizontal flips
    root: Path | None = None  # where the cache's images are, for --views (default: found as the tools find it)

    def __init__(
        self,
        cache: Path,
        out: Path,
        *,
        classes: int | None = None,
        val: Path | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        features: str = "auto",
        max_memory_gb: float | None = None,
        overwrite: bool = False,
        plot: bool = True,
        knn_search: str = "auto",
        ood: Path | None = None,
        head_type: str = "auto",
        head: dict[str, Any] | None = None,
        views: int | str = DEFAULT_VIEWS,
        hflip: bool = True,
        root: Path | None = None,
        **head_params: Any,
    ) -> None:
        self.cache, self.out, self.classes, self.val = cache, out, classes, val
        self.views, self.hflip, self.root = parse_views(views), bool(hflip), root
        self.val_fraction, self.seed, self.max_memory_gb = val_fraction, seed, max_memory_gb
        self.features = features
        self.overwrite, self.plot, self.knn_search, self.ood = overwrite, plot, knn_search, ood
        if knn_search not in SEARCHES:
            raise UsageError(f"--knn-search {knn_search!r} is not known", f"use one of {', '.join(SEARCHES)}")
        self.head = {**(head or {}), **head_params}
        self.head_type = head_type
        known = head_parameter_names()
        for name in self.head:
            if name not in known or name in _OWNED_BY_FIT:
                allowed = ", ".join(n for n in known if n not in _OWNED_BY_FIT)
                raise UsageError(f"fit-head: unknown head parameter {name!r}", f"use one of: {allowed}")
        from .choose import check_head_type

        check_head_type(head_type, self.head)

    def estimator_params(self, num_classes: int) -> dict[str, Any]:
        """The one mapping the estimator is built from: the given parameters, plus what fit-head sets."""
        return {**self.head, "num_classes": num_classes, "seed": self.seed}


@dataclass
class FitHeadResult:
    out: Path
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass
class ValidationRows:
    """Which rows train and which validate (a split of the cache, or a separate --val cache)."""

    train_rows: np.ndarray  # cache rows used for training
    X_val: np.ndarray | None
    y_val: np.ndarray | None
    description: str
    val_rows: np.ndarray | None = None  # cache rows held out (a split of --cache), else None
    train_keys: list[str] | None = None  # content keys of the rows (caches that record them)
    val_keys: list[str] | None = None


def _memory_budget_bytes(cfg: FitHeadConfig) -> float:
    if cfg.max_memory_gb is not None:
        return cfg.max_memory_gb * 1e9
    from ..base import total_ram_bytes

    return 0.4 * total_ram_bytes(default=8_000_000_000)


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


def _check_out(cfg: FitHeadConfig) -> Path:
    from .directory import META

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", "give a directory name, e.g. --out my-head/")
    if (out / META).exists() and not cfg.overwrite:
        raise UsageError(f"--out {out} already holds a head/model", "pass --overwrite, or choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / META).exists():
        raise UsageError(f"--out {out} exists and is not empty", "choose a new or empty directory")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise UsageError(f"--val-fraction {cfg.val_fraction} must be between 0 and 1", "use e.g. 0.2")
    return out


def _keys(cache: Any, rows: np.ndarray) -> list[str] | None:
    """The content keys of ``rows`` (``FeatureCache.keys``), or None for a cache that has none."""
    keys = getattr(cache, "keys", None)
    if not keys or callable(keys):
        return None
    picked = [str(keys[int(i)]) for i in rows]
    if not any(picked):  # "" = a row written without its file's content (a synthetic cache): no key
        return None
    return [k for k in picked if k]


def _validation_rows(cfg: FitHeadConfig, cache: Any, classes: list[str]) -> ValidationRows:
    """A separate cache's labelled rows, or a stratified split of ``cache``'s labelled rows (fixed seed)."""
    from ..cache import FeatureCache
    from ..images import stratified_split

    rep = get_reporter()
    labelled = cache.labelled
    labels = cache.labels[labelled]
    if cfg.val is not None:
        with FeatureCache(cfg.val) as vcache:
            vcache.check_identity(cache.identity, f"the training cache {cache.path}")
            vrows, y_val = vcache.labelled_as(
                classes,
                f"--val {cfg.val} (classes of {cache.path})",
                "use a validation cache extracted from a folder with the same class folders",
            )
            X_val = vcache.features(vrows)
            val_keys = _keys(vcache, vrows)
        return ValidationRows(labelled, X_val, y_val, str(cfg.val), None, _keys(cache, labelled), val_keys)
    counts = np.bincount(labels, minlength=len(classes))
    tr, va = stratified_split(labels, cfg.val_fraction, cfg.seed)
    small = [c for i, c in enumerate(classes) if 0 < counts[i] < 2]
    if small:
        rep.warn(
            f"class(es) {', '.join(repr(c) for c in small)} have a single image: none of it is held out "
            "for validation (the validation figures do not cover them)"
        )
    if len(va) < 2 or len(np.unique(labels[va])) < 2:
        l2 = cfg.head.get("l2")
        rep.warn(
            f"too few images ({len(labelled)}) for a validation split: fitting on all of them with "
            f"{'l2=' + str(l2) if l2 is not None else 'the default l2'} and reporting no accuracy"
        )
        tr, va = np.arange(len(labelled)), np.zeros(0, np.int64)
    desc = f"stratified {cfg.val_fraction:g} split of {cfg.cache} (seed {cfg.seed})"
    keys = (_keys(cache, labelled[tr]), _keys(cache, labelled[va]))
    if not len(va):
        return ValidationRows(labelled[tr], None, None, desc, labelled[va], *keys)
    return ValidationRows(labelled[tr], cache.features(labelled[va]), labels[va], desc, labelled[va], *keys)


def _needs_streaming(cfg: FitHeadConfig, cache: Any, rows: np.ndarray, solver: str) -> tuple[bool, float]:
    need = len(rows) * cache.dim * 4 * (1.5 if solver == "lbfgs" else 1.0)
    return need > _memory_budget_bytes(cfg), need


def _fit(
    cfg: FitHeadConfig,
    head: Any,
    cache: Any,
    split: ValidationRows,
    X_train: np.ndarray | None = None,
    y_train: np.ndarray | None = None,
) -> bool:
    """Fit ``head`` in memory (on ``X_train``, the chosen features, when given), or streamed from the
    cache (AdamW) over the memory budget; True if streamed."""
    rep = get_reporter()
    rows = split.train_rows
    solver = head.solver
    streaming, need = _needs_streaming(cfg, cache, rows, solver)
    if X_train is not None or not streaming:
        hidden = head.hidden
        X = cache.features(rows) if X_train is None else X_train
        rep.info(
            f"fitting a {'MLP (' + str(hidden) + ' hidden)' if hidden else 'linear'} head on "
            f"{len(X)} rows x {X.shape[1]} features, {len(cache.classes)} classes, solver {solver}"
        )
        head.fit(X, cache.labels[rows] if y_train is None else y_train, split.X_val, split.y_val)
        return False
    if solver != "adamw":
        rep.warn(
            f"{len(rows)} x {cache.dim} features need ~{need / 1e9:.1f} GB, over the memory budget "
            f"(--max-memory-gb): streaming from the cache with --solver adamw instead of {solver}"
        )
        head.set_params(solver="adamw")
    rep.info(f"streaming {len(rows)} rows from {cache.path} in chunks (AdamW)")
    rows_sorted = np.sort(rows)
    head.fit_chunks(
        lambda e: cache.iter_chunks(rows_sorted, shuffle=e >= 0, seed=cfg.seed * 1000 + max(e, 0)),
        split.X_val,
        split.y_val,
        num_features=cache.dim,
    )
    return True


def _report(
    cfg: FitHeadConfig, head: Any, split: ValidationRows, classes: list[str], labels: np.ndarray, cache_path: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    from ..base import classification_metrics

    metrics = None
    if split.X_val is not None and split.y_val is not None:
        metrics = classification_metrics(split.y_val, head.logits(split.X_val).argmax(1), classes)
    report: dict[str, Any] = {
        "kind": "fit-head",
        "accuracy": metrics["accuracy"] if metrics else None,
        "n_train": len(split.train_rows),
        "n_val": len(split.y_val) if split.y_val is not None else 0,
        "validation": split.description if metrics else None,
        "solver": head.solver,
        "streamed": False,
        "l2": head.l2_,
        "l2_path": head.path_,
        "history": head.history_,
        "iterations": getattr(head, "n_iter_", None),
        "class_weight": head.class_weight,
        "label_smoothing": head.label_smoothing,
        "head": head.module_.config,
        "seconds": round(float(head.fit_seconds_), 4),
        "total_seconds": None,
        "cache": cache_path,
        "class_counts": _class_counts(labels, classes),
        "note": VAL_NOTE if metrics else "no validation rows: no accuracy measured",
    }
    if metrics:
        report.update({k: metrics[k] for k in ("per_class", "macro_f1", "balanced_accuracy", "confusion_matrix")})
    report["classes"] = classes
    return report, metrics


def _val_candidates(cfg: FitHeadConfig, classes: list[str], cands: list[Any]) -> dict[str, np.ndarray]:
    from ..cache import FeatureCache
    from .select import load_candidates

    with FeatureCache(cfg.val) as vcache:
        vrows, _ = vcache.labelled_as(classes, f"--val {cfg.val}", "use a validation cache with the same classes")
        return load_candidates(vcache, vrows, cands)


def _choose_features(
    cfg: FitHeadConfig, cache: Any, classes: list[str], split: ValidationRows, cands: list[Any]
) -> tuple[Any, np.ndarray, ValidationRows]:
    """Pick the feature set and L2 (head_select.py); the chosen training matrix and validation rows."""
    from .select import load_candidates, select_features

    rep = get_reporter()
    params = cfg.estimator_params(len(classes))
    if params.get("solver") == "adamw":  # chosen with a linear probe; adamw then trains on the choice
        params = {**params, "solver": "lbfgs"}
    train = load_candidates(cache, split.train_rows, cands)
    val = None
    if split.y_val is not None:
        val = load_candidates(cache, split.val_rows, cands) if cfg.val is None else _val_candidates(cfg, classes, cands)
    rep.info(f"choosing among features {', '.join(train)} and l2 ({len(split.train_rows)} training rows)")
    sel = select_features(train, cache.labels[split.train_rows], val, split.y_val, params, seed=cfg.seed)
    rep.table(
        f"features and l2 tried ({sel.description})",
        ["features", "l2", "accuracy", "log-loss", ""],
        sel.table_rows(),
    )
    split = replace(split, X_val=val[sel.name] if val is not None else None)
    return sel, train[sel.name], split


def _maybe_choose_features(
    cfg: FitHeadConfig, cache: Any, classes: list[str], split: ValidationRows, params: dict[str, Any]
) -> tuple[tuple[Any, ValidationRows] | None, np.ndarray | None]:
    """``((selection, split with the chosen validation features), chosen training matrix)`` when the cache
    has pooled stages to choose from (or ``--features`` names some), else ``(None, None)``: the final
    features, exactly as before stages existed."""
    from .select import feature_candidates

    cands = feature_candidates(list(getattr(cache, "pooled_stages", None) or []), cfg.features)
    if cands == [None]:
        return None, None
    if _needs_streaming(cfg, cache, split.train_rows, str(params.get("solver", "lbfgs")))[0]:
        if cfg.features != "auto":
            raise UsageError(
                f"--features {cfg.features}: the training rows exceed the memory budget, and stage features "
                "are chosen and fitted in memory",
                "raise --max-memory-gb, or use --features final (streamed)",
            )
        get_reporter().warn("the training rows exceed the memory budget: using the final features, no choice")
        return None, None
    try:
        sel, X_train, vsplit = _choose_features(cfg, cache, classes, split, cands)
    except UsageError as exc:
        if cfg.features != "auto":
            raise
        get_reporter().warn(f"{exc.message}: using the final features")
        return None, None
    return (sel, vsplit), X_train


def _choose_head(
    cfg: FitHeadConfig, cache: Any, split: ValidationRows, params: dict[str, Any], X_train: np.ndarray | None
) -> tuple[Any, np.ndarray | None]:
    """``--head``: the given kind, or (auto) the linear probe or fastai's MLP head, whichever validates
    better (choose.py); with the training matrix it read, for the fit to reuse."""
    from .choose import SHAPE_PARAMS, choose_head, fixed_choice

    if cfg.head_type != "auto" or any(k in cfg.head for k in SHAPE_PARAMS):
        return fixed_choice(cfg.head_type, cfg.head, params, "given"), X_train
    if _needs_streaming(cfg, cache, split.train_rows, "lbfgs")[0]:
        return fixed_choice("auto", cfg.head, params, "over the memory budget: the linear head, streamed"), X_train
    if split.y_val is None:
        return fixed_choice("auto", cfg.head, params, "no validation rows to choose with: the linear head"), X_train
    X = cache.features(split.train_rows) if X_train is None else X_train
    try:
        labels = cache.labels[split.train_rows]
        return choose_head(X, labels, split.X_val, split.y_val, params, cfg.head, seed=cfg.seed), X
    except UsageError as exc:
        get_reporter().warn(f"{exc.message}: fitting the linear head")
        return fixed_choice("auto", cfg.head, params, exc.message), X


def fit_head(cfg: FitHeadConfig) -> FitHeadResult:
    """Fit a head on ``cfg.cache`` and write the head directory ``cfg.out``; returns the report."""
    from ..base import plot_confusion
    from ..cache import FeatureCache
    from .estimator import SoftmaxHead
    from .fit_outputs import calibrate, write_head_dir, write_split

    rep = get_reporter()
    warn_start = len(rep.warnings)
    out = _check_out(cfg)
    t0 = time.perf_counter()
    with FeatureCache(cfg.cache) as cache:
        classes = _check_classes(cfg, cache)
        labels = cache.labels[cache.labelled]
        counts = np.bincount(labels, minlength=len(classes))
        for i, c in enumerate(classes):
            if counts[i] == 0:
                rep.warn(f"class {c!r} has no images in {cache.path}: the head will never predict it")
        split = _validation_rows(cfg, cache, classes)
        params = cfg.estimator_params(len(classes))
        selection, X_train = _maybe_choose_features(cfg, cache, classes, split, params)
        if selection is not None:
            split = selection[1]
            if params.get("solver") != "adamw":
                params["l2"] = selection[0].l2
        choice, X_fit = _choose_head(cfg, cache, split, params, X_train)
        head = SoftmaxHead(**choice.params)
        X_fit, y_fit, views = add_views(cfg, cache, split, selection, X_fit, _memory_budget_bytes(cfg))
        streamed = _fit(cfg, head, cache, split, X_fit, y_fit)
        if selection is not None:
            head.module_.features = selection[0].features
        identity = cache.identity
        cache_path = str(cache.path)
        from .knn import knn_beside_fit

        rows = split.train_rows
        knn = knn_beside_fit(
            cache, rows, cache.labels[rows], split.X_val, split.y_val, head, cfg.knn_search, _memory_budget_bytes(cfg)
        )
        from .ood_fit import ood_beside_fit  # the out-of-distribution scorers (ood.py)

        ood, ood_report = ood_beside_fit(
            cache, split, head, X_train, cfg.ood, cfg.knn_search, _memory_budget_bytes(cfg)
        )

    calibration = calibrate(head, split)
    report, metrics = _report(cfg, head, split, classes, labels, cache_path)
    report["streamed"] = streamed
    report["features"] = head.module_.features
    if selection is not None:
        sel = selection[0]
        report["feature_selection"] = {
            "chosen": sel.name,
            "l2": sel.l2,
            "method": sel.method,
            "description": sel.description,
            "tried": sel.tried,
        }
    report["head_selection"], report["views"] = choice.as_report(), views
    report["temperature"] = head.module_.temperature
    report["calibration"] = calibration
    report["knn"] = knn
    report["ood"] = ood_report
    write_head_dir(out, head, identity, classes, report, ood)
    if metrics and cfg.plot:
        plot_confusion(metrics["confusion_matrix"], classes, out / "confusion.png", title=f"{out.name}: validation")
    report["warnings"] = rep.warnings[warn_start:]
    report["total_seconds"] = round(time.perf_counter() - t0, 4)
    atomic_write_json(out / "report.json", report)
    write_split(out, cfg, split)
    acc = f"validation accuracy {metrics['accuracy']:.4f} on {metrics['n']} rows" if metrics else "no validation"
    cal = (
        f"; temperature {calibration['temperature']:.3g} (val log-loss {calibration['log_loss']['before']:.4f} -> "
        f"{calibration['log_loss']['after']:.4f}, ECE {calibration['ece']['before']:.4f} -> "
        f"{calibration['ece']['after']:.4f})"
        if calibration
        else ""
    )
    rep.info(f"wrote {out}: {acc}; l2={head.l2_:g}{cal}; trained in {head.fit_seconds_:.2f}s")
    return FitHeadResult(out, report, list(report["warnings"]))
