"""Planted data for the cache-tool tests: caches with features of a chosen geometry, written through the
project's cache writer, and head directories with chosen weights (and temperature)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from resnet_transfer.backbone import BackboneIdentity
from resnet_transfer.cache import CacheWriter
from resnet_transfer.head import HEAD_FILE, HeadModule, write_model_dir
from resnet_transfer.images import TransformConfig


def identity(dim: int) -> BackboneIdentity:
    return BackboneIdentity("timm:resnet18", "resnet18", "none", "random:seed=0", TransformConfig(32, 36), dim)


def write_cache(
    out: Path,
    X: np.ndarray,
    labels: list[int] | np.ndarray,
    classes: list[str],
    paths: list[str] | None = None,
    dtype: str = "float32",
) -> Path:
    """A cache holding exactly ``X`` (rows) with ``labels`` (-1 = unlabelled) under ``paths``."""
    X = np.asarray(X, dtype=np.float32)
    paths = paths or [f"img{i:04d}.png" for i in range(len(X))]
    # a planted row stands for an image whose content key is the digest of its features: rows planted as
    # the same image (identical features) share a key, as two copies of one file would in a real cache
    keys = [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in X]
    with CacheWriter(out, identity(X.shape[1]), classes, dtype=dtype) as w:
        w.write_part(paths, [int(v) for v in labels], X, keys=keys)
        w.finalize()
    return out


def write_images(root: Path, paths: list[str], seed: int = 0) -> Path:
    """Tiny distinct PNG files at ``root/path`` (so sheets and manifests have real files to point at)."""
    rng = np.random.default_rng(seed)
    for p in paths:
        f = root / p
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8), "RGB").save(f)
    return root


def write_head(
    out: Path, weight: np.ndarray, bias: np.ndarray, classes: list[str], temperature: float | None = None
) -> Path:
    """A linear head directory whose logits are ``X @ weight.T + bias`` (no standardisation)."""
    k, d = weight.shape
    module = HeadModule(d, k)
    with torch.no_grad():
        module.net.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        module.net.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    config = dict(module.config)
    if temperature is not None:
        config["temperature"] = float(temperature)
    write_model_dir(out, "head", identity(d), classes, config, {HEAD_FILE: module.state_dict()})
    return out


def blobs(n_per_class: int, centres: np.ndarray, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters around ``centres`` (one row per class): ``(X, y)``, rows grouped by class."""
    rng = np.random.default_rng(seed)
    X = np.concatenate([c + spread * rng.normal(size=(n_per_class, centres.shape[1])) for c in centres])
    y = np.repeat(np.arange(len(centres)), n_per_class)
    return X.astype(np.float32), y


# ------------------------------------------------------------------------------ planted data at scale

PART_ROWS = 2048  # rows generated (and written as one chunk file) at a time: memory stays at one part


@dataclass
class PlantedSet:
    """Caches written by :func:`write_planted` and what was planted in them (row indices into each cache)."""

    train: Path
    test: Path
    pool: Path | None
    classes: list[str]
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (train row, its exact copy)
    near: list[tuple[int, int]] = field(default_factory=list)  # (train row, its near copy)
    leaks: list[tuple[int, int]] = field(default_factory=list)  # (train row, test row): the same image
    near_leaks: list[tuple[int, int]] = field(default_factory=list)  # (train row, test row): a near copy
    label_errors: list[int] = field(default_factory=list)  # train rows given another class's label
    outliers: list[int] = field(default_factory=list)  # train rows far from every class


