"""`rt compare`: which backbone for these images, measured on them.

Each candidate (``NAME[=WEIGHTS]``) is extracted once through :func:`extract` into its own cache under the
work folder, named by what changes its features (model, weights as content, image size, precision, dtype),
so a rerun computes nothing for candidates seen before and a new candidate computes only itself. Then every
candidate is scored on the same rows: one split (``--test``, or one stratified split recorded in
``split.json``), the same nested k-subsets and seeds as `rt curve` (:func:`score_subsets`), plus LogME on the
training rows (:func:`logme`) and its cost on this host (extract images/s, parameters, feature size, cache
size on disk). The recommendation is the fastest candidate whose interval overlaps the best one's
(:mod:`.comparison`), written to ``compare.json``, ``compare.md`` and ``compare.png``.

Resumable: extract resumes inside a candidate; a candidate whose caches match the listing is not extracted
again (``extracted.json``) and one already scored on these rows is not scored again (``scores-<key>.json``);
every file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..base import DataError, Interrupted, RtError, UsageError, atomic_write_json, get_reporter

DEFAULT_WEIGHTS = "imagenet"


@dataclass(frozen=True)
class Candidate:
    """One ``NAME[=WEIGHTS]``: ``weights`` is ``imagenet`` (pretrained), ``none`` or a checkpoint path."""

    spec: str
    model: str
    weights: str


def parse_candidate(spec: str) -> Candidate:
    """``resnet50`` -> pretrained; ``resnet18=none``; ``resnet18=runs/source`` (a file or a model directory)."""
    text = spec.strip()
    model, _, weights = text.partition("=")
    model, weights = model.strip(), weights.strip() or DEFAULT_WEIGHTS
    if not model:
        raise UsageError(f"--models: empty candidate in {spec!r}", "give NAME[=WEIGHTS], e.g. resnet18=none")
    return Candidate(text if "=" in text else model, model, weights)


@dataclass
class CompareConfig:
    """Everything `rt compare` needs; the CLI fills it from its options."""

    data: Path
    models: Sequence[str] = ("resnet18", "resnet50")
    out: Path = Path("compare")
    test: Path | None = None  # held-out folder; None: a stratified split of --data, fixed for all candidates
    work: Path | None = None  # where the candidates' caches live (default <out>/work)
    ks: Sequence[int] = (5, 10, 20, 50)  # images per class of the curve; the largest is the headline
    seeds: int = 10
    image_size: int | None = None
    test_fraction: float = 0.2
    split_seed: int = 0
    l2: float | None = None
    batch_size: int = 32
    device: str = "auto"
    precision: str = "auto"
    compile: str = "auto"
    dtype: str = "float16"
    plot: bool = True


@dataclass
class CompareResult:
    report: dict[str, Any]
    files: list[Path] = field(default_factory=list)


@dataclass
class _Split:
    """The labelled rows every candidate is scored on: training and test paths with their labels."""

    classes: list[str]
    train: list[str]
    y_train: np.ndarray
    test: list[str]
    y_test: np.ndarray
    record: dict[str, Any]
    fingerprints: dict[str, str]  # listing fingerprint per extracted folder ("data", "test")


def compare(cfg: CompareConfig) -> CompareResult:
    """Extract (once), score and cost every candidate on the same split, subsets and seeds; recommend one;
    write ``compare.json``, ``compare.md`` and ``compare.png`` under ``cfg.out``."""
    from .comparison import recommend, write_outputs
    from .curves import check_ks, nested_subsets

    rep = get_reporter()
    t0 = time.perf_counter()
    candidates = _candidates(cfg.models)
    split = _split(cfg)  # every data check before any forward pass
    ks = check_ks(cfg.ks, cfg.seeds, split.y_train, split.classes, cfg.data)
    out = Path(cfg.out)
    work = Path(cfg.work) if cfg.work is not None else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "split.json", {"train": split.train, "test": split.test, **split.record})
    runs: list[dict[str, Any]] = []
    with rep.progress("compare", total=len(candidates), unit="candidate") as bar:
        for i, cand in enumerate(candidates, 1):
            rep.info(f"[{i}/{len(candidates)}] {cand.spec}")
            runs.append(_ensure_caches(cfg, cand, split, work))
            bar.advance(1)
    train_rows, test_rows = _common_rows(split, [r for r in runs if "error" not in r])
    y, yt = split.y_train[train_rows], split.y_test[test_rows]
    subsets = [nested_subsets(y, ks, seed, len(split.classes)) for seed in range(cfg.seeds)]
    rows = [_scored(cfg, r, split, train_rows, test_rows, subsets) if "error" not in r else r for r in runs]
    rec = recommend(rows)
    report = {
        "candidates": [_public(r) for r in rows],
        "recommended": rec["recommended"],
        "reason": rec["reason"],
        "paired": rec.get("paired"),
        "k": "all" if ks[-1] == 0 else ks[-1],
        "ks": ["all" if k == 0 else k for k in ks],
        "seeds": cfg.seeds,
        "classes": split.classes,
        "n_train": len(y),
        "n_test": len(yt),
        "split": split.record,
        "interval": "95% t-interval over seeds of the k-subset (the same subsets for every candidate)",
        "work": str(work),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    files = write_outputs(report, out, plot=cfg.plot)
    rep.info(f"recommended: {rec['reason']}")
    rep.info(f"wrote {', '.join(map(str, files))} in {report['seconds']:.1f}s")
    return CompareResult(report, files)


def _candidates(specs: Sequence[str]) -> list[Candidate]:
    """Parsed, de-duplicated; an unknown model name is an error here, before any image is read."""
    from ..backbone import parse_model_name

    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    out = [parse_candidate(s) for s in specs]
    if not out:
        raise UsageError("--models: no candidate", "e.g. --models resnet18,resnet50")
    seen = [c.spec for c in out]
    dupes = sorted({s for s in seen if seen.count(s) > 1})
    if dupes:
        raise UsageError(f"--models: {', '.join(dupes)} given twice", "name each candidate once")
    for c in out:
        try:
            parse_model_name(c.model)
        except UsageError as exc:
            raise UsageError(f"--models {c.spec}: {exc.message.removeprefix('--model ')}", exc.hint) from None
    return out


# ----------------------------------------------------------------------------------------------- split


def _listing_fingerprint(images: Any) -> str:
    """A digest of a listing: paths, labels and each file's size and mtime (a changed file changes it)."""
    h = hashlib.blake2b(digest_size=16)
    for p, y in zip(images.paths, images.labels):
        try:
            st = os.stat(Path(images.root) / p)
            h.update(f"{p}\0{y}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0{y}\0missing\n".encode())
    h.update(json.dumps(images.classes).encode())
    return h.hexdigest()


