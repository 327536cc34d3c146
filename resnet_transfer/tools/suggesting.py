"""`rt suggest`: which unlabelled images to label next (uncertainty with diversity), as a manifest to fill in.

1. The head scores every unlabelled row of the pool cache (no forward pass; a pool given as a folder or a
   manifest is first extracted, which computes only the images not cached yet).
2. Uncertainty: ``margin`` (1 - (p1 - p2)), ``entropy`` (normalised to [0, 1]) or ``least`` (1 - p1),
   on the head's tempered probabilities.
3. Diversity (after Zhdanov 2019, "diverse mini-batch active learning"): the ``candidates x n`` most
   uncertain rows, near-copies collapsed (mean-centred cosine >= 0.99 with a row already taken), are
   clustered into ``n`` groups by k-means on their L2-normalised features (cosine geometry, uncertainty as
   the sample weight), and each group gives its most uncertain member. So one hard picture and its copies
   are suggested once, and the picks spread over the uncertain part of the feature space.
4. The picks go to a CSV manifest ``path,label`` with empty labels, paths relative to the manifest's folder
   (``rt extract --data to-label.csv`` reads it once the labels are filled in; the content-keyed cache
   reuses the pool's rows), a JSON with the scores, and a contact sheet of the picks.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..base import DataError, UsageError, atomic_write_json, atomic_write_text, get_reporter

STRATEGIES = ("margin", "entropy", "least")
CACHE_SUFFIXES = (".h5", ".hdf5")
DUP_COSINE = 0.99  # candidates this alike (mean-centred cosine) are copies of one picture: one is kept


@dataclass
class SuggestConfig:
    head: Path
    pool: Path  # a cache (.h5), or a folder / manifest of images (extracted into pool_cache first)
    out: Path = Path("to-label.csv")
    n: int = 50
    strategy: str = "margin"
    candidates: float = 5.0  # cluster the candidates * n most uncertain rows
    root: Path | None = None  # the folder the pool cache's paths are relative to (default: see sheets.image_root)
    pool_cache: Path | None = None  # where a folder/manifest pool is extracted (default: <out>.pool.h5)
    sheet: bool = True
    seed: int = 0


@dataclass
class SuggestResult:
    out: Path
    rows: list[dict[str, Any]]
    pool_rows: int
    files: list[Path] = field(default_factory=list)


def uncertainty(probs: np.ndarray, strategy: str = "margin") -> np.ndarray:
    """Per-row uncertainty in [0, 1], higher = less sure: ``margin``, ``entropy`` or ``least``."""
    p = np.asarray(probs, dtype=np.float64)
    if strategy == "margin":
        top2 = np.sort(p, axis=1)[:, -2:] if p.shape[1] > 1 else np.concatenate([np.zeros_like(p), p], 1)
        return 1.0 - (top2[:, -1] - top2[:, -2])
    if strategy == "entropy":
        from scipy.stats import entropy

        return entropy(p, axis=1) / np.log(max(2, p.shape[1]))
    if strategy == "least":
        return 1.0 - p.max(1)
    raise UsageError(f"--strategy {strategy!r} is not known", f"use one of {', '.join(STRATEGIES)}")


def _distinct(U: np.ndarray, m: int, dup_cosine: float) -> np.ndarray:
    """Positions of up to ``m`` rows of ``U`` (unit rows in the order to take them), skipping a row whose
    cosine with one already taken is at least ``dup_cosine`` (copies of one picture count once)."""
    kept: list[int] = []
    for i in range(len(U)):
        if kept and float((U[kept] @ U[i]).max()) >= dup_cosine:
            continue
        kept.append(i)
        if len(kept) == m:
            break
    return np.asarray(kept, dtype=np.int64)


def diverse_top(
    features: np.ndarray,
    scores: np.ndarray,
    n: int,
    candidates: float = 5.0,
    seed: int = 0,
    dup_cosine: float = DUP_COSINE,
) -> np.ndarray:
    """Indices of up to ``n`` rows that are uncertain and unlike each other. Features are mean-centred and
    L2-normalised (cosine geometry); the ``candidates * n`` highest ``scores`` that are not near-copies of
    each other (cosine < ``dup_cosine``; at most ``20 * candidates * n`` rows are scanned) are clustered by
    k-means into ``n`` groups (weighted by ``scores``) and each group gives its highest-scoring row.
    Returned highest score first. ``features`` may be float16 (as a cache stores them): only the mean and
    the scanned rows are computed in float32."""
    from sklearn.cluster import KMeans

    from ..head import Unit, feature_mean

    if n < 1:
        raise UsageError(f"-n {n} must be at least 1")
    m = max(n, int(np.ceil(candidates * n)))
    order = np.argsort(-np.asarray(scores), kind="stable")[: 20 * m]
    U = Unit(features, feature_mean(features)).take(order)
    keep = _distinct(U, m, dup_cosine)
    cand, Xn = order[keep], U[keep].astype(np.float64)
    if len(cand) <= n:
        return cand
    km = KMeans(n_clusters=n, n_init=3, random_state=seed).fit(Xn, sample_weight=scores[cand] + 1e-6)
    picks = []
    for c in range(n):
        members = np.flatnonzero(km.labels_ == c)
        if len(members):
            picks.append(cand[members[np.argmax(scores[cand][members])]])
    out = np.asarray(picks, dtype=np.int64)
    return out[np.argsort(-scores[out], kind="stable")]


def _probabilities(head: Any, X: np.ndarray, temperature: float, block: int = 8192) -> np.ndarray:
    """The head's tempered probabilities for the rows of ``X``, ``block`` rows (made float32) at a time."""
    from ..head import predict_logits, softmax

    parts = [
        softmax(predict_logits(head, np.asarray(X[lo : lo + block], dtype=np.float32)), temperature)
        for lo in range(0, len(X), block)
    ]
    return np.concatenate(parts)


