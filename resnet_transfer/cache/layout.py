"""The cache format's elements, each written by one function (docs/cache-format.md), and its chunk files.

``write_features``, ``write_stage``, ``write_pooled``, ``write_labels``, ``write_paths``, ``write_keys``,
``write_stats``, ``write_skipped``, ``write_index`` and ``write_attrs`` each encode one element, and every
dataset records its element's name and version (attributes ``element``, ``element_version``), the way
anndata's ``_io/specs`` records an encoding per element. :class:`ChunkStore` writes and reads the immutable
chunk files ``<out>.chunks/chunk-*.h5`` through the same functions. Only :mod:`resnet_transfer.cache_writer`
uses this module: together they are the one writer of the format.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..backbone import BackboneIdentity
from ..base import CacheError, IdentityMismatch, atomic_write_json, fsync_dir, fsync_file, precision_kind, temp_name
from .reader import FEATURE_CHUNK_ROWS, FORMAT, FORMAT_VERSION, NO_STAT, FeatureCache, chunk_dir

#: version of each element's encoding; bumped when that element's layout changes
ELEMENT_VERSIONS = {
    "features": 2,
    "stage": 2,
    "pooled": 1,
    "labels": 1,
    "paths": 1,
    "keys": 1,
    "stat": 1,
    "skipped": 2,
    "index": 1,
    "chunk": 1,
}

Stat = tuple[int, int, int]


def str_dtype() -> Any:
    """The UTF-8 variable-length string dtype every string dataset of the format uses."""
    import h5py

    return h5py.string_dtype(encoding="utf-8")


def versions() -> dict[str, str]:
    """Versions of the software that wrote a cache (the ``versions`` attribute)."""
    import h5py
    import timm
    import torch

    from ..base.version import __version__

    return {
        "resnet_transfer": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "h5py": h5py.__version__,
    }


def path_key(path: str) -> str:
    """The key of a row written without its file's content (a synthetic cache): a digest of the path."""
    return hashlib.blake2b(b"path:" + path.encode(), digest_size=16).hexdigest()


# ------------------------------------------------------------------------------------- one per element


def _tag(ds: Any, element: str) -> Any:
    ds.attrs["element"] = element
    ds.attrs["element_version"] = ELEMENT_VERSIONS[element]
    return ds


@dataclass(frozen=True)
class Piece:
    """Rows ``start:start+rows`` of a chunk file (``file``, relative to the cache's folder; its dataset has
    ``source_rows`` rows) land at rows ``dest:dest+rows`` of a virtual dataset."""

    file: str
    source_rows: int
    start: int
    dest: int
    rows: int


def _array(
    f: Any, name: str, element: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...], pieces: Any
) -> Any:
    """A real chunked dataset to fill (``pieces=None``, or no rows) or a virtual one over chunk files."""
    import h5py

    if pieces is None or not shape[0]:
        return _tag(f.create_dataset(name, shape, dtype=dtype, chunks=chunks if shape[0] else None), element)
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    for p in pieces:
        vsrc = h5py.VirtualSource(p.file, name, shape=(p.source_rows, *shape[1:]), dtype=dtype)
        layout[p.dest : p.dest + p.rows] = vsrc[p.start : p.start + p.rows]
    # a missing chunk file reads as NaN, never as plausible zeros (FeatureCache also refuses it up front)
    return _tag(f.create_virtual_dataset(name, layout, fillvalue=np.nan), element)


def write_features(f: Any, n: int, dim: int, dtype: Any, pieces: Sequence[Piece] | None = None) -> Any:
    """``/features`` (N, D) pooled penultimate features."""
    return _array(f, "features", "features", (n, dim), dtype, (max(1, min(FEATURE_CHUNK_ROWS, n)), dim), pieces)