def _check_classes(images: Any, option: str, where: Any) -> None:
    counts = images.counts()
    counts.pop("(unlabelled)", None)
    present = {c: n for c, n in counts.items() if n > 0}
    if len(present) < 2:
        raise DataError(
            f"{option} {where}: {len(present)} class(es) with labelled images; a comparison needs 2 or more",
            "give a folder with one sub-folder per class (or a path,label manifest) holding at least 2 classes",
        )
    few = {c: n for c, n in present.items() if n < 2}
    if few:
        shown = ", ".join(f"{c!r} ({n})" for c, n in sorted(few.items()))
        raise DataError(
            f"{option} {where}: class(es) with fewer than 2 images: {shown}",
            "add images to them (2 or more per class: one to train on, one to test) or remove them",
        )


def _split(cfg: CompareConfig) -> _Split:
    """List --data (and --test), check the classes, and fix the one split every candidate is scored on."""
    from ..images import list_images, stratified_split

    images = list_images(cfg.data)
    _check_classes(images, "--data", cfg.data)
    labels = np.asarray(images.labels, dtype=np.int64)
    prints = {"data": _listing_fingerprint(images)}
    if cfg.test is not None:
        tests = list_images(cfg.test, classes=images.classes)
        test_rows = np.flatnonzero(np.asarray(tests.labels) >= 0)
        if not len(test_rows):
            raise DataError(f"--test {cfg.test}: no labelled images", "give a folder with one sub-folder per class")
        train_rows = np.flatnonzero(labels >= 0)
        prints["test"] = _listing_fingerprint(tests)
        test_paths = [tests.paths[i] for i in test_rows]
        y_test = np.asarray(tests.labels, dtype=np.int64)[test_rows]
        record: dict[str, Any] = {"kind": "test folder", "test": str(cfg.test)}
    else:
        train_rows, test_rows = stratified_split(labels, cfg.test_fraction, seed=cfg.split_seed)
        if not len(test_rows):
            raise UsageError(f"--test-fraction {cfg.test_fraction} leaves no test images", "use e.g. 0.2")
        test_paths = [images.paths[i] for i in test_rows]
        y_test = labels[test_rows]
        record = {"kind": "stratified", "test_fraction": cfg.test_fraction, "seed": cfg.split_seed}
    record.update({"data": str(cfg.data), "n_train": len(train_rows), "n_test": len(test_paths)})
    record["file"] = "split.json"
    train_paths = [images.paths[i] for i in train_rows]
    return _Split(images.classes, train_paths, labels[train_rows], test_paths, y_test, record, prints)


# --------------------------------------------------------------------------------------- the candidates


def _weights_key(weights: str) -> str:
    from ..backbone import BACKBONE_FILE
    from ..base import file_digest

    if weights.lower() in ("imagenet", "none"):
        return weights.lower()
    p = Path(weights).expanduser()
    f = p / BACKBONE_FILE if p.is_dir() else p
    return "file:" + file_digest(f) if f.is_file() else "missing:" + str(p.resolve())


