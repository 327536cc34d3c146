"""A small review set for the `rt review` tests: a planted cache (three clusters), its images, a head that
predicts the cluster, and a real `rt audit` report of it.

Planted: row 2 lies in the cat cluster but is labelled dog (the head says cat: wrong; the audit calls it a
label error), row 12 is an exact copy of row 11 (one content key), row 29 is unlabelled."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from planted import blobs, write_cache, write_head, write_images

CLASSES = ["cat", "dog", "fox"]
FLIPPED, COPY_OF, COPY, UNLABELLED = 2, 11, 12, 29


@dataclass
class ReviewSet:
    root: Path  # the images
    cache: Path
    head: Path
    audit: Path | None
    paths: list[str]
    labels: list[int]
    X: np.ndarray


def make_review_set(tmp: Path, per_class: int = 10, dim: int = 16, audit: bool = True, seed: int = 0) -> ReviewSet:
    centres = 4.0 * np.eye(len(CLASSES), dim, dtype=np.float32)
    X, y = blobs(per_class, centres, 0.6, seed)
    X[COPY] = X[COPY_OF]
    labels = [int(v) for v in y]
    labels[FLIPPED] = 1
    labels[UNLABELLED] = -1
    paths = [f"{CLASSES[c] if c >= 0 else 'loose'}/{i:03d}.png" for i, c in enumerate(labels)]
    root = write_images(tmp / "images", paths, seed)
    cache = write_cache(tmp / "train.h5", X, labels, CLASSES, paths)
    head = write_head(tmp / "head", centres / 4.0 * 3.0, np.zeros(len(CLASSES), np.float32), CLASSES)
    audit_dir = None
    if audit:
        from resnet_transfer.tools import AuditConfig
        from resnet_transfer.tools import audit as run_audit

        audit_dir = tmp / "audit"
        run_audit(AuditConfig(cache=cache, out=audit_dir, root=root, sheet=False, top=10))
    return ReviewSet(root, cache, head, audit_dir, paths, labels, X)