def write_stage(f: Any, name: str, n: int, shape: tuple[int, ...], pieces: Sequence[Piece] | None = None) -> Any:
    """``/stages/<name>`` (N, C, H, W) float16 feature maps, one image per HDF5 chunk."""
    return _array(f, f"stages/{name}", "stage", (n, *shape), "float16", (1, *shape), pieces)


def write_pooled(f: Any, name: str, n: int, dim: int, dtype: Any, pieces: Sequence[Piece] | None = None) -> Any:
    """``/pooled/<stage>`` (N, C) globally average-pooled features of a stage (``--pool-stages``)."""
    return _array(f, f"pooled/{name}", "pooled", (n, dim), dtype, (max(1, min(FEATURE_CHUNK_ROWS, n)), dim), pieces)


def write_labels(f: Any, labels: np.ndarray, name: str = "labels") -> Any:
    """``/labels`` (N,) int64, -1 = unlabelled."""
    return _tag(f.create_dataset(name, data=np.asarray(labels, dtype=np.int64).reshape(-1)), "labels")


def _strings(f: Any, name: str, element: str, values: Sequence[Any], cols: int = 0) -> Any:
    data = np.asarray(list(values), dtype=object)
    data = data.reshape(-1, cols) if cols else data.reshape(-1)
    return _tag(f.create_dataset(name, data=data, dtype=str_dtype()), element)


def write_paths(f: Any, paths: Sequence[str], name: str = "paths") -> Any:
    """``/paths`` (N,) UTF-8, relative to the data root."""
    return _strings(f, name, "paths", paths)


def write_keys(f: Any, keys: Sequence[str], name: str = "keys") -> Any:
    """``/keys`` (N,) UTF-8: each row's content key (``fsutil.file_digest`` of its file)."""
    return _strings(f, name, "keys", keys)


def write_stats(f: Any, stats: Sequence[Stat], name: str = "stat") -> Any:
    """``/stat`` (N, 3) int64: size, mtime_ns, inode of the file when its key was taken (-1: unknown)."""
    data = np.asarray(list(stats), dtype=np.int64).reshape(-1, 3)
    return _tag(f.create_dataset(name, data=data), "stat")


def write_skipped(f: Any, skipped: Sequence[SkippedFile]) -> None:
    """``/skipped`` (M, 2) UTF-8 path, reason; ``/skipped_keys`` (M,); ``/skipped_stat`` (M, 3)."""
    _strings(f, "skipped", "skipped", [(s.path, s.reason) for s in skipped], cols=2)
    write_keys(f, [s.key for s in skipped], "skipped_keys")
    write_stats(f, [s.stat for s in skipped], "skipped_stat")


def write_index(f: Any, files: Sequence[str], file_rows: Sequence[int], chunk: np.ndarray, row: np.ndarray) -> None:
    """``/index``: chunk file names (relative to ``<out>.chunks/``; ``""`` = this file, a merged cache), their
    row counts, and per row the file and the row in it."""
    g = f.create_group("index")
    _strings(g, "chunk_files", "index", files)
    _tag(g.create_dataset("chunk_rows", data=np.asarray(list(file_rows), dtype=np.int64)), "index")
    _tag(g.create_dataset("chunk", data=np.asarray(chunk, dtype=np.int64)), "index")
    _tag(g.create_dataset("row", data=np.asarray(row, dtype=np.int64)), "index")


def write_attrs(f: Any, attrs: dict[str, Any]) -> None:
    """The file's attributes (see :func:`cache_attrs`)."""
    for k, v in attrs.items():
        f.attrs[k] = v