def candidate_dir(cfg: CompareConfig, cand: Candidate, work: Path) -> Path:
    """``<work>/<model>-<weights>-<key>``: the key hashes what changes the features."""
    ident = {
        "model": cand.model,
        "weights": _weights_key(cand.weights),
        "image_size": cfg.image_size,
        "precision": cfg.precision,
        "dtype": cfg.dtype,
    }
    key = hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=6).hexdigest()
    label = cand.weights if cand.weights.lower() in ("imagenet", "none") else Path(cand.weights).name or "file"
    slug = re.sub(r"[^A-Za-z0-9._]+", "_", f"{cand.model}-{label}")[:60]
    return work / f"{slug}-{key}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ensure_caches(cfg: CompareConfig, cand: Candidate, split: _Split, work: Path) -> dict[str, Any]:
    """Bring the candidate's caches in line with the listing (extract computes only new content); a
    candidate whose weights cannot be had gets its row with the error and the fix."""
    from ..cache import ExtractConfig, extract

    rep = get_reporter()
    cdir = candidate_dir(cfg, cand, work)
    cdir.mkdir(parents=True, exist_ok=True)
    parts = {"data": cfg.data, **({"test": cfg.test} if cfg.test is not None else {})}
    row: dict[str, Any] = {"candidate": cand, "dir": cdir, "computed": 0}
    done = _read_json(cdir / "extracted.json") or {}
    if all(done.get(k) == split.fingerprints[k] and (cdir / f"{k}.h5").exists() for k in parts):
        rep.info(f"{cand.spec}: caches up to date ({cdir}); nothing to compute")
        return _with_rate(row, 0, 0.0)
    computed, seconds, t0 = 0, 0.0, time.perf_counter()
    try:
        for part, folder in parts.items():
            res = extract(
                ExtractConfig(
                    data=Path(folder),
                    out=cdir / f"{part}.h5",
                    model=cand.model,
                    weights=cand.weights,
                    image_size=cfg.image_size,
                    batch_size=cfg.batch_size,
                    device=cfg.device,
                    precision=cfg.precision,
                    compile=cfg.compile,
                    dtype=cfg.dtype,
                )
            )
            computed += res.computed
            seconds += res.computed / res.images_per_s if res.images_per_s > 0 else 0.0
    except Interrupted:
        raise
    except RtError as exc:
        rep.warn(f"{cand.spec}: {exc.message}")
        return {**row, "error": exc.message, "hint": exc.hint}
    row["extract_seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(cdir / "extracted.json", dict(split.fingerprints))
    return _with_rate({**row, "computed": computed}, computed, seconds)


def _with_rate(row: dict[str, Any], computed: int, seconds: float) -> dict[str, Any]:
    """The extract rate measured in this run, else the one recorded when the cache was computed."""
    path = Path(row["dir"]) / "rate.json"
    old = _read_json(path)
    if computed and seconds > 0:
        rate = computed / seconds
        if old is None or computed >= int(old.get("images", 0)):
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
            atomic_write_json(path, {"images_per_second": rate, "images": computed, "seconds": seconds, "at": stamp})
        return {**row, "images_per_second": rate, "rate_source": f"measured in this run ({computed} images)"}
    if old is not None:
        source = f"recorded {old.get('at', '?')} when cached ({old.get('images', '?')} images)"
        return {**row, "images_per_second": float(old["images_per_second"]), "rate_source": source}
    return {**row, "images_per_second": None, "rate_source": "not measured (cache made outside rt compare)"}


# ----------------------------------------------------------------------------------------------- scores


def _cache_rows(path: Path, paths: list[str]) -> np.ndarray:
    """Row of each of ``paths`` in the cache (-1: not in it, e.g. an image extract could not read)."""
    from ..cache import FeatureCache

    with FeatureCache(path) as c:
        where = {p: i for i, p in enumerate(c.paths)}
    return np.asarray([where.get(p, -1) for p in paths], dtype=np.int64)


def _common_rows(split: _Split, runs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """The split's rows every extracted candidate holds (all of them, unless an image could not be read):
    the candidates are scored on exactly the same images."""
    keep_tr = np.ones(len(split.train), dtype=bool)
    keep_te = np.ones(len(split.test), dtype=bool)
    test_part = "test" if split.record["kind"] == "test folder" else "data"
    for r in runs:
        keep_tr &= _cache_rows(r["dir"] / "data.h5", split.train) >= 0
        keep_te &= _cache_rows(r["dir"] / f"{test_part}.h5", split.test) >= 0
    dropped = int((~keep_tr).sum() + (~keep_te).sum())
    if dropped:
        get_reporter().warn(f"{dropped} image(s) of the split left out for every candidate: not in every cache")
    return np.flatnonzero(keep_tr), np.flatnonzero(keep_te)


def _features(path: Path, paths: list[str]) -> np.ndarray:
    from ..cache import FeatureCache

    rows = _cache_rows(path, paths)
    with FeatureCache(path) as c:
        return c.features(rows)


def _score_key(cfg: CompareConfig, split: _Split, train_rows: np.ndarray, test_rows: np.ndarray, subsets: Any) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(split.fingerprints, sort_keys=True).encode())
    h.update(json.dumps([[split.train[i] for i in train_rows], [split.test[i] for i in test_rows]]).encode())
    h.update(json.dumps([{str(k): v.tolist() for k, v in s.items()} for s in subsets]).encode())
    h.update(json.dumps([cfg.l2, split.record["kind"]]).encode())
    return h.hexdigest()


def _scored(
    cfg: CompareConfig, run: dict[str, Any], split: _Split, train_rows: np.ndarray, test_rows: np.ndarray, subsets: Any
) -> dict[str, Any]:
    """The candidate's curve, headline accuracy, LogME and cost (reused when already scored on these rows)."""
    from ..cache import FeatureCache
    from .curves import score_subsets, summarize
    from .transferability import logme

    cdir = run["dir"]
    path = cdir / f"scores-{_score_key(cfg, split, train_rows, test_rows, subsets)}.json"
    scores = _read_json(path)
    if scores is None:
        t0 = time.perf_counter()
        test_part = "test" if split.record["kind"] == "test folder" else "data"
        X = _features(cdir / "data.h5", [split.train[i] for i in train_rows])
        Xt = _features(cdir / f"{test_part}.h5", [split.test[i] for i in test_rows])
        y, yt = split.y_train[train_rows], split.y_test[test_rows]
        by_k = score_subsets(lambda r: X[r], y, Xt, yt, subsets, len(split.classes), l2=cfg.l2, knn=False)
        curve = [{k: v for k, v in c.items() if k != "method"} for c in summarize(by_k, len(yt))]
        with FeatureCache(cdir / "data.h5") as c:
            ident, precision = c.identity, c.precision
        scores = {
            "precision": precision,
            "curve": curve,
            "logme": logme(X, y),
            "model": ident.model,
            "weights_id": ident.weights_id,
            "feature_size": ident.num_features,
            "input_size": ident.transform.input_size,
            "arch": ident.arch,
            "parameters": _parameters(ident.arch),
            "score_seconds": round(time.perf_counter() - t0, 3),
        }
        atomic_write_json(path, scores)
    head = scores["curve"][-1]
    lo, hi = head["low"], head["high"]
    return {
        **run,
        **scores,
        "accuracy": head["mean"],
        "interval": [lo if lo is not None else head["mean"], hi if hi is not None else head["mean"]],
        "cache_bytes": _disk_bytes(cdir),
        "recorded_rates": _recorded(cfg, scores),
    }


def _recorded(cfg: CompareConfig, scores: dict[str, Any]) -> dict[str, float]:
    """The host's speed records for this network (images/s of the forward alone, per way of running it)."""
    from ..backbone import recorded_rates
    from ..base import resolve_device

    if "arch" not in scores:
        return {}
    size = int(scores["input_size"])
    shape = (cfg.batch_size, 3, size, size)
    return recorded_rates(resolve_device(cfg.device), scores["arch"], scores["precision"], shape)


def _parameters(arch: str) -> int:
    """Parameters of the headless network (built on the meta device: no memory, no weights)."""
    import timm
    import torch

    with torch.device("meta"):
        net = timm.create_model(arch, pretrained=False, num_classes=0)
    return int(sum(p.numel() for p in net.parameters()))


def _disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """A candidate's entry of compare.json: the issue's fields first, then the details."""
    cand: Candidate = row["candidate"]
    out: dict[str, Any] = {
        "spec": cand.spec,
        "model": row.get("model", cand.model),
        "weights": cand.weights,
        "accuracy": row.get("accuracy"),
        "interval": row.get("interval"),
        "curve": row.get("curve"),
        "logme": row.get("logme"),
        "images_per_second": row.get("images_per_second"),
        "computed": row.get("computed", 0),
        "rate_source": row.get("rate_source"),
        "parameters": row.get("parameters"),
        "feature_size": row.get("feature_size"),
        "cache_bytes": row.get("cache_bytes"),
        "weights_id": row.get("weights_id"),
        "cache": str(row["dir"]),
        "extract_seconds": row.get("extract_seconds", 0.0),
        "score_seconds": row.get("score_seconds"),
        "recorded_rates": row.get("recorded_rates"),
    }
    if "error" in row:
        out.update({"error": row["error"], "hint": row["hint"]})
    return out
