"""What the review computes from the cached features, in one blockwise pass and no forward pass.

- The head's verdict (``--head DIR``): its calibrated probabilities for every row (the head on the cached
  pooled features, in numpy: :mod:`resnet_transfer.head.arrays`, no torch), so the page can show the wrong, the uncertain, and sort
  by loss or confidence.
- Nearest neighbours: cosine similarity of mean-centred features (raw post-ReLU features all look alike),
  the query row against every row in blocks of :data:`BLOCK` rows: one N-vector per query, never an N x N
  matrix. The centred, unit-length features are kept in memory as float16 when they fit in
  ``memory_budget`` bytes (80 MB for 20,000 x 2048), else each query reads the cache block by block.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...base import UsageError

BLOCK = 4096
MEMORY_BUDGET = 512 * 2**20


@dataclass
class HeadVerdicts:
    """The head's probabilities per cache row, in the head's class order."""

    path: Path
    classes: list[str]
    probs: np.ndarray  # (N, K) float32
    temperature: float

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(1)


class Vectors:
    """Blockwise views of one cache's features: head probabilities and a cosine neighbour index."""

    def __init__(self, cache: Any, head: str | Path | None = None, memory_budget: int = MEMORY_BUDGET) -> None:
        self.cache = cache
        self.n, self.dim = int(cache.n), int(cache.dim)
        self.head: HeadVerdicts | None = None
        self._unit: np.ndarray | None = None
        self._norm_inv: np.ndarray | None = None
        arrays, md = _load_head(cache, head) if head is not None else (None, None)
        self._index(arrays, md, memory_budget)

    def _blocks(self) -> Any:
        ds = self.cache.dataset("features")
        buf = np.empty((min(BLOCK, max(self.n, 1)), self.dim), dtype=np.float32)
        for lo in range(0, self.n, BLOCK):
            hi = min(self.n, lo + BLOCK)
            ds.read_direct(buf, np.s_[lo:hi], np.s_[0 : hi - lo])
            yield lo, hi, buf[: hi - lo]

    def _index(self, arrays: Any, md: Any, budget: int) -> None:
        keep = self.n * self.dim * 2 <= budget
        raw = np.empty((self.n, self.dim), dtype=np.float16) if keep else None
        total = np.zeros(self.dim, dtype=np.float64)
        probs = []
        head_stages = _head_stages(md)
        for lo, hi, X in self._blocks():
            total += X.sum(0, dtype=np.float64)
            if raw is not None:
                raw[lo:hi] = X
            if arrays is not None and head_stages is None:
                probs.append(_probabilities(arrays, md, X))
        self.mean = (total / max(self.n, 1)).astype(np.float32)
        if arrays is not None:
            if head_stages is not None:  # a head on pooled stages reads those, block by block too
                rows = np.arange(self.n)
                probs = [
                    _probabilities(arrays, md, self.cache.features(rows[lo : lo + BLOCK], stage=head_stages))
                    for lo in range(0, self.n, BLOCK)
                ]
            from ...head import head_temperature

            self.head = HeadVerdicts(
                Path(md.path),
                list(md.classes),
                np.concatenate(probs).astype(np.float32) if probs else np.zeros((0, len(md.classes)), np.float32),
                head_temperature(md.head_config),
            )
        norms = np.empty(self.n, dtype=np.float32)
        if raw is not None:
            for lo in range(0, self.n, BLOCK):  # centre and normalise in place, block by block
                blk = raw[lo : lo + BLOCK].astype(np.float32) - self.mean
                nrm = np.linalg.norm(blk, axis=1)
                norms[lo : lo + len(blk)] = nrm
                raw[lo : lo + BLOCK] = blk / np.maximum(nrm, 1e-12)[:, None]
            self._unit = raw
        else:
            for lo, hi, X in self._blocks():
                norms[lo:hi] = np.linalg.norm(X - self.mean, axis=1)
        self._norm_inv = 1.0 / np.maximum(norms, 1e-12)

    @property
    def in_memory(self) -> bool:
        return self._unit is not None

    def _query_vector(self, row: int) -> np.ndarray:
        if self._unit is not None:
            return self._unit[row].astype(np.float32)
        x = self.cache.dataset("features")[row].astype(np.float32) - self.mean
        return x / max(float(np.linalg.norm(x)), 1e-12)

    def neighbours(self, row: int, k: int = 8) -> list[tuple[int, float]]:
        """The ``k`` rows most like ``row`` (itself left out): ``(row, cosine)``, most similar first."""
        if not 0 <= row < self.n:
            raise UsageError(f"row {row} is not a row of the cache")
        q = self._query_vector(row)
        sims = np.empty(self.n, dtype=np.float32)
        if self._unit is not None:
            for lo in range(0, self.n, BLOCK):
                sims[lo : lo + BLOCK] = self._unit[lo : lo + BLOCK].astype(np.float32) @ q
        else:
            for lo, hi, X in self._blocks():
                sims[lo:hi] = ((X - self.mean) @ q) * self._norm_inv[lo:hi]
        sims[row] = -np.inf
        k = min(k, self.n - 1)
        if k <= 0:
            return []
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top], kind="stable")]
        return [(int(j), float(sims[j])) for j in top]


def _load_head(cache: Any, head: str | Path) -> tuple[Any, Any]:
    """The head's arrays (numpy: no torch import) and its directory, checked against the cache."""
    from ...head import load_head_arrays
    from ...models import HEAD_FILE, read_model_dir

    md = read_model_dir(head)
    if md.kind != "head":
        raise UsageError(
            f"--head {head} is a finetuned model: its backbone changed, so the cached features are not its input",
            "give the `rt fit-head` directory fitted on this cache (or extract a cache with the finetuned model)",
        )
    cache.check_identity(md.identity, f"the head in {md.path}")
    return load_head_arrays(md.path / HEAD_FILE), md


def _head_stages(md: Any) -> list[str] | None:
    if md is None:
        return None
    from ...models import head_features

    return head_features(md.head_config)


def _probabilities(arrays: Any, md: Any, X: np.ndarray) -> np.ndarray:
    from ...head import head_probabilities

    return head_probabilities(arrays, md.head_config, X).astype(np.float32)
