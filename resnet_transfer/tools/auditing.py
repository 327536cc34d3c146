"""`rt audit`: what is wrong with a labelled dataset, from its cache alone (no forward pass).

The training rows are read once, as stored (float16 stays float16; blocks become float32 when computed),
and one neighbour graph of them (each row's ``GRAPH_K`` nearest others, :mod:`..head.neighbors`: exact
search in blocks, or faiss's index where exact search would be slow) serves the near duplicates and the
outliers; the test rows' nearest training rows serve the near leakage. The report's ``neighbours`` says
which search ran for each, and the index's measured recall.

- **Exact duplicates**: the same content key (``FeatureCache.keys`` where the cache has them, else
  ``fsutil.file_digest`` of the image files where they can be found, else identical feature vectors),
  within the training cache and across training / test (leakage).
- **Near duplicates**: cosine similarity of the mean-centred features (centred on the training rows; raw
  ReLU features are all positive and look alike) at or above ``near_threshold``, within training (among
  each row's ``GRAPH_K`` nearest neighbours) and across training / test (each test row's ``NEIGHBOURS``).
- **Likely label errors** (the idea of cleanlab's confident learning): out-of-sample probabilities from a
  stratified k-fold fit of the project's softmax head (L-BFGS, the L2 of scikit-learn's
  ``LogisticRegression(C=0.1)`` on standardised features); a row is flagged when another class is predicted
  and the probability of its given label is below that class's mean self-confidence; ranked by that
  probability, lowest first.
- **Class imbalance**: counts per class, the largest / smallest ratio, classes under half a fair share.
- **Outliers**: the local outlier factor (scikit-learn's ``LocalOutlierFactor`` definition: low kNN density
  against the neighbours' density) computed on the neighbour graph.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..base import DataError, UsageError, atomic_write_json, get_reporter
from ..head import SEARCHES

NEAR_THRESHOLD = 0.95
NEIGHBOURS = 5  # nearest training rows of each test row (near leakage)
GRAPH_K = 20  # nearest other training rows of each training row (near duplicates, outliers)
MAX_FOLDS = 5
C_LABELS = 0.1  # the label-error fits' L2 is l2 = 1 / (C_LABELS * rows), LogisticRegression(C=0.1)'s
TOP = 10
LABEL_ITER = 30  # L-BFGS iterations of each label-error fit (docs/performance.md: flagged rows vs more)


@dataclass
class AuditConfig:
    cache: Path
    test: Path | None = None
    out: Path = Path("audit")
    near_threshold: float = NEAR_THRESHOLD
    top: int = TOP
    root: Path | None = None  # folder the training cache's paths are relative to (default: sheets.image_root)
    test_root: Path | None = None
    sheet: bool = True
    seed: int = 0
    search: str = "auto"  # neighbour search: auto | exact | index (head.neighbors)


@dataclass
class AuditResult:
    report: dict[str, Any]
    files: list[Path] = field(default_factory=list)


def content_keys(cache: Any, files: list[Path | None]) -> tuple[list[str], str]:
    """One key per row and what it is: the cache's content keys, else digests of the files, else a hash of
    the feature vector (exact equality)."""
    import hashlib

    from ..base import file_digest

    keys = getattr(cache, "keys", None)
    keys = list((keys() if callable(keys) else keys) or [])
    if len(keys) == cache.n and all(keys):
        return keys, "content key"
    if files and all(f is not None and f.is_file() for f in files):
        return [file_digest(f) for f in files], "file digest"  # type: ignore[arg-type]
    feats = cache.features(dtype=None)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in feats], "identical features"


def exact_groups(keys: list[str]) -> list[list[int]]:
    """Groups (2 or more rows) sharing a key."""
    by: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        by[k].append(i)
    return [g for g in by.values() if len(g) > 1]


def near_pairs(
    A: np.ndarray, B: np.ndarray | None, threshold: float, k: int = NEIGHBOURS, search: str = "exact"
) -> list[tuple[int, int, float]]:
    """``(i, j, cosine)`` with cosine >= ``threshold`` between rows of ``A`` and of ``B`` (``B=None``: within
    ``A``, each pair once, ``i < j``), from each row of ``A``'s ``k`` nearest neighbours (the rows are
    compared as given: centre them first)."""
    from ..head import search as neighbours

    ref = A if B is None else B
    if len(ref) < (2 if B is None else 1) or not len(A):
        return []
    zero = np.zeros(A.shape[1], dtype=np.float32)
    return pairs(neighbours(ref, None if B is None else A, k, zero, search), threshold, B is None)


def pairs(nb: Any, threshold: float, within: bool) -> list[tuple[int, int, float]]:
    """``(query row, reference row, cosine)`` of the neighbours in ``nb`` at or above ``threshold``, highest
    first; ``within`` (a self-join): each pair once as ``(min, max)``."""
    q, c = np.nonzero((nb.similarity >= threshold) & (nb.index >= 0))
    found: dict[tuple[int, int], float] = {}
    for i, j, sim in zip(q.tolist(), nb.index[q, c].tolist(), nb.similarity[q, c].tolist()):
        key = (min(i, j), max(i, j)) if within else (i, j)  # python ints: numpy ones reach JSON as strings
        found[key] = max(sim, found.get(key, -1.0))
    return sorted(((i, j, s) for (i, j), s in found.items()), key=lambda t: (-t[2], t[0], t[1]))


def label_issues(X: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """Out-of-sample class probabilities of every row (stratified k-fold fits of the softmax head, L-BFGS)
    and the mask of likely label errors (see the module docstring). ``X`` may be float16: each fold's
    training rows are made float32 for its fit (the log says how large). Returns ``(probs, flagged, how)``."""
    from sklearn.model_selection import StratifiedKFold

    from ..head import SoftmaxHead

    classes, counts = np.unique(y, return_counts=True)
    folds = int(min(MAX_FOLDS, counts.min()))
    if len(classes) < 2 or folds < 2:
        raise DataError("label errors need at least 2 classes with 2 or more images each", "add images")
    n_classes = int(y.max()) + 1
    probs = np.zeros((len(y), n_classes))
    fold_rows = len(y) - len(y) // folds
    get_reporter().info(
        f"label errors: {folds} folds, each fitting the softmax head on ~{fold_rows:,} rows x {X.shape[1]:,} "
        f"features as float32 ({fold_rows * X.shape[1] * 4 / 1e9:.2f} GB)"
    )
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for tr, te in cv.split(np.zeros(len(y)), y):
        head = SoftmaxHead(
            "lbfgs", l2=1.0 / (C_LABELS * len(tr)), max_iter=LABEL_ITER, num_classes=n_classes, seed=seed
        )
        head.fit(np.asarray(X[tr], dtype=np.float32), y[tr])
        for lo in range(0, len(te), 8192):
            probs[te[lo : lo + 8192]] = head.predict_proba(np.asarray(X[te[lo : lo + 8192]], dtype=np.float32))
    given = probs[np.arange(len(y)), y]
    threshold = np.array([given[y == c].mean() if (y == c).any() else 1.0 for c in range(probs.shape[1])])
    flagged = (probs.argmax(1) != y) & (given < threshold[y])
    how = f"{folds}-fold cross-validated softmax head (L-BFGS, {LABEL_ITER} iterations, l2 = 1 / ({C_LABELS} x rows))"
    return probs, flagged, how


def imbalance(labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Counts per class, the largest/smallest ratio and the classes below half of a fair share."""
    counts = np.bincount(labels, minlength=len(classes))
    present = counts[counts > 0]
    fair = counts.sum() / max(1, len(classes))
    return {
        "counts": {c: int(n) for c, n in zip(classes, counts)},
        "ratio": float(present.max() / present.min()) if len(present) else None,
        "small_classes": [c for c, n in zip(classes, counts) if n < 0.5 * fair],
    }


