"""What the review computes from the cached features, in two blockwise passes and no forward pass.

- The head's verdict (``--head DIR``): its calibrated probabilities for every row (the head on the cached
  pooled features, in numpy: :mod:`resnet_transfer.head.arrays`, no torch), so the page can show the wrong,
  the uncertain, and sort by loss or confidence.
- Nearest neighbours: cosine similarity of mean-centred features (raw post-ReLU features all look alike),
  the query row against every row in blocks: one N-vector per query, never an N x N matrix. The centred
  unit vectors are kept as int8 codes with a scale per row (41 MB for 20,000 x 2048) when they
  fit in ``memory_budget``, else each query reads the cache block by block; the ``k + RERANK`` best by the
  codes are then ranked by their exact cosine (read from the cache), which is what the page shows.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...base import UsageError

BLOCK = 4096
QUERY_BLOCK = 2048  # rows of int8 codes turned into float32 at a time (a 16 MB buffer at D = 2048)
RERANK = 32  # candidates beyond k ranked by their exact cosine
MEMORY_BUDGET = 512 * 2**20  # bytes of int8 codes kept in memory (250,000 rows at D = 2048)


@dataclass
class HeadVerdicts:
    """The head's probabilities per cache row, in the head's class order."""

    path: Path
    classes: list[str]
    probs: np.ndarray  # (N, K) float32
    temperature: float
    unknown: np.ndarray | None = None  # (N,) bool: out-of-distribution score above the head's threshold

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
        self._codes: np.ndarray | None = None  # (N, D) int8: the centred unit vectors times a per-row scale
        self._scale_inv: np.ndarray | None = None  # (N,) float32: cosine = codes @ q * scale_inv
        self._lock = threading.Lock()
        self._buf: np.ndarray | None = None  # one block of float32, reused by every query
        arrays, md = _load_head(cache, head) if head is not None else (None, None)
        self.mean = self._first_pass(arrays, md)
        self._norm_inv = self._second_pass(self.n * self.dim <= memory_budget)

    def _blocks(self, block: int = BLOCK) -> Any:
        """``(lo, hi, X)`` over the cache's features, ``X`` float32 (one buffer, reused)."""
        ds = self.cache.dataset("features")
        raw = np.empty((min(block, max(self.n, 1)), self.dim), dtype=ds.dtype)
        out = np.empty(raw.shape, dtype=np.float32)
        for lo in range(0, self.n, block):
            hi = min(self.n, lo + block)
            ds.read_direct(raw, np.s_[lo:hi], np.s_[0 : hi - lo])  # native type: HDF5's conversion is slow
            np.copyto(out[: hi - lo], raw[: hi - lo])
            yield lo, hi, out[: hi - lo]

    def _first_pass(self, arrays: Any, md: Any) -> np.ndarray:
        """The features' mean and (with a head) every row's probabilities."""
        total = np.zeros(self.dim, dtype=np.float64)
        probs = []
        head_stages = _head_stages(md)
        for _, _, X in self._blocks():
            total += X.sum(0, dtype=np.float64)
            if arrays is not None and head_stages is None:
                probs.append(_probabilities(arrays, md, X))
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
                _unknown(self.cache, arrays, md, head_stages),
            )
        return (total / max(self.n, 1)).astype(np.float32)

    def _second_pass(self, keep: bool) -> np.ndarray:
        """Row norms of the centred features and, when they fit, their int8 codes (a scale per row: the
        cosine from codes is within ~1e-3 of the exact one; the top candidates are then ranked exactly)."""
        norms = np.empty(self.n, dtype=np.float32)
        codes = np.empty((self.n, self.dim), dtype=np.int8) if keep else None
        scale_inv = np.empty(self.n, dtype=np.float32) if keep else None
        for lo, hi, X in self._blocks():
            X -= self.mean
            nrm = np.linalg.norm(X, axis=1)
            norms[lo:hi] = nrm
            if codes is not None and scale_inv is not None:
                X /= np.maximum(nrm, 1e-12)[:, None]
                peak = np.maximum(np.abs(X).max(1), 1e-12)
                X *= (127.0 / peak)[:, None]
                np.rint(X, out=X)
                codes[lo:hi] = X
                scale_inv[lo:hi] = peak / 127.0
        self._codes, self._scale_inv = codes, scale_inv
        return 1.0 / np.maximum(norms, 1e-12)

    @property
    def in_memory(self) -> bool:
        return self._codes is not None

    def _unit_rows(self, rows: np.ndarray) -> np.ndarray:
        """The exact centred unit vectors of ``rows`` (read from the cache)."""
        X = self.cache.features(rows) - self.mean
        return X * self._norm_inv[rows][:, None]

    def neighbours(self, row: int, k: int = 8) -> list[tuple[int, float]]:
        """The ``k`` rows most like ``row`` (itself left out): ``(row, cosine)``, most similar first."""
        if not 0 <= row < self.n:
            raise UsageError(f"row {row} is not a row of the cache")
        k = min(k, self.n - 1)
        if k <= 0:
            return []
        q = self._unit_rows(np.asarray([row]))[0]
        sims = np.empty(self.n, dtype=np.float32)
        with self._lock:
            if self._codes is not None and self._scale_inv is not None:
                if self._buf is None:
                    self._buf = np.empty((min(QUERY_BLOCK, self.n), self.dim), dtype=np.float32)
                buf = self._buf
                for lo in range(0, self.n, QUERY_BLOCK):
                    hi = min(self.n, lo + QUERY_BLOCK)
                    np.copyto(buf[: hi - lo], self._codes[lo:hi])
                    np.dot(buf[: hi - lo], q, out=sims[lo:hi])
                sims *= self._scale_inv
            else:
                for lo, hi, X in self._blocks():
                    sims[lo:hi] = ((X - self.mean) @ q) * self._norm_inv[lo:hi]
        sims[row] = -np.inf
        m = min(self.n - 1, k + RERANK)
        cand = np.sort(np.argpartition(-sims, m - 1)[:m])
        exact = self._unit_rows(cand) @ q  # the candidates' exact cosines
        order = np.argsort(-exact, kind="stable")[:k]
        return [(int(cand[o]), float(exact[o])) for o in order]


