"""Planted data for the cache-tool tests: caches with features of a chosen geometry, written through the
project's cache writer, and head directories with chosen weights (and temperature)."""

from __future__ import annotations

import hashlib
from pathlib import Path

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