def cache_attrs(spec: CacheSpec, classes: Sequence[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Format and version, identity (and quick-read copies), precision, dtype, classes, cut, pooled stages."""
    identity = spec.identity
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "identity": identity.to_json(),
        "model": identity.model,
        "weights_id": identity.weights_id,
        "transform": json.dumps(identity.transform.to_dict()),
        "image_size": identity.transform.input_size,
        "classes": json.dumps(list(classes)),
        "cut": json.dumps(sorted(spec.stage_shapes)),
        "pooled": json.dumps(list(spec.pooled_dims)),
        "dtype": spec.dtype,
        "versions": json.dumps(versions()),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **{k: v for k, v in (extra or {}).items() if v is not None},
    }


def disk_full(path: Path, exc: OSError) -> CacheError:
    return CacheError(
        f"disk full while writing {path} ({exc.strerror})",
        "free some space and run the same command again: finished chunks are kept, the previous cache is intact",
    )


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space" in str(exc))


def commit_file(tmp: Path, out: Path) -> None:
    """fsync ``tmp`` and rename it over ``out`` (the last step of every file of the format)."""
    fsync_file(tmp)
    os.replace(tmp, out)
    fsync_dir(out.parent)


# ------------------------------------------------------------------------------------------ run identity


@dataclass(frozen=True)
class CacheSpec:
    """What makes rows comparable, one per cache: backbone identity (weights, transform), compute precision,
    storage dtype, the stages whose maps and pooled features are stored. Rows of two specs never mix."""

    identity: BackboneIdentity
    precision: str | None
    dtype: str
    stage_shapes: dict[str, tuple[int, ...]]
    pooled_dims: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(
            json.dumps(
                {
                    "format_version": FORMAT_VERSION,
                    "identity": self.identity.to_dict(),
                    "precision": self.precision,
                    "dtype": self.dtype,
                    "stages": {k: list(v) for k, v in sorted(self.stage_shapes.items())},
                    "pooled": dict(self.pooled_dims),
                }
            )
        )

    def check(self, cache: FeatureCache) -> None:
        """Refuse an existing cache made with another spec (the fix is ``--overwrite``)."""
        cache.check_identity(self.identity, "this run")
        have, want = list(cache.stages), list(self.stage_shapes)
        if sorted(have) != sorted(want):
            raise IdentityMismatch(
                f"{cache.path} holds feature maps for [{', '.join(have)}], this run asks for [{', '.join(want)}]",
                "pass the same --cut as before, or --overwrite to rebuild the cache",
            )
        if cache.pooled_stages != list(self.pooled_dims):
            raise IdentityMismatch(
                f"{cache.path} holds pooled features of [{', '.join(cache.pooled_stages)}], this run asks for "
                f"[{', '.join(self.pooled_dims)}]",
                "pass the same --pool-stages as before, or --overwrite to rebuild the cache",
            )
        if self.precision and cache.precision and cache.precision != self.precision:
            kind = precision_kind(cache.precision)
            hint = f"pass --precision {kind} as before, or --overwrite to rebuild the cache"
            if "@" in cache.precision or "@" in self.precision:  # an int8 calibration set on either side
                hint = (
                    f"pass --precision {kind} with the --calibration images used before"
                    + (" (none: the default set)" if kind == cache.precision else "")
                    + ", or --overwrite to rebuild the cache"
                )
            raise IdentityMismatch(
                f"{cache.path} was computed in {cache.precision}, this run asks for {self.precision} "
                "(rows of two precisions, or of two int8 calibration sets, never mix in one cache)",
                hint,
            )
        if cache.feature_dtype != self.dtype:
            raise IdentityMismatch(
                f"{cache.path} stores {cache.feature_dtype}, this run asks for --dtype {self.dtype}",
                f"pass --dtype {cache.feature_dtype} as before, or --overwrite to rebuild the cache",
            )


# ------------------------------------------------------------------------------------------ chunk files


@dataclass(frozen=True)
class SkippedFile:
    """A file that could not be used, keyed by content so that a repaired file (new bytes) is retried."""

    path: str
    reason: str
    key: str
    stat: Stat = NO_STAT


@dataclass(frozen=True)
class Row:
    """One row of a cache: an image's path and label, its content key and the stat its key was taken at."""

    path: str
    label: int
    key: str
    stat: Stat = NO_STAT


@dataclass
class Chunk:
    """What a chunk file claims: the rows it was computed for and the files it found unreadable."""

    name: str
    rows: list[Row]
    skipped: list[SkippedFile]


class ChunkStore:
    """The folder of immutable chunk files of one cache (``<out>.chunks/``) and its ``spec.json``."""

    def __init__(self, out: Path, spec: CacheSpec) -> None:
        self.out = out
        self.dir = chunk_dir(out)
        self.spec = spec
        self._seq = 0
        self._tag = f"{time.time_ns():016x}-r{int(os.environ.get('RANK', '0') or 0):04d}"

    def prepare(self) -> None:
        """Create the folder with this run's spec, or check that its chunks were made with the same one."""
        spec_file = self.dir / "spec.json"
        if spec_file.exists():
            try:
                old = json.loads(spec_file.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != self.spec.to_dict():
                raise IdentityMismatch(
                    f"{self.dir} holds unfinished work from a run with other settings",
                    "repeat that run's command to finish it, or pass --overwrite to start over",
                )
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(spec_file, self.spec.to_dict(), indent=None)

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.glob("chunk-*.h5"))

    def write(
        self,
        rows: Sequence[Row],
        features: np.ndarray,
        stages: dict[str, np.ndarray],
        pooled: dict[str, np.ndarray],
        skipped: Sequence[SkippedFile] = (),
    ) -> str:
        """One chunk file, whole or absent (temp name, fsync, rename). Returns its name."""
        import h5py

        spec = self.spec
        if sorted(stages) != sorted(spec.stage_shapes) or sorted(pooled) != sorted(spec.pooled_dims):
            raise ValueError(
                f"stages {sorted(stages)}/{sorted(pooled)} != {sorted(spec.stage_shapes)}/{sorted(spec.pooled_dims)}"
            )
        name = f"chunk-{self._tag}-{self._seq:06d}.h5"
        self._seq += 1
        path = self.dir / name
        tmp = temp_name(path)
        n = len(rows)
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["element"] = "chunk"
                f.attrs["element_version"] = ELEMENT_VERSIONS["chunk"]
                write_features(f, n, spec.identity.num_features, spec.dtype)[...] = np.asarray(features).reshape(
                    n, spec.identity.num_features
                )
                for s, shape in spec.stage_shapes.items():
                    write_stage(f, s, n, shape)[...] = np.asarray(stages[s]).reshape(n, *shape)
                for s, dim in spec.pooled_dims.items():
                    write_pooled(f, s, n, dim, spec.dtype)[...] = np.asarray(pooled[s]).reshape(n, dim)
                write_paths(f, [r.path for r in rows])
                write_labels(f, np.asarray([r.label for r in rows], dtype=np.int64))
                write_keys(f, [r.key for r in rows])
                write_skipped(f, skipped)
            commit_file(tmp, path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full(tmp, exc) from exc  # type: ignore[arg-type]
            raise
        return name

    def read(self, name: str) -> Chunk | None:
        """A chunk file's claims (None for a file that cannot be read: it is deleted, and recomputed)."""
        import h5py

        try:
            with h5py.File(self.dir / name, "r") as f:
                rows = [Row(_s(p), int(lab), _s(k)) for p, lab, k in zip(f["paths"][:], f["labels"][:], f["keys"][:])]
                sk = f["skipped"][:]
                skipped = [SkippedFile(_s(a), _s(b), _s(k)) for (a, b), k in zip(sk, f["skipped_keys"][:])]
        except (OSError, KeyError, ValueError):
            (self.dir / name).unlink(missing_ok=True)
            return None
        return Chunk(name, rows, skipped)

    def collect(self, keep: set[str]) -> None:
        """Delete chunk files no row of the new index reads, and temporaries of killed runs."""
        for name in self.names():
            if name not in keep:
                (self.dir / name).unlink(missing_ok=True)
        for stale in self.dir.glob(".chunk-*.tmp-*") if self.dir.is_dir() else []:
            stale.unlink(missing_ok=True)


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
