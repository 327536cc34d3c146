"""The only writer of the HDF5 cache format (docs/cache-format.md), with :mod:`resnet_transfer.cache_format`
(its elements and chunk files): :class:`CacheWriter` (lock, identity checks, resume, the index file), for
single-process and sharded runs alike.

Layout (format version 2): the arrays of computed images live in immutable *chunk files*
``<out>.chunks/chunk-*.h5`` (one per ``--chunk-rows`` images, each renamed into place whole); ``<out>`` is a
small *index* whose ``features``, ``stages/<name>`` and ``pooled/<stage>`` are HDF5 virtual datasets mapping
each row to a row of a chunk file, next to real ``labels``, ``paths``, ``keys`` (content digests),
``skipped`` and the file stats that let a no-op run skip hashing. An incremental run writes new chunk files
for the images it computes and a new index; nothing else is rewritten. The index is replaced by rename, so
a kill at any moment leaves the previous cache or the new one; finished chunk files of a killed run are
found by key and reused by the next one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..backbone import BackboneIdentity
from ..base import CacheError, FileLock, temp_name
from ..images import path_free
from .layout import (
    CacheSpec,
    Chunk,
    ChunkStore,
    Piece,
    Row,
    SkippedFile,
    Stat,
    cache_attrs,
    commit_file,
    disk_full,
    is_disk_full,
    path_key,
    write_attrs,
    write_features,
    write_index,
    write_keys,
    write_labels,
    write_paths,
    write_pooled,
    write_skipped,
    write_stage,
    write_stats,
)
from .reader import FEATURE_CHUNK_ROWS, FeatureCache

__all__ = [
    "CacheSpec",
    "CacheWriter",
    "Chunk",
    "ChunkStore",
    "Row",
    "SkippedFile",
    "Stat",
    "label_map",
    "path_key",
    "runs",
]

# ------------------------------------------------------------------------------------------ the writer


class CacheWriter:
    """Crash-safe writer of one cache. Use as a context manager (it holds the lock)::

    with CacheWriter(out, identity, classes, stage_shapes, attrs={"precision": "fp32"}) as w:
        have = w.known()                      # content key -> where its arrays are stored
        w.write_part(paths, labels, features, {"layer3": maps}, skipped, keys=keys)
        w.finalize(rows, skipped_files)      # the new index; rows=None: existing rows + new chunks' rows

    ``lock=False`` is for the ranks of a sharded run other than 0: they only write chunk files.
    """

    def __init__(
        self,
        out: str | Path,
        identity: BackboneIdentity,
        classes: Sequence[str],
        stage_shapes: dict[str, tuple[int, ...]] | None = None,
        dtype: str = "float16",
        overwrite: bool = False,
        attrs: dict[str, Any] | None = None,
        pooled_dims: dict[str, int] | None = None,
        lock: bool = True,
    ) -> None:
        if dtype not in ("float16", "float32"):
            raise CacheError(f"--dtype {dtype!r} is not supported", "use float16 or float32")
        self.out = Path(out)
        self.identity = identity
        self.classes = list(classes)
        self.stage_shapes = dict(stage_shapes or {})
        self.attrs = dict(attrs or {})
        self.spec = CacheSpec(identity, self.attrs.get("precision"), dtype, self.stage_shapes, dict(pooled_dims or {}))
        self.dtype = dtype
        self.overwrite = overwrite
        self.store = ChunkStore(self.out, self.spec)
        self.parts_dir = self.store.dir
        self._lock = FileLock(self.out) if lock else None
        self.existing: FeatureCache | None = None
        self._chunks: dict[str, Chunk] | None = None

    # -- lifecycle
    def __enter__(self) -> CacheWriter:
        if self._lock is not None:
            self._lock.acquire()
        try:
            if self._lock is not None:
                self._open()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        if self.existing is not None:
            self.existing.close()
        if self._lock is not None:
            self._lock.release()

    def inspect(self) -> None:
        """Open the existing cache read-only and check it against this run's spec (for a dry run: no lock,
        nothing created or written). Pair with :meth:`close`."""
        if self.out.exists() and not self.overwrite:
            self.existing = FeatureCache(self.out)
            self.spec.check(self.existing)

    def close(self) -> None:
        if self.existing is not None:
            self.existing.close()

    def _open(self) -> None:
        # a run killed while writing the index leaves its temporary file; we hold the lock, so it is stale
        for stale in self.out.parent.glob(f".{self.out.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        if self.overwrite:
            shutil.rmtree(self.store.dir, ignore_errors=True)
            self.out.unlink(missing_ok=True)
        if self.out.exists():
            self.existing = FeatureCache(self.out)
            self.spec.check(self.existing)
        self.store.prepare()

    # -- what is there
    def _indexed(self) -> set[str]:
        if self.existing is None:
            return set()
        names, _, _ = self.existing.locations()
        return set(names)

    def chunks(self) -> list[Chunk]:
        """Finished chunk files no index row reads yet (an interrupted run's, or other ranks'), by name."""
        if self._chunks is None:
            self._chunks = {}
        indexed = self._indexed()
        for name in self.store.names():
            if name not in indexed and name not in self._chunks and (c := self.store.read(name)) is not None:
                self._chunks[name] = c
        return [self._chunks[k] for k in sorted(self._chunks) if (self.store.dir / k).exists()]

    def known(self) -> dict[str, tuple[str, int]]:
        """Content key -> (chunk file, row) for every key whose arrays are stored (index first)."""
        out: dict[str, tuple[str, int]] = {}
        if self.existing is not None:
            names, chunk, row = self.existing.locations()
            for k, c, r in zip(self.existing.keys, chunk, row):
                out.setdefault(k, (names[c], int(r)))
        for c in self.chunks():
            for r, row_ in enumerate(c.rows):
                out.setdefault(row_.key, (c.name, r))
        return out

    def known_skips(self) -> dict[str, str]:
        """Content key -> reason for every file content found unreadable (not retried until its bytes change).
        Reasons recorded before they were made path-free (a cache of 0.1.0) lose the file name here."""
        out: dict[str, str] = {}
        if self.existing is not None:
            out.update(zip(self.existing.skipped_keys, (path_free(r) for _, r in self.existing.skipped)))
        for c in self.chunks():
            out.update((s.key, path_free(s.reason)) for s in c.skipped)
        return out

    def done_paths(self) -> set[str]:
        """Paths already in the cache, in finished chunks, or recorded as skipped."""
        done: set[str] = set()
        if self.existing is not None:
            done.update(self.existing.paths)
            done.update(p for p, _ in self.existing.skipped)
        for c in self.chunks():
            done.update(r.path for r in c.rows)
            done.update(s.path for s in c.skipped)
        return done

    @property
    def pending_parts(self) -> int:
        return len(self.chunks())

    # -- writing
    def write_part(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        features: np.ndarray,
        stages: dict[str, np.ndarray] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
        keys: Sequence[str] | None = None,
        pooled: dict[str, np.ndarray] | None = None,
        skipped_keys: Sequence[str] | None = None,
    ) -> Path:
        """Commit one finished chunk file atomically. ``keys`` default to :func:`path_key` of the paths (a
        synthetic cache); ``rt extract`` passes content keys."""
        keys = list(keys) if keys is not None else [path_key(p) for p in paths]
        sk_keys = list(skipped_keys) if skipped_keys is not None else [path_key(p) for p, _ in skipped]
        rows = [Row(p, int(lab), k) for p, lab, k in zip(paths, labels, keys)]
        skips = [SkippedFile(p, r, k) for (p, r), k in zip(skipped, sk_keys)]
        name = self.store.write(rows, features, stages or {}, pooled or {}, skips)
        return self.store.dir / name

    def finalize(
        self,
        rows: Sequence[Row] | None = None,
        skipped: Sequence[SkippedFile] | None = None,
        extra_attrs: dict[str, Any] | None = None,
        merge: bool = False,
    ) -> tuple[int, int]:
        """Write the new index (temp name, fsync, rename over ``out``) for ``rows`` and ``skipped``, then delete
        the chunk files it no longer reads. ``rows=None``: the existing rows, then the rows of the finished
        chunks in order (a path committed twice is kept once). Returns ``(rows, new_rows)``; writes nothing
        when the index would not change."""
        if rows is None:
            rows, skipped = self._appended()
        skipped = list(skipped or [])
        same_kind = self.existing is not None and (not merge or not self.existing.is_virtual)
        if same_kind and self._same_as_existing(rows, skipped) and self._same_attrs():
            self.store.collect(self._indexed())
            return self.existing.n, 0
        old = set(zip(self.existing.paths, self.existing.keys)) if self.existing is not None else set()
        tmp = temp_name(self.out)
        try:
            used = write_cache_index(self, tmp, list(rows), skipped, extra_attrs or {}, merge)
            if self.existing is not None:
                self.existing.close()
            commit_file(tmp, self.out)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full(self.out, exc) from exc  # type: ignore[arg-type]
            raise
        if merge:
            shutil.rmtree(self.store.dir, ignore_errors=True)
        else:
            self.store.collect(used)
        self._chunks = None
        self.existing = FeatureCache(self.out)
        return len(rows), sum((r.path, r.key) not in old for r in rows)

    def _appended(self) -> tuple[list[Row], list[SkippedFile]]:
        rows: list[Row] = []
        skipped: list[SkippedFile] = []
        if self.existing is not None:
            e = self.existing
            stats = e.file_stats()
            remap = label_map(e.classes, self.classes)
            rows = [
                Row(p, int(remap[lab]) if lab >= 0 else -1, k, stats[p][0])
                for p, lab, k in zip(e.paths, e.labels, e.keys)
            ]
            skipped = [SkippedFile(p, r, k, stats[p][0]) for (p, r), k in zip(e.skipped, e.skipped_keys)]
        seen = {r.path for r in rows} | {s.path for s in skipped}
        for c in self.chunks():
            for r in c.rows:
                if r.path not in seen:
                    rows.append(r)
                    seen.add(r.path)
            for s in c.skipped:
                if s.path not in seen:
                    skipped.append(s)
                    seen.add(s.path)
        return rows, skipped

    def _same_as_existing(self, rows: Sequence[Row], skipped: Sequence[SkippedFile]) -> bool:
        e = self.existing
        assert e is not None
        if e.classes != self.classes or len(rows) != e.n or len(skipped) != len(e.skipped):
            return False
        stats = e.file_stats()
        remap = label_map(e.classes, self.classes)
        old_rows = [
            Row(p, int(remap[lab]) if lab >= 0 else -1, k, stats[p][0]) for p, lab, k in zip(e.paths, e.labels, e.keys)
        ]
        old_skips = [SkippedFile(p, r, k, stats[p][0]) for (p, r), k in zip(e.skipped, e.skipped_keys)]
        return old_rows == list(rows) and old_skips == list(skipped)

    def _same_attrs(self) -> bool:
        """Whether the existing cache already records this run's attributes (a data folder and cache moved
        together, or a run with --no-record-root, rewrite the index even when no row changed)."""
        e = self.existing
        assert e is not None
        return all(str(e.attrs.get(k, "")) == str(v) for k, v in self.attrs.items() if v is not None)


def label_map(have: Sequence[str], want: Sequence[str]) -> np.ndarray:
    """Label ids of class order ``have`` as ids into ``want`` (-1 for a class ``want`` lacks)."""
    index = {c: i for i, c in enumerate(want)}
    return np.asarray([index.get(c, -1) for c in have], dtype=np.int64)


def runs(rows: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """``(source, source_start, dest_start, length)`` for the maximal contiguous stretches of ``rows``."""
    found: list[tuple[int, int, int, int]] = []
    for dest, (s, r) in enumerate(rows):
        if found:
            s0, r0, d0, n = found[-1]
            if s == s0 and r == r0 + n:
                found[-1] = (s0, r0, d0, n + 1)
                continue
        found.append((s, r, dest, 1))
    return found


# ------------------------------------------------------------------------------------------ the index


def write_cache_index(
    w: CacheWriter, tmp: Path, rows: list[Row], skipped: list[SkippedFile], extra: dict[str, Any], merge: bool
) -> set[str]:
    """The index file at ``tmp``: every row's arrays as virtual datasets over the chunk files holding its key
    (or copied into the file itself, ``merge``). Returns the chunk files it reads."""
    import h5py

    known = w.known()
    lost = [r.path for r in rows if r.key not in known]
    if lost:
        raise CacheError(
            f"{len(lost)} image(s) are in no chunk file (first: {lost[0]})",
            "run the same command again (finished chunks are reused); under torchrun put --out on a file "
            "system every rank shares",
        )
    if not merge and any(known[r.key][0] == "" for r in rows):
        known = _rechunk(w, rows, known)
    names: list[str] = []
    slot: dict[str, int] = {}
    where: list[tuple[int, int]] = []
    for r in rows:
        name, row = known[r.key]
        if name not in slot:
            slot[name] = len(names)
            names.append(name)
        where.append((slot[name], row))
    sizes = _chunk_sizes(w, names)
    found = runs(where)
    spec, n = w.spec, len(rows)
    rel = os.path.relpath(w.store.dir, w.out.parent)
    pieces = None if merge else [Piece(f"{rel}/{names[s]}", sizes[s], r0, d0, k) for s, r0, d0, k in found]
    with h5py.File(tmp, "w") as f:
        arrays = [write_features(f, n, spec.identity.num_features, spec.dtype, pieces)]
        arrays += [write_stage(f, s, n, shape, pieces) for s, shape in spec.stage_shapes.items()]
        arrays += [write_pooled(f, s, n, dim, spec.dtype, pieces) for s, dim in spec.pooled_dims.items()]
        if merge:
            _copy_rows(w, arrays, names, found)
        write_labels(f, np.asarray([r.label for r in rows], dtype=np.int64))
        write_paths(f, [r.path for r in rows])
        write_keys(f, [r.key for r in rows])
        write_stats(f, [r.stat for r in rows])
        write_skipped(f, skipped)
        chunk = np.asarray([s for s, _ in where], dtype=np.int64)
        row = np.asarray([r for _, r in where], dtype=np.int64)
        if merge:
            chunk, row, names, sizes = np.zeros(n, np.int64), np.arange(n, dtype=np.int64), [""], [n]
        write_index(f, names, sizes, chunk, row)
        write_attrs(f, cache_attrs(spec, w.classes, {**w.attrs, **extra}))
    return set() if merge else set(names)


def _chunk_sizes(w: CacheWriter, names: list[str]) -> list[int]:
    import h5py

    have = w.existing.chunk_rows() if w.existing is not None else {}
    have.update({c.name: len(c.rows) for c in (w._chunks or {}).values()})
    out = []
    for name in names:
        if name not in have:
            with h5py.File(w.store.dir / name, "r") as f:
                have[name] = int(f["features"].shape[0])
        out.append(have[name])
    return out


def _source(w: CacheWriter, name: str, handles: dict[str, Any]) -> Any:
    import h5py

    if name == "":
        assert w.existing is not None
        return w.existing.dataset("/")
    if name not in handles:
        handles[name] = h5py.File(w.store.dir / name, "r")
    return handles[name]


def _copy_rows(w: CacheWriter, arrays: list[Any], names: list[str], found: list[tuple[int, int, int, int]]) -> None:
    """Fill real datasets from the chunk files (a merged cache), block by block."""
    handles: dict[str, Any] = {}
    try:
        for s, r0, d0, k in found:
            src = _source(w, names[s], handles)
            for ds in arrays:
                for lo in range(0, k, FEATURE_CHUNK_ROWS):
                    hi = min(k, lo + FEATURE_CHUNK_ROWS)
                    ds[d0 + lo : d0 + hi] = src[ds.name][r0 + lo : r0 + hi]
    finally:
        for h in handles.values():
            h.close()


def _rechunk(w: CacheWriter, rows: list[Row], known: dict[str, tuple[str, int]]) -> dict[str, tuple[str, int]]:
    """Rows stored inside a merged cache move into chunk files before that file is replaced by an index
    (a one-time copy: an incremental run on a ``--merge`` cache)."""
    assert w.existing is not None
    src = w.existing.dataset("/")
    inside = sorted({known[r.key][1]: r for r in rows if known[r.key][0] == ""}.items())
    known = dict(known)
    for lo in range(0, len(inside), FEATURE_CHUNK_ROWS):
        block = inside[lo : lo + FEATURE_CHUNK_ROWS]
        idx = np.asarray([i for i, _ in block], dtype=np.int64)
        stages = {s: src[f"stages/{s}"][idx] for s in w.spec.stage_shapes}
        pooled = {s: src[f"pooled/{s}"][idx] for s in w.spec.pooled_dims}
        name = w.store.write([r for _, r in block], src["features"][idx], stages, pooled)
        w._chunks = w._chunks or {}
        w._chunks[name] = Chunk(name, [r for _, r in block], [])
        known.update({r.key: (name, j) for j, (_, r) in enumerate(block)})
    return known
