"""The HDF5 feature cache: layout, crash-safe writing, resume, identity checks and chunked reads.

Nothing else in the package touches h5py. Layout (see docs/cache-format.md)::

    /features        (N, D) float16|float32, chunked along N
    /labels          (N,) int64, -1 = unlabelled
    /paths           (N,) utf-8, relative to the data root
    /stages/<name>   (N, C, H, W) float16, one image per chunk (only with --cut)
    /skipped         (M, 2) utf-8: path, reason
    attrs            format, format_version, identity (JSON), classes (JSON), ...

Crash safety: while a run is going, finished chunks are written as separate files in ``<out>.parts/``,
each with an atomic rename. The HDF5 file itself is only ever produced whole: it is written under a
temporary name and renamed over ``<out>`` at the end. So a kill at any moment leaves either the previous
cache or the new one, never a torn file, and the next run finds the finished chunks and skips them.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CacheError, IdentityMismatch
from .fsutil import atomic_write_json
from .identity import BackboneIdentity

FORMAT = "resnet_transfer.cache"
FORMAT_VERSION = 1
FEATURE_CHUNK_ROWS = 1024


def _str_dtype() -> Any:
    import h5py

    return h5py.string_dtype(encoding="utf-8")


def versions() -> dict[str, str]:
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


# ------------------------------------------------------------------------------------------------ read


class FeatureCache:
    """Read access to a cache. Arrays come back as numpy; ``features()`` loads all rows (float32)."""

    def __init__(self, path: str | Path) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"{self.path}: no such cache", "make it with `rt extract --data DIR --out FILE`")
        self._h5: Any = None
        try:
            # kept open: a reader keeps seeing the file it opened even if a writer renames a new one over it
            self._h5 = f = h5py.File(self.path, "r")
            attrs = dict(f.attrs)
            fmt = str(attrs.get("format", ""))
            if fmt != FORMAT:
                raise CacheError(
                    f"{self.path}: not a resnet_transfer cache (format={fmt or 'missing'})",
                    "make one with `rt extract`",
                )
            version = int(attrs.get("format_version", 0))
            if version != FORMAT_VERSION:
                raise CacheError(
                    f"{self.path}: cache layout version {version}, this rt reads version {FORMAT_VERSION}",
                    "rebuild it with `rt extract ... --overwrite`",
                )
            self.identity = BackboneIdentity.from_dict(json.loads(attrs["identity"]))
            self.classes: list[str] = json.loads(attrs["classes"])
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
            self.n = int(f["features"].shape[0])
            self.dim = int(f["features"].shape[1])
            self.labels = f["labels"][:].astype(np.int64)
            self.paths = [p.decode() if isinstance(p, bytes) else str(p) for p in f["paths"][:]]
            self.stages = {k: tuple(v.shape[1:]) for k, v in f["stages"].items()} if "stages" in f else {}
            sk = f["skipped"][:] if "skipped" in f else np.zeros((0, 2), dtype=object)
            self.skipped = [(_s(a), _s(b)) for a, b in sk]
            self.feature_dtype = str(f["features"].dtype)
            _check_virtual_sources(f, self.path)
        except CacheError:
            self.close()
            raise
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
            self.close()
            raise CacheError(
                f"{self.path}: cannot read the cache ({type(exc).__name__}: {str(exc)[:150]}); it is truncated, "
                "corrupt or not HDF5",
                "delete it and run `rt extract` again (finished chunks in *.parts/ are reused)",
            ) from exc

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_h5"] = None
        return d

    def _file(self) -> Any:
        import h5py

        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        return self._h5

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def labelled(self) -> np.ndarray:
        """Indices of labelled rows."""
        return np.flatnonzero(self.labels >= 0)

    def features(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Pooled features as float32: all rows, or the given ones (in the given order)."""
        ds = self._file()["features"]
        if rows is None:
            out = np.empty(ds.shape, dtype=np.float32)
            if ds.dtype == np.float32:
                ds.read_direct(out)
                return out
            # whole chunks into one reused buffer, converted block by block: no second full-size copy
            step = FEATURE_CHUNK_ROWS * 4
            buf = np.empty((min(step, ds.shape[0]), ds.shape[1]), dtype=ds.dtype)
            for lo in range(0, ds.shape[0], step):
                hi = min(ds.shape[0], lo + step)
                ds.read_direct(buf, np.s_[lo:hi], np.s_[0 : hi - lo])
                out[lo:hi] = buf[: hi - lo]
            return out
        return self._take(ds, rows).astype(np.float32, copy=False)

    def stage(self, name: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Feature maps of stage ``name`` for ``rows`` (float32, N x C x H x W)."""
        if name not in self.stages:
            raise CacheError(
                f"{self.path} holds no {name!r} feature maps (it has: {', '.join(self.stages) or 'none'})",
                f"re-extract with `rt extract ... --cut {name}`",
            )
        return self._take(self._file()["stages"][name], rows).astype(np.float32, copy=False)

    @staticmethod
    def _take(ds: Any, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(rows, dtype=np.int64)
        if idx.size == 0:
            return np.empty((0, *ds.shape[1:]), dtype=ds.dtype)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        uniq, inverse = np.unique(sorted_idx, return_inverse=True)
        data = ds[uniq]  # h5py wants increasing, unique indices
        out = np.empty((len(idx), *ds.shape[1:]), dtype=ds.dtype)
        out[order] = data[inverse]
        return out

    def iter_chunks(
        self,
        rows: np.ndarray | None = None,
        chunk_rows: int = FEATURE_CHUNK_ROWS,
        shuffle: bool = False,
        seed: int = 0,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(features, labels)`` in blocks of whole HDF5 chunks (fast, contiguous reads), optionally
        in shuffled block order with rows shuffled inside each block. Memory stays at one block."""
        rows = np.arange(self.n) if rows is None else np.asarray(rows)
        blocks = [rows[(rows // chunk_rows) == b] for b in np.unique(rows // chunk_rows)]
        rng = np.random.default_rng(seed)
        if shuffle:
            rng.shuffle(blocks)
        ds = self._file()["features"]
        for block in blocks:
            lo, hi = int(block.min()), int(block.max()) + 1
            data = ds[lo:hi][block - lo].astype(np.float32)
            labels = self.labels[block]
            if shuffle:
                perm = rng.permutation(len(block))
                data, labels = data[perm], labels[perm]
            yield data, labels

    def labelled_as(self, classes: Sequence[str], option: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
        """The labelled rows and their labels as indices into ``classes`` (another model's class order).
        A labelled row of a class not in ``classes``, or no labelled row at all, is a :class:`DataError`
        naming ``option`` (e.g. ``--val x.h5``) with ``hint``."""
        from .errors import DataError

        index = {c: i for i, c in enumerate(classes)}
        rows = self.labelled
        names = [self.classes[j] for j in self.labels[rows]]
        unknown = sorted({n for n in names if n not in index})
        if unknown:
            raise DataError(
                f"{option}: class(es) {', '.join(unknown)} are not among {', '.join(classes)}",
                hint,
            )
        if not len(rows):
            raise DataError(f"{option}: no labelled rows", hint)
        return rows, np.asarray([index[n] for n in names], dtype=np.int64)

    def check_identity(self, identity: BackboneIdentity, what: str = "the model") -> None:
        diffs = self.identity.differences(identity)
        if diffs:
            raise IdentityMismatch(
                f"{self.path} was extracted with another backbone than {what} ({'; '.join(diffs)})",
                "use the cache made with the same --model/--weights/--image-size, or re-extract",
            )

    def summary(self) -> dict[str, Any]:
        """Everything ``rt info`` shows, as plain data."""
        counts = {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}
        unl = int((self.labels < 0).sum())
        if unl:
            counts["(unlabelled)"] = unl
        size = self.path.stat().st_size
        return {
            "path": str(self.path),
            "rows": self.n,
            "feature_dim": self.dim,
            "feature_dtype": self.feature_dtype,
            "classes": counts,
            "stages": {k: list(v) for k, v in self.stages.items()},
            "skipped": len(self.skipped),
            "identity": self.identity.to_dict(),
            "created": self.attrs.get("created"),
            "precision": self.attrs.get("precision"),
            "versions": json.loads(self.attrs.get("versions", "{}")),
            "source": self.attrs.get("source"),
            "root": self.attrs.get("root") or None,
            "size_mb": round(size / 1e6, 2),
        }


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _check_virtual_sources(f: Any, path: Path) -> None:
    """A cache written by a sharded `rt extract` is a virtual dataset over shard files; a missing shard would
    read as NaN rows, so refuse it up front."""
    names = ["features", *(f"stages/{k}" for k in f.get("stages", []))]
    for name in names:
        if not f[name].is_virtual:
            continue
        for src in f[name].virtual_sources():
            shard = Path(src.file_name)
            shard = shard if shard.is_absolute() else path.parent / shard
            if not shard.exists():
                raise CacheError(
                    f"{path}: its shard file {shard} is missing (the cache is a virtual dataset over shards)",
                    "keep the shard files next to the cache, or re-run the extract with --merge for one file",
                )


# ----------------------------------------------------------------------------------------------- write


class CacheLock:
    """An exclusive, non-blocking lock next to the cache; released when the process dies."""

    def __init__(self, out: Path) -> None:
        self.path = out.with_name(out.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CacheError(
                f"{self.path.with_suffix('')}: another `rt extract` (pid {other}) is writing this cache",
                "wait for it to finish, or write to another --out",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)


def _disk_full(path: Path, exc: OSError) -> CacheError:
    return CacheError(
        f"disk full while writing {path} ({exc.strerror})",
        "free some space and run the same command again: finished chunks are kept, the previous cache is intact",
    )


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
        self._lock = CacheLock(self.out)
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
            if sorted(self.existing.stages) != sorted(self.stage_shapes):
                raise IdentityMismatch(
                    f"{self.out} holds feature maps for [{', '.join(self.existing.stages)}], this run asks for "
                    f"[{', '.join(self.stage_shapes)}]",
                    "pass the same --cut as before, or --overwrite to rebuild the cache",
                )
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
        import h5py

        parts = [(p, d) for p in self._part_files() if (d := self._read_part(p)) is not None]
        if not parts and self.existing is not None:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            return self.existing.n, 0
        have = self.existing.n if self.existing is not None else 0
        seen = set(self.existing.paths) if self.existing is not None else set()
        keep: list[tuple[Any, np.ndarray]] = []
        for _, d in parts:  # a path committed twice (a kill between two renames) is kept once
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
        n = have + new
        dim = self.identity.num_features
        tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        try:
            with h5py.File(tmp, "w") as f:
                feats = f.create_dataset(
                    "features", (n, dim), dtype=self.dtype, chunks=(max(1, min(FEATURE_CHUNK_ROWS, n)), dim)
                )
                labels = np.empty(n, dtype=np.int64)
                paths: list[str] = []
                stage_ds = {
                    name: f.create_dataset(f"stages/{name}", (n, *shape), dtype="float16", chunks=(1, *shape))
                    for name, shape in self.stage_shapes.items()
                }
                skipped: list[tuple[str, str]] = []
                row = 0
                if self.existing is not None:
                    src = self.existing._file()
                    for lo in range(0, have, FEATURE_CHUNK_ROWS):
                        hi = min(have, lo + FEATURE_CHUNK_ROWS)
                        feats[lo:hi] = src["features"][lo:hi]
                        for name in stage_ds:
                            stage_ds[name][lo:hi] = src["stages"][name][lo:hi]
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
                f.create_dataset("labels", data=labels)
                f.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=_str_dtype())
                f.create_dataset("skipped", data=np.asarray(skipped, dtype=object).reshape(-1, 2), dtype=_str_dtype())
                attrs = {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "identity": self.identity.to_json(),
                    "model": self.identity.model,
                    "weights_id": self.identity.weights_id,
                    "transform": json.dumps(self.identity.transform.to_dict()),
                    "image_size": self.identity.transform.input_size,
                    "classes": json.dumps(self.classes),
                    "cut": json.dumps(sorted(self.stage_shapes)),
                    "versions": json.dumps(versions()),
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    **{k: v for k, v in self.attrs.items() if v is not None},
                }
                for k, v in attrs.items():
                    f.attrs[k] = v
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            if self.existing is not None:
                self.existing.close()
            os.replace(tmp, self.out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space" in str(exc):
                raise _disk_full(self.out, exc) from exc
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.existing = FeatureCache(self.out)
        return n, new