def outliers(X: np.ndarray, k: int = GRAPH_K, search: str = "exact") -> np.ndarray:
    """Local outlier factor per row (about 1 = as dense as its neighbours; larger = more isolated), by
    cosine of the rows as given, from each row's ``k`` nearest others."""
    from ..head import search as neighbours

    if len(X) < 3:
        return np.ones(len(X))
    nb = neighbours(X, None, min(k, len(X) - 1), np.zeros(X.shape[1], dtype=np.float32), search)
    return local_outlier_factor(nb.distance, nb.index)


def local_outlier_factor(dist: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """scikit-learn's ``LocalOutlierFactor`` (``-negative_outlier_factor_``) from a neighbour graph: per row
    the distances to its ``k`` nearest other rows, ascending, and their indices. reach(p, o) = max(d(p, o),
    k-distance(o)); lrd(p) = 1 / mean reach(p, .); LOF(p) = mean lrd(neighbours) / lrd(p)."""
    if len(dist) < 3 or not dist.shape[1]:
        return np.ones(len(dist))
    dist = np.asarray(dist, dtype=np.float64)
    reach = np.maximum(dist, dist[idx, -1])
    lrd = 1.0 / (reach.mean(1) + 1e-10)
    return (lrd[idx] / lrd[:, None]).mean(1)


@dataclass
class _Side:
    """One cache loaded for the audit: its labelled rows, features, paths and keys."""

    name: str
    classes: list[str]
    rows: np.ndarray
    X: np.ndarray
    y: np.ndarray
    paths: list[str]
    files: list[Path | None]
    keys: list[str]
    key_kind: str
    missing: str = ""  # where its images were looked for, when they were not found (sheets.ImageRoot.missing)


def _load(path: Path, root: Path | None, classes: list[str] | None, identity: Any = None) -> tuple[_Side, Any]:
    from ..cache import FeatureCache
    from ..images import image_root

    with FeatureCache(path) as fc:
        if identity is not None:
            fc.check_identity(identity, "the training cache")
        if classes is None:
            rows, y = fc.labelled, fc.labels[fc.labelled]
            names = list(fc.classes)
        else:
            rows, y = fc.labelled_as(classes, f"--test {path}", "audit a test cache of the training classes")
            names = classes
        if not len(rows):
            raise DataError(f"{path}: no labelled rows to audit", "extract a labelled folder or manifest")
        found = image_root(fc, root)
        files_all = found.resolve(fc.paths)
        keys_all, kind = content_keys(fc, files_all)
        side = _Side(
            str(path),
            names,
            rows,
            fc.features(rows, dtype=None),  # as stored: float16 stays float16
            y,
            [fc.paths[i] for i in rows],
            [files_all[i] for i in rows],
            [keys_all[i] for i in rows],
            kind,
            "" if found.found else found.missing(str(path)),
        )
        return side, fc.identity


def _duplicates(tr: _Side, te: _Side | None, graph: Any, cross: Any, thr: float) -> dict[str, Any]:
    groups = exact_groups(tr.keys)
    exact_set = {(min(a, b), max(a, b)) for g in groups for a in g for b in g if a != b}
    near = [(i, j, s) for i, j, s in (pairs(graph, thr, True) if graph else []) if (i, j) not in exact_set]
    out: dict[str, Any] = {
        "key": tr.key_kind,
        "exact": [[tr.paths[i] for i in g] for g in groups],
        "exact_rows": groups,
        "near": [{"a": tr.paths[i], "b": tr.paths[j], "cosine": round(s, 4), "rows": [i, j]} for i, j, s in near],
    }
    if te is not None and cross is not None:
        index = defaultdict(list)
        for i, k in enumerate(tr.keys):
            index[k].append(i)
        # a cache's content key is fsutil.file_digest of the file: the two kinds compare; feature hashes only
        # with feature hashes
        digests = {"content key", "file digest"}
        comparable = te.key_kind == tr.key_kind or {te.key_kind, tr.key_kind} <= digests
        leaks = [(i, j) for j, k in enumerate(te.keys) for i in index.get(k, [])] if comparable else []
        leak_set = set(leaks)
        near_x = [(i, j, s) for j, i, s in pairs(cross, thr, False) if (i, j) not in leak_set]
        out["leakage_exact"] = [{"train": tr.paths[i], "test": te.paths[j], "rows": [i, j]} for i, j in leaks]
        out["leakage_near"] = [
            {"train": tr.paths[i], "test": te.paths[j], "cosine": round(s, 4), "rows": [i, j]} for i, j, s in near_x
        ]
    return out


def _label_errors(tr: _Side, top: int, seed: int) -> dict[str, Any]:
    try:
        probs, flagged, how = label_issues(tr.X, tr.y, seed)
    except DataError as exc:
        return {"skipped": str(exc)}
    given = probs[np.arange(len(tr.y)), tr.y]
    order = [i for i in np.argsort(given, kind="stable") if flagged[i]]
    return {
        "method": how,
        "flagged": int(flagged.sum()),
        "rows": [
            {
                "path": tr.paths[i],
                "given": tr.classes[tr.y[i]],
                "suggested": tr.classes[int(probs[i].argmax())],
                "p_given": round(float(given[i]), 4),
                "p_suggested": round(float(probs[i].max()), 4),
                "row": int(i),
            }
            for i in order[: max(top, 0) * 5]
        ],
    }


def _outliers(tr: _Side, graph: Any, top: int) -> dict[str, Any]:
    score = local_outlier_factor(graph.distance, graph.index) if graph else np.ones(len(tr.y))
    order = np.argsort(-score, kind="stable")[:top]
    k = graph.index.shape[1] if graph else 0
    return {
        "method": f"local outlier factor (scikit-learn's definition) on the {k}-nearest-neighbour graph (cosine)",
        "rows": [
            {"path": tr.paths[i], "class": tr.classes[tr.y[i]], "lof": round(float(score[i]), 3), "row": int(i)}
            for i in order
        ],
    }


def _print(report: dict[str, Any], top: int) -> None:
    rep = get_reporter()
    d = report["duplicates"]
    rep.info(f"audit of {report['cache']}: {report['rows']} labelled rows (duplicates by {d['key']})")
    sections = [
        ("exact duplicates in train", [" = ".join(g) for g in d["exact"]]),
        ("near duplicates in train", [f"{p['a']} ~ {p['b']} ({p['cosine']:.3f})" for p in d["near"]]),
        ("leakage (same image in train and test)", [f"{p['train']} = {p['test']}" for p in d.get("leakage_exact", [])]),
        ("near leakage", [f"{p['train']} ~ {p['test']} ({p['cosine']:.3f})" for p in d.get("leakage_near", [])]),
        (
            "likely label errors",
            [
                f"{r['path']}: labelled {r['given']} (p={r['p_given']:.2f}), looks like {r['suggested']} "
                f"(p={r['p_suggested']:.2f})"
                for r in report["label_errors"].get("rows", [])
            ],
        ),
        ("outliers", [f"{r['path']} ({r['class']}, LOF {r['lof']:.2f})" for r in report["outliers"]["rows"][:3]]),
    ]
    for title, lines in sections:
        if lines:
            rep.warn(f"{title}: {len(lines)}")
            for line in lines[:top]:
                rep.info(f"  {line}")
    imb = report["imbalance"]
    if imb["small_classes"]:
        rep.warn(
            f"class imbalance (largest/smallest {imb['ratio']:.1f}x): few images of {', '.join(imb['small_classes'])}"
        )


def _sheet_items(report: dict[str, Any], tr: _Side, te: _Side | None, top: int) -> list[tuple[Path | None, str]]:
    items: list[tuple[Path | None, str]] = []
    d = report["duplicates"]
    for p in d.get("leakage_exact", [])[:top] + d.get("leakage_near", [])[:top]:
        i, j = p["rows"]
        tag = "leak" if "cosine" not in p else f"leak~{p['cosine']:.2f}"
        items += [
            (tr.files[i], f"{tag} train\n{tr.paths[i]}"),
            (te.files[j] if te else None, f"{tag} test\n{te.paths[j] if te else ''}"),
        ]
    for g in d["exact_rows"][:top]:
        items += [(tr.files[i], f"duplicate\n{tr.paths[i]}") for i in g[:2]]
    for p in d["near"][:top]:
        items += [(tr.files[i], f"near {p['cosine']:.2f}\n{tr.paths[i]}") for i in p["rows"]]
    for r in report["label_errors"].get("rows", [])[:top]:
        items.append((tr.files[r["row"]], f"{r['given']}->{r['suggested']}?\n{r['path']}"))
    for r in report["outliers"]["rows"][: max(1, top // 2)]:
        items.append((tr.files[r["row"]], f"outlier {r['lof']:.1f}\n{r['path']}"))
    return items


def audit(cfg: AuditConfig) -> AuditResult:
    """Audit ``cfg.cache`` (and leakage into ``cfg.test``); writes ``audit.json`` and ``audit.png`` under
    ``cfg.out`` and prints the top findings. Returns the report."""
    from ..images import contact_sheet

    if not -1.0 <= cfg.near_threshold <= 1.0:
        raise UsageError(f"--near {cfg.near_threshold} must be a cosine in [-1, 1]", "e.g. --near 0.95")
    if cfg.search not in SEARCHES:
        raise UsageError(f"--search {cfg.search!r} is not known", f"use one of {', '.join(SEARCHES)}")
    clock = _Clock()
    tr, identity = _load(Path(cfg.cache), cfg.root, None)
    te = _load(Path(cfg.test), cfg.test_root, tr.classes, identity)[0] if cfg.test is not None else None
    clock.lap("load")
    graph, cross = _neighbours(tr, te, cfg)
    clock.lap("neighbours")
    report: dict[str, Any] = {
        "kind": "audit",
        "cache": tr.name,
        "test": te.name if te else None,
        "rows": len(tr.y),
        "test_rows": len(te.y) if te else 0,
        "near_threshold": cfg.near_threshold,
        "neighbours": {"train": graph.info if graph else None, "test": cross.info if cross else None},
        "duplicates": _duplicates(tr, te, graph, cross, cfg.near_threshold),
    }
    report["label_errors"] = _label_errors(tr, cfg.top, cfg.seed)
    clock.lap("label_errors")
    report["imbalance"] = imbalance(tr.y, tr.classes)
    report["outliers"] = _outliers(tr, graph, cfg.top)
    clock.lap("outliers")
    report["seconds"] = clock.laps
    _print(report, cfg.top)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [atomic_write_json(out / "audit.json", report)]
    items = _sheet_items(report, tr, te, cfg.top)
    if cfg.sheet and items:
        if not any(f is not None and f.is_file() for f, _ in items):
            where = "; ".join(s.missing for s in (tr, te) if s is not None and s.missing)
            get_reporter().warn(
                f"audit.png: the images were not found{f' ({where})' if where else ''}: "
                "pass --root / --test-root (the --data folders the caches were extracted from)"
            )
        files.append(contact_sheet(items, out / "audit.png", title=f"audit of {Path(tr.name).name}"))
    get_reporter().info(f"wrote {', '.join(str(f) for f in files)}")
    return AuditResult(report, files)


def _neighbours(tr: _Side, te: _Side | None, cfg: AuditConfig) -> tuple[Any, Any]:
    """The training rows' neighbour graph (``GRAPH_K`` nearest others) and the test rows' ``NEIGHBOURS``
    nearest training rows, on features centred on the training mean."""
    from ..head import feature_mean, search

    mean = feature_mean(tr.X)
    graph = search(tr.X, None, GRAPH_K, mean, cfg.search, cfg.seed, "train neighbours") if len(tr.y) > 1 else None
    cross = search(tr.X, te.X, NEIGHBOURS, mean, cfg.search, cfg.seed, "test rows' train neighbours") if te else None
    return graph, cross


class _Clock:
    """Seconds per stage of the audit (the report's ``seconds``)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.t, 3)
        self.t = now
