"""The only writer of the HDF5 cache format (docs/cache-format.md): one function per element, the crash-safe
:class:`CacheWriter` (chunks, resume, finalize) and the assembly of a cache from several sources (a sharded
run's final file, virtual or merged).

Every element of the format is written by exactly one function here (``write_features``, ``write_labels``,
``write_paths``, ``write_stage``, ``write_skipped``, ``write_attrs``), and each dataset carries the name and
version of its element as attributes (``element``, ``element_version``), the way anndata's ``_io/specs``
records an encoding per element. Single-process and sharded runs both go through these functions, so the
layout is decided in one place. Reading is :mod:`resnet_transfer.cache`'s job.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backbones import BackboneIdentity
from .cache import FEATURE_CHUNK_ROWS, FORMAT, FORMAT_VERSION, FeatureCache
from .errors import CacheError, IdentityMismatch
from .fsutil import FileLock, atomic_write_json, fsync_file, temp_name

#: version of each element's encoding; bumped when that element's layout changes
ELEMENT_VERSIONS = {"features": 1, "labels": 1, "paths": 1, "stage": 1, "skipped": 1}


def str_dtype() -> Any:
    """The UTF-8 variable-length string dtype every string dataset of the format uses."""
    import h5py

    return h5py.string_dtype(encoding="utf-8")


def versions() -> dict[str, str]:
    """Versions of the software that wrote a cache (the ``versions`` attribute)."""
    import h5py
    import timm
    import torch

    from . import __version__

    return {
        "resnet_transfer": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "h5py": h5py.__version__,
    }


# ------------------------------------------------------------------------------------- one per element


def _tag(ds: Any, element: str) -> Any:
    ds.attrs["element"] = element
    ds.attrs["element_version"] = ELEMENT_VERSIONS[element]
    return ds


def _virtual(f: Any, name: str, shape: tuple[int, ...], dtype: Any, pieces: Sequence[VirtualPiece]) -> Any:
    import h5py

    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    for p in pieces:
        vsrc = h5py.VirtualSource(p.file, p.dataset, shape=p.source_shape, dtype=dtype)
        layout[p.dest : p.dest + p.rows] = vsrc[p.start : p.start + p.rows]
    # a missing source reads as NaN, never as plausible zeros (FeatureCache also checks)
    return f.create_virtual_dataset(name, layout, fillvalue=np.nan)


@dataclass(frozen=True)
class VirtualPiece:
    """Rows ``start:start+rows`` of dataset ``dataset`` in ``file`` (relative to the cache's folder) land at
    rows ``dest:dest+rows`` of a virtual dataset."""

    file: str
    dataset: str
    source_shape: tuple[int, ...]
    start: int
    dest: int
    rows: int


def write_features(f: Any, n: int, dim: int, dtype: Any, pieces: Sequence[VirtualPiece] | None = None) -> Any:
    """``/features`` (N, D): a real chunked dataset to fill (``pieces=None``) or a virtual one over pieces."""
    if pieces is not None and n:
        return _tag(_virtual(f, "features", (n, dim), dtype, pieces), "features")
    ds = f.create_dataset("features", (n, dim), dtype=dtype, chunks=(max(1, min(FEATURE_CHUNK_ROWS, n)), dim))
    return _tag(ds, "features")


def write_stage(
    f: Any,
    name: str,
    n: int,
    shape: tuple[int, ...],
    dtype: Any = "float16",
    pieces: Sequence[VirtualPiece] | None = None,
) -> Any:
    """``/stages/<name>`` (N, C, H, W) feature maps, one image per chunk (or virtual over pieces)."""
    if pieces is not None and n:
        return _tag(_virtual(f, f"stages/{name}", (n, *shape), dtype, pieces), "stage")
    return _tag(f.create_dataset(f"stages/{name}", (n, *shape), dtype=dtype, chunks=(1, *shape)), "stage")


def write_labels(f: Any, labels: np.ndarray) -> Any:
    """``/labels`` (N,) int64, -1 = unlabelled."""
    return _tag(f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64)), "labels")


def write_paths(f: Any, paths: Sequence[str]) -> Any:
    """``/paths`` (N,) UTF-8, relative to the data root."""
    return _tag(f.create_dataset("paths", data=np.asarray(list(paths), dtype=object), dtype=str_dtype()), "paths")


def write_skipped(f: Any, skipped: Sequence[tuple[str, str]]) -> Any:
    """``/skipped`` (M, 2) UTF-8: path, reason."""
    data = np.asarray(list(skipped), dtype=object).reshape(-1, 2)
    return _tag(f.create_dataset("skipped", data=data, dtype=str_dtype()), "skipped")


def cache_attrs(
    identity: BackboneIdentity, classes: Sequence[str], stages: Sequence[str], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The file's attributes: format and version, identity (and quick-read copies), classes, cut, versions."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "identity": identity.to_json(),
        "model": identity.model,
        "weights_id": identity.weights_id,
        "transform": json.dumps(identity.transform.to_dict()),
        "image_size": identity.transform.input_size,
        "classes": json.dumps(list(classes)),
        "cut": json.dumps(sorted(stages)),
        "versions": json.dumps(versions()),
        "created": _now(),
        **{k: v for k, v in (extra or {}).items() if v is not None},
    }


def write_attrs(f: Any, attrs: dict[str, Any]) -> None:
    """The file's attributes (see :func:`cache_attrs`)."""
    for k, v in attrs.items():
        f.attrs[k] = v


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _disk_full(path: Path, exc: OSError) -> CacheError:
    return CacheError(
        f"disk full while writing {path} ({exc.strerror})",
        "free some space and run the same command again: finished chunks are kept, the previous cache is intact",
    )


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space" in str(exc)


def commit_file(tmp: Path, out: Path) -> None:
    """fsync ``tmp`` and rename it over ``out`` (the last step of every cache write)."""
    fsync_file(tmp)
    os.replace(tmp, out)


# ------------------------------------------------------------------------------------------ the writer


class CacheWriter:
    """Crash-safe writer. Use as a context manager (it holds the lock)::

    with CacheWriter(out, identity, classes, stage_shapes) as w:
        done = w.done_paths()
        w.write_part(paths, labels, features, {"layer3": maps}, skipped)
        w.finalize()
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
    ) -> None:
        if dtype not in ("float16", "float32"):
            raise CacheError(f"--dtype {dtype!r} is not supported", "use float16 or float32")
        self.out = Path(out)
        self.identity = identity
        self.classes = list(classes)
        self.stage_shapes = dict(stage_shapes or {})
        self.dtype = dtype
        self.overwrite = overwrite
        self.attrs = dict(attrs or {})
        self.parts_dir = self.out.with_name(self.out.name + ".parts")
        self._lock = FileLock(self.out)
        self.existing: FeatureCache | None = None
        self._next_part = 0

    # -- lifecycle
    def __enter__(self) -> CacheWriter:
        self._lock.acquire()
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.existing is not None:
            self.existing.close()
        self._lock.release()

    def _spec(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "identity": self.identity.to_dict(),
            "stages": sorted(self.stage_shapes),
            "dtype": self.dtype,
        }

    def _open(self) -> None:
        # a run killed while assembling leaves its temporary file; we hold the lock, so it is stale
        for stale in self.out.parent.glob(f".{self.out.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        if self.overwrite:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            self.out.unlink(missing_ok=True)
        if self.out.exists():
            self.existing = FeatureCache(self.out)
            self.existing.check_identity(self.identity, "this run")
            check_same_stages(self.out, list(self.existing.stages), list(self.stage_shapes))
        spec_file = self.parts_dir / "run.json"
        if spec_file.exists():
            try:
                old = json.loads(spec_file.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != json.loads(json.dumps(self._spec())):
                raise IdentityMismatch(
                    f"{self.parts_dir} holds unfinished work from a run with other settings",
                    "repeat that run's command to finish it, or pass --overwrite to start over",
                )
        else:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(spec_file, self._spec(), indent=None)
        self._next_part = 1 + max([-1, *(int(p.stem.split("-")[1]) for p in self._part_files())])

    def _part_files(self) -> list[Path]:
        if not self.parts_dir.exists():
            return []
        out = []
        for p in self.parts_dir.glob("part-*.npz"):
            try:
                int(p.stem.split("-")[1])
                out.append(p)
            except (IndexError, ValueError):
                continue
        return sorted(out, key=lambda p: int(p.stem.split("-")[1]))

    def _read_part(self, p: Path) -> Any:
        try:
            return np.load(p, allow_pickle=False)
        except Exception:
            p.unlink(missing_ok=True)
            return None

    def done_paths(self) -> set[str]:
        """Paths already in the cache, in finished chunks, or recorded as skipped."""
        done: set[str] = set()
        if self.existing is not None:
            done.update(self.existing.paths)
            done.update(p for p, _ in self.existing.skipped)
        for p in self._part_files():
            part = self._read_part(p)
            if part is not None:
                done.update(str(x) for x in part["paths"])
                done.update(str(row[0]) for row in part["skipped"])
        return done

    @property
    def pending_parts(self) -> int:
        return len(self._part_files())

    def write_part(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        features: np.ndarray,
        stages: dict[str, np.ndarray] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> Path:
        """Commit one finished chunk atomically (write to a temp name, fsync, rename)."""
        stages = stages or {}
        if sorted(stages) != sorted(self.stage_shapes):
            raise ValueError(f"stages {sorted(stages)} != {sorted(self.stage_shapes)}")
        arrays: dict[str, np.ndarray] = {
            "paths": np.asarray(list(paths), dtype=np.str_),
            "labels": np.asarray(list(labels), dtype=np.int64),
            "features": np.asarray(features).astype(self.dtype, copy=False),
            "skipped": np.asarray(list(skipped), dtype=np.str_).reshape(-1, 2),
        }
        for name, maps in stages.items():
            arrays[f"stage:{name}"] = np.asarray(maps).astype(np.float16, copy=False)
        path = self.parts_dir / f"part-{self._next_part:06d}.npz"
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _disk_full(tmp, exc) from exc
            raise
        self._next_part += 1
        return path

    def finalize(self) -> tuple[int, int]:
        """Write the complete cache (existing rows, then finished chunks in order) under a temporary name
        and rename it over ``out``. Returns ``(rows, new_rows)``. A no-op when nothing new was added."""
        parts = [d for p in self._part_files() if (d := self._read_part(p)) is not None]
        if not parts and self.existing is not None:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            return self.existing.n, 0
        seen = set(self.existing.paths) if self.existing is not None else set()
        keep: list[tuple[Any, np.ndarray]] = []
        for d in parts:  # a path committed twice (a kill between two renames) is kept once
            mask = np.array([str(x) not in seen for x in d["paths"]], dtype=bool)
            seen.update(str(x) for x in d["paths"])
            keep.append((d, mask))
        new = int(sum(m.sum() for _, m in keep))
        old_skips = set(self.existing.skipped) if self.existing is not None else set()
        new_skips = {(str(a), str(b)) for d, _ in keep for a, b in d["skipped"]} - old_skips
        if self.existing is not None and new == 0 and not new_skips:
            # only duplicates of committed rows (a kill after the rename, before the clean-up)
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            return self.existing.n, 0
        tmp = temp_name(self.out)
        try:
            n = self._write_file(tmp, keep, old_skips)
            if self.existing is not None:
                self.existing.close()
            commit_file(tmp, self.out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if _is_disk_full(exc):
                raise _disk_full(self.out, exc) from exc
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.existing = FeatureCache(self.out)
        return n, new

    def _write_file(self, tmp: Path, keep: list[tuple[Any, np.ndarray]], old_skips: set[tuple[str, str]]) -> int:
        """The whole cache at ``tmp``: the existing rows, then the new rows of each part. Returns N."""
        import h5py

        have = self.existing.n if self.existing is not None else 0
        n = have + int(sum(m.sum() for _, m in keep))
        labels = np.empty(n, dtype=np.int64)
        paths: list[str] = []
        skipped: list[tuple[str, str]] = []
        with h5py.File(tmp, "w") as f:
            feats = write_features(f, n, self.identity.num_features, self.dtype)
            stage_ds = {name: write_stage(f, name, n, shape) for name, shape in self.stage_shapes.items()}
            row = 0
            if self.existing is not None:
                for lo in range(0, have, FEATURE_CHUNK_ROWS):
                    hi = min(have, lo + FEATURE_CHUNK_ROWS)
                    feats[lo:hi] = self.existing.dataset("features")[lo:hi]
                    for name in stage_ds:
                        stage_ds[name][lo:hi] = self.existing.dataset(f"stages/{name}")[lo:hi]
                labels[:have] = self.existing.labels
                paths += self.existing.paths
                skipped += self.existing.skipped
                row = have
            for d, mask in keep:
                k = int(mask.sum())
                if k:
                    feats[row : row + k] = d["features"][mask]
                    labels[row : row + k] = d["labels"][mask]
                    for name in stage_ds:
                        stage_ds[name][row : row + k] = d[f"stage:{name}"][mask]
                    paths += [str(x) for x in d["paths"][mask]]
                    row += k
                skipped += [(str(a), str(b)) for a, b in d["skipped"] if (str(a), str(b)) not in old_skips]
            write_labels(f, labels)
            write_paths(f, paths)
            write_skipped(f, skipped)
            write_attrs(f, cache_attrs(self.identity, self.classes, list(self.stage_shapes), self.attrs))
        return n


def check_same_stages(out: Path, have: list[str], want: list[str]) -> None:
    """A cache keeps the feature maps it was made with: another ``--cut`` is refused (``--overwrite``)."""
    if sorted(have) != sorted(want):
        raise IdentityMismatch(
            f"{out} holds feature maps for [{', '.join(have)}], this run asks for [{', '.join(want)}]",
            "pass the same --cut as before, or --overwrite to rebuild the cache",
        )


# -------------------------------------------------------------------------- assembly from several sources


def shard_path(out: str | Path, rank: int, world_size: int) -> Path:
    """``<out>.shard-00002-of-00004.h5``: rank 2 of 4's shard cache, next to ``out``."""
    out = Path(out)
    return out.with_name(f"{out.name}.shard-{rank:05d}-of-{world_size:05d}.h5")


def shard_files(out: str | Path) -> list[Path]:
    """Shard caches of ``out`` on disk (any world size), sorted by (world size, rank)."""
    out = Path(out)
    found = []
    for p in out.parent.glob(f"{out.name}.shard-*-of-*.h5"):
        tail = p.name[len(out.name) + len(".shard-") : -len(".h5")]
        try:
            rank, world = (int(x) for x in tail.split("-of-"))
        except ValueError:
            continue
        found.append(((world, rank), p))
    return [p for _, p in sorted(found)]


def remove_cache(path: Path) -> None:
    """Delete a cache file and its unfinished work."""
    path.unlink(missing_ok=True)
    shutil.rmtree(path.with_name(path.name + ".parts"), ignore_errors=True)


@dataclass
class Source:
    """A cache whose rows an assembled cache takes, and how its label ids map to the assembled classes."""

    path: Path
    cache: FeatureCache
    label_map: np.ndarray  # source label index -> final label index


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


def write_assembled(
    out: Path,
    sources: list[Source],
    rows: list[tuple[int, int]],
    stages: list[str],
    classes: list[str],
    skipped: list[tuple[str, str]],
    merge: bool,
) -> None:
    """Write ``out`` (temp name, fsync, atomic rename) from ``rows`` = (source, row) pairs: features and
    stage maps as virtual datasets over the sources, or copied (``merge``); labels, paths and skipped always
    as real datasets; the attributes of the first source with ``classes`` and ``created`` renewed."""
    import h5py

    n = len(rows)
    merge = merge or n == 0  # an empty virtual layout is not allowed; an empty real dataset is
    first = sources[rows[0][0]].cache if rows else sources[0].cache
    found = runs(rows)
    labels = np.empty(n, dtype=np.int64)
    for s, r0, d0, k in found:
        src = sources[s]
        raw = src.cache.labels[r0 : r0 + k]
        labels[d0 : d0 + k] = np.where(raw >= 0, src.label_map[np.maximum(raw, 0)], -1)
    paths = [sources[s].cache.paths[r] for s, r in rows]
    tmp = temp_name(out)
    try:
        with h5py.File(tmp, "w") as f:
            for key in ["features", *(f"stages/{name}" for name in stages)]:
                ref = first.dataset(key)
                shape = tuple(ref.shape[1:])
                pieces = None
                if not merge:
                    pieces = [
                        VirtualPiece(
                            os.path.relpath(sources[s].path, out.parent),
                            key,
                            tuple(sources[s].cache.dataset(key).shape),
                            r0,
                            d0,
                            k,
                        )
                        for s, r0, d0, k in found
                    ]
                if key == "features":
                    ds = write_features(f, n, shape[0], ref.dtype, pieces)
                else:
                    ds = write_stage(f, key.split("/", 1)[1], n, shape, ref.dtype, pieces)
                if merge:
                    for s, r0, d0, k in found:
                        src_ds = sources[s].cache.dataset(key)
                        for lo in range(0, k, FEATURE_CHUNK_ROWS):
                            hi = min(k, lo + FEATURE_CHUNK_ROWS)
                            ds[d0 + lo : d0 + hi] = src_ds[r0 + lo : r0 + hi]
            write_labels(f, labels)
            write_paths(f, paths)
            write_skipped(f, skipped)
            attrs = dict(first.attrs)
            attrs.update(classes=json.dumps(classes), created=_now())
            write_attrs(f, attrs)
        commit_file(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