class _Geometry:
    """Post-ReLU-like features of ``dim`` values: a class centre plus a ``latent``-dimensional variation
    shared by all classes, plus small isotropic noise, through a ReLU (low intrinsic dimension, all values
    >= 0, as a pooled CNN feature is)."""

    def __init__(self, n_classes: int, dim: int, seed: int, latent: int = 64, separation: float = 0.45) -> None:
        rng = np.random.default_rng([seed, 0])
        self.basis = (rng.normal(size=(latent, dim)) / np.sqrt(latent)).astype(np.float32)
        self.centres = (separation * rng.normal(size=(n_classes, latent))).astype(np.float32)
        self.offset = rng.normal(0.3, 0.3, size=dim).astype(np.float32)
        self.n_classes, self.dim, self.latent = n_classes, dim, latent

    def rows(self, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        z = self.centres[y] + rng.normal(size=(len(y), self.latent)).astype(np.float32)
        X = z @ self.basis + self.offset + 0.15 * rng.normal(size=(len(y), self.dim)).astype(np.float32)
        return np.maximum(X, 0.0, out=X)


def _part(geo: _Geometry, which: int, p: int, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Base rows of part ``p`` of a set (0 train, 1 test, 2 pool): a pure function of its arguments."""
    rng = np.random.default_rng([seed, which + 1, p])
    y = rng.integers(0, geo.n_classes, size=rows)
    return geo.rows(y, rng), y


def _near_copy(x: np.ndarray, rng: np.random.Generator, geo: _Geometry) -> np.ndarray:
    """``x`` slightly changed (a re-encoded or resized copy: centred cosine ~0.99 with ``x``)."""
    return np.maximum(x + 0.1 * rng.normal(size=x.shape).astype(np.float32), 0.0)


def write_planted(
    out_dir: Path,
    rows: int,
    test_rows: int = 4000,
    pool_rows: int = 0,
    n_classes: int = 37,
    dim: int = 2048,
    dtype: str = "float16",
    seed: int = 0,
    rate: float = 0.002,
) -> PlantedSet:
    """``train.h5`` (``rows`` labelled rows), ``test.h5`` and, with ``pool_rows``, ``pool.h5`` (unlabelled)
    under ``out_dir``, written part by part through :class:`CacheWriter` (memory: one part), with
    ``rate * rows`` each of exact duplicates, near duplicates, label errors and outliers planted in train,
    and ``rate * test_rows`` (at least 2) exact and near leaks of train rows in test. Deterministic in
    ``seed``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    geo = _Geometry(n_classes, dim, seed)
    classes = [f"c{i:02d}" for i in range(n_classes)]
    train = out_dir / "train.h5"
    res = PlantedSet(train, out_dir / "test.h5", out_dir / "pool.h5" if pool_rows else None, classes)
    with CacheWriter(train, identity(dim), classes, dtype=dtype) as w:
        for p, lo in enumerate(range(0, rows, PART_ROWS)):
            X, y = _part(geo, 0, p, min(PART_ROWS, rows - lo), seed)
            _plant_train(X, y, lo, geo, np.random.default_rng([seed, 9, p]), rate, res)
            _write(w, X, y, lo, "train")
        w.finalize()
    leak_rng = np.random.default_rng([seed, 8])
    n_leak = max(2, int(rate * test_rows))
    sources = np.sort(leak_rng.choice(rows, size=2 * n_leak, replace=False))
    with CacheWriter(res.test, identity(dim), classes, dtype=dtype) as w:
        for p, lo in enumerate(range(0, test_rows, PART_ROWS)):
            X, y = _part(geo, 1, p, min(PART_ROWS, test_rows - lo), seed)
            if p == 0:  # the first test rows are copies of train rows
                for t, src in enumerate(sources[: min(len(sources), len(X))]):
                    part, off = divmod(int(src), PART_ROWS)
                    Xs, ys = _train_part(geo, part, rows, seed, rate)
                    X[t], y[t] = (Xs[off] if t % 2 == 0 else _near_copy(Xs[off], leak_rng, geo)), ys[off]
                    (res.leaks if t % 2 == 0 else res.near_leaks).append((int(src), t))
            _write(w, X, y, lo, "test")
        w.finalize()
    if pool_rows:
        with CacheWriter(res.pool, identity(dim), classes, dtype=dtype) as w:
            for p, lo in enumerate(range(0, pool_rows, PART_ROWS)):
                X, _ = _part(geo, 2, p, min(PART_ROWS, pool_rows - lo), seed)
                _write(w, X, np.full(len(X), -1), lo, "pool")
            w.finalize()
    return res


def _train_part(geo: _Geometry, p: int, rows: int, seed: int, rate: float) -> tuple[np.ndarray, np.ndarray]:
    lo = p * PART_ROWS
    X, y = _part(geo, 0, p, min(PART_ROWS, rows - lo), seed)
    _plant_train(X, y, lo, geo, np.random.default_rng([seed, 9, p]), rate, None)
    return X, y


def _plant_train(
    X: np.ndarray, y: np.ndarray, lo: int, geo: _Geometry, rng: np.random.Generator, rate: float, res: Any
) -> None:
    """Plant, inside one part, ``rate`` of its rows each as exact copies, near copies, flipped labels and
    outliers (recorded in ``res`` as cache rows, when given)."""
    n = len(X)
    m = int(rng.binomial(n, rate)) if n >= 8 else 0
    picks = rng.choice(n, size=min(n, 5 * m), replace=False) if m else np.zeros(0, dtype=np.int64)
    src, dup, near, flip, far = (picks[i * m : (i + 1) * m] for i in range(5))
    for a, b in zip(src, dup):
        X[b], y[b] = X[a], y[a]
    for a, b in zip(src, near):
        X[b], y[b] = _near_copy(X[a], rng, geo), y[a]
    for i in flip:
        y[i] = (y[i] + rng.integers(1, geo.n_classes)) % geo.n_classes
    for i in far:  # a row of no class: strong isotropic noise (far from every class and every other outlier)
        X[i] = np.maximum(2.0 * rng.normal(size=geo.dim), 0.0)
    if res is not None:
        res.duplicates += [(lo + int(a), lo + int(b)) for a, b in zip(src, dup)]
        res.near += [(lo + int(a), lo + int(b)) for a, b in zip(src, near)]
        res.label_errors += [lo + int(i) for i in flip]
        res.outliers += [lo + int(i) for i in far]


def _write(w: CacheWriter, X: np.ndarray, y: np.ndarray, lo: int, name: str) -> None:
    paths = [f"{name}/img{lo + i:07d}.png" for i in range(len(X))]
    keys = [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in X]
    w.write_part(paths, [int(v) for v in y], X, keys=keys)