def _load_head(cache: Any, head: str | Path) -> tuple[Any, Any]:
    """The head's arrays (numpy: no torch import) and its directory, checked against the cache."""
    from ...head import HEAD_FILE, load_head_arrays, read_model_dir

    md = read_model_dir(head)
    if md.kind != "head":
        raise UsageError(
            f"--head {head} is a finetuned model: its backbone changed, so the cached features are not its input",
            "give the `rt fit-head` directory fitted on this cache (or extract a cache with the finetuned model)",
        )
    cache.check_identity(md.identity, f"the head in {md.path}")
    return load_head_arrays(md.path / HEAD_FILE), md


def _unknown(cache: Any, arrays: Any, md: Any, stages: list[str] | None) -> np.ndarray | None:
    """Rows whose out-of-distribution score (the head's stored scorer, head/ood.py) is above its threshold;
    ``None`` for a head without one. Rows the head was fitted on are among their own kNN neighbours."""
    from ...head import head_logits, read_ood

    ood = read_ood(md.path, md.meta)
    if ood is None:
        return None
    X = cache.features(None, stage=stages, dtype=None)
    z = np.concatenate([head_logits(arrays, md.head_config, X[lo : lo + BLOCK]) for lo in range(0, len(X), BLOCK)])
    return ood.score(X, z) > ood.threshold()


def _head_stages(md: Any) -> list[str] | None:
    if md is None:
        return None
    from ...head import head_features

    return head_features(md.head_config)


def _probabilities(arrays: Any, md: Any, X: np.ndarray) -> np.ndarray:
    from ...head import head_probabilities

    return head_probabilities(arrays, md.head_config, X).astype(np.float32)
