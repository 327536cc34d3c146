"""The out-of-distribution scorers of `rt fit-head`: fitted on the head's training rows beside the head, and the
features of images of the unknown (``--ood DIR``: a feature cache of the same backbone, or an image folder
run through the head's backbone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..base import DataError, get_reporter


def ood_beside_fit(
    cache: Any,
    split: Any,
    head: Any,
    X_train: np.ndarray | None,
    unknown: str | Path | None = None,
    search: str = "auto",
    memory_budget: float | None = None,
) -> tuple[Any, dict[str, Any]]:
    """``(OodModel or None, report)``: every scorer fitted on ``split``'s training rows of ``cache`` (the head's
    own input: ``X_train`` when the features were chosen, else read as stored, float16 staying float16),
    thresholds on its validation rows, the scorer chosen on ``unknown`` when given. Skipped (``None``, with
    the reason) when the stored rows exceed ``memory_budget`` bytes."""
    from .ood_store import fit_ood

    rows = split.train_rows
    stage = getattr(head.module_, "features", None)
    if X_train is None:
        stored = len(rows) * cache.dim * np.dtype(cache.feature_dtype).itemsize
        if memory_budget is not None and stored > memory_budget:
            why = (
                f"the {len(rows):,} training rows' features ({stored / 1e9:.1f} GB as stored) exceed the memory "
                "budget: raise --max-memory-gb to fit the out-of-distribution scorers"
            )
            get_reporter().warn(f"no out-of-distribution scorer: {why}")
            return None, {"skipped": why}
        X_train = cache.features(rows, stage=stage, dtype=None)
    logits_train = _logits(head, X_train)
    X_val = split.X_val
    logits_val = _logits(head, X_val) if X_val is not None else None
    u = None
    if unknown is not None:
        precision = getattr(cache, "precision", "") or "auto"  # a folder: run as the cache was extracted
        X_u = unknown_features(unknown, cache.identity, stage, precision=precision)
        u = (X_u, _logits(head, X_u))
    return fit_ood(X_train, cache.labels[rows], logits_train, X_val, logits_val, unknown=u, search=search)


def _logits(head: Any, X: Any, block: int = 65536) -> np.ndarray:
    return np.concatenate([head.logits(np.asarray(X[lo : lo + block], np.float32)) for lo in range(0, len(X), block)])


def unknown_features(
    path: str | Path,
    identity: Any,
    stage: list[str] | None = None,
    *,
    backbone: Any = None,
    pooled: Any = None,
    precision: str = "auto",
) -> np.ndarray:
    """The head's input features of the images in ``path``: a feature cache (its rows, checked against
    ``identity``) or a folder / manifest / image file run through ``backbone`` (default: rebuilt from
    ``identity``), ``pooled`` giving the stages' features for a head on ``stage``."""
    p = Path(path)
    if p.is_file() and p.suffix in (".h5", ".hdf5"):
        from ..cache import FeatureCache

        with FeatureCache(p) as fc:
            fc.check_identity(identity, "the head")
            if not len(fc.labels):
                raise DataError(f"--ood {p}: the cache holds no rows", "extract a few images of the unknown into it")
            return fc.features(None, stage=stage)
    return _forward(p, identity, stage, backbone, pooled, precision)


def _forward(p: Path, identity: Any, stage: list[str] | None, backbone: Any, pooled: Any, precision: str) -> np.ndarray:
    import torch

    from ..backbone import backbone_from_identity, forward_images, pooled_stage_features
    from ..base import resolve_device, resolve_precision
    from ..images import list_images

    if not p.exists():
        raise DataError(
            f"--ood {p}: no such file or folder", "give a folder of images of none of the classes, or a cache"
        )
    images = list_images(p)
    if not len(images):
        raise DataError(f"--ood {p}: no images found", "give a folder of images of none of the classes")
    bb = backbone if backbone is not None else backbone_from_identity(identity)
    if pooled is None and stage:

        def pooled(x: Any) -> Any:
            feats = pooled_stage_features(bb, x, list(stage))
            return torch.cat([feats[s] for s in stage], 1)

    dev = resolve_device("auto")
    out = []
    with torch.inference_mode():
        for b in forward_images(
            bb, images, device=dev, precision=resolve_precision(precision, dev), pooled=pooled, compile="off"
        ):
            if b.features is not None:
                out.append(b.features.float().cpu().numpy())
    if not out:
        raise DataError(f"--ood {p}: none of the images could be read", "check the files")
    return np.concatenate(out)