def _pool_cache(cfg: SuggestConfig, md: Any) -> Path:
    """The pool as a cache: itself if it is one, else extracted (only images not cached yet are computed)."""
    pool = Path(cfg.pool)
    if pool.suffix.lower() in CACHE_SUFFIXES:
        return pool
    from ..cache import ExtractConfig, extract

    out = Path(cfg.pool_cache) if cfg.pool_cache else Path(cfg.out).with_suffix(".pool.h5")
    ident = md.identity
    extract(
        ExtractConfig(
            data=pool,
            out=out,
            model=ident.model,
            weights=ident.weights,
            image_size=ident.transform.input_size,
            record_root=True,
        )
    )
    return out


def _manifest(paths: list[Path | None], out: Path) -> tuple[str, list[str], int]:
    """CSV text ``path,label`` (labels empty), paths relative to ``out``'s folder; and how many of them
    point outside it (``rt extract`` then needs ``--allow-outside``)."""
    base = out.parent.resolve()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label"])
    rels = [Path(os.path.relpath(p, base)).as_posix() if p is not None else "" for p in paths]
    for rel in rels:
        w.writerow([rel, ""])
    return buf.getvalue(), rels, sum(r.startswith("..") for r in rels)


def suggest(cfg: SuggestConfig) -> SuggestResult:
    """Rank the unlabelled rows of ``cfg.pool`` for labelling and write the manifest ``cfg.out``."""
    from ..cache import FeatureCache
    from ..head import HEAD_FILE, build_head_module, head_temperature, read_model_dir
    from ..images import contact_sheet, image_root

    rep = get_reporter()
    if cfg.strategy not in STRATEGIES:
        raise UsageError(f"--strategy {cfg.strategy!r} is not known", f"use one of {', '.join(STRATEGIES)}")
    if cfg.candidates < 1:
        raise UsageError(f"--candidates {cfg.candidates} must be at least 1", "e.g. --candidates 5")
    out = Path(cfg.out)
    if out.suffix.lower() != ".csv":
        raise UsageError(f"--out {out}: the suggestions are a CSV manifest", "give a name ending in .csv")
    md = read_model_dir(cfg.head)
    head = build_head_module(md.head_config)
    head.load_state_dict(md.load_tensors(HEAD_FILE))
    with FeatureCache(_pool_cache(cfg, md)) as pool:
        pool.check_identity(md.identity, f"the head in {md.path}")
        rows = np.flatnonzero(pool.labels < 0)
        if not len(rows):
            raise DataError(
                f"--pool {cfg.pool}: no unlabelled images (every row has a label)",
                "give a folder of loose images, or a manifest whose rows to label have an empty label",
            )
        X = pool.features(rows, dtype=None)  # as stored: float16 stays float16 (logits a block at a time)
        found = image_root(pool, cfg.root)
        found.require(f"--pool {cfg.pool}")
        paths = found.resolve([pool.paths[i] for i in rows])
        n_pool = pool.n
    probs = _probabilities(head, X, head_temperature(md.head_config))
    scores = uncertainty(probs, cfg.strategy)
    picks = diverse_top(X, scores, min(cfg.n, len(rows)), cfg.candidates, cfg.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    text, rels, outside = _manifest([paths[i] for i in picks], out)
    atomic_write_text(out, text)
    result_rows = [
        {
            "path": str(paths[i]),
            "manifest_path": rel,
            "uncertainty": float(scores[i]),
            "guess": md.classes[int(probs[i].argmax())],
            "probability": float(probs[i].max()),
        }
        for i, rel in zip(picks, rels)
    ]
    files = [
        out,
        atomic_write_json(
            out.with_suffix(".json"),
            {
                "head": str(md.path),
                "pool": str(cfg.pool),
                "strategy": cfg.strategy,
                "candidates": cfg.candidates,
                "unlabelled": len(rows),
                "suggestions": result_rows,
            },
        ),
    ]
    if cfg.sheet and result_rows:
        items = [(paths[i], f"{r['uncertainty']:.2f} {r['guess']}?") for i, r in zip(picks, result_rows)]
        files.append(contact_sheet(items, out.with_suffix(".png"), title=f"label next: {len(items)} of {len(rows)}"))
    rep.info(f"wrote {out}: {len(picks)} of {len(rows)} unlabelled images to label ({cfg.strategy}, diverse)")
    if outside:
        rep.warn(f"{outside} path(s) in {out} lie outside its folder: run `rt extract` on it with --allow-outside")
    return SuggestResult(out, result_rows, n_pool, files)
