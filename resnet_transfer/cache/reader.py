"""Reading the HDF5 feature cache: :class:`FeatureCache` (identity checks, chunked reads, summary).

Writing is :mod:`resnet_transfer.cache_writer`'s job, the only writer of the format. Layout (version 2, see
docs/cache-format.md)::

    /features        (N, D) float16|float32 (virtual over <out>.chunks/*.h5, or real in a merged file)
    /labels          (N,) int64, -1 = unlabelled
    /paths           (N,) utf-8, relative to the data root
    /keys            (N,) utf-8, the content key of each row's file
    /stages/<name>   (N, C, H, W) float16 (only with --cut)
    /pooled/<stage>  (N, C) pooled features of a stage (only with --pool-stages)
    /skipped         (M, 2) utf-8: path, reason (+ /skipped_keys)
    /stat, /index    the stat check and the row -> chunk-file mapping
    attrs            format, format_version, identity (JSON), precision, classes (JSON), last_run, ...

A reader keeps the index it opened open, so it keeps seeing that version when a writer renames a new one
over it; the chunk files an update no longer needs are deleted, so a reader that outlives an update of
its cache may find rows of edited or deleted images gone (it reads NaN there): reopen after an update.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..backbone import BackboneIdentity
from ..base import CacheError, IdentityMismatch

FORMAT = "resnet_transfer.cache"
FORMAT_VERSION = 2  # 2: rows keyed by content, features held in immutable chunk files (docs/cache-format.md)
FEATURE_CHUNK_ROWS = 1024
NO_STAT = (-1, -1, -1)  # (size, mtime_ns, inode) of a row whose file was not stat'ed (a synthetic cache)


def chunk_dir(out: str | Path) -> Path:
    """``<out>.chunks/``: the folder of immutable chunk files a cache's virtual datasets read from."""
    out = Path(out)
    return out.with_name(out.name + ".chunks")


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
                older = " (an older rt: rows keyed by path, not by content)" if version < FORMAT_VERSION else ""
                raise CacheError(
                    f"{self.path}: cache layout version {version}{older}, this rt reads version {FORMAT_VERSION}",
                    "rebuild it with the same `rt extract ...` command plus --overwrite",
                )
            self.identity = BackboneIdentity.from_dict(json.loads(attrs["identity"]))
            self.classes: list[str] = json.loads(attrs["classes"])
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
            self.n = int(f["features"].shape[0])
            self.dim = int(f["features"].shape[1])
            self.labels = f["labels"][:].astype(np.int64)
            self.paths = [p.decode() if isinstance(p, bytes) else str(p) for p in f["paths"][:]]
            self.keys: list[str] = [_s(k) for k in f["keys"][:]]
            self.stages = {k: tuple(v.shape[1:]) for k, v in f["stages"].items()} if "stages" in f else {}
            self.pooled = {k: int(v.shape[1]) for k, v in f["pooled"].items()} if "pooled" in f else {}
            self.pooled_stages: list[str] = json.loads(attrs.get("pooled", "[]"))
            sk = f["skipped"][:] if "skipped" in f else np.zeros((0, 2), dtype=object)
            self.skipped = [(_s(a), _s(b)) for a, b in sk]
            self.skipped_keys: list[str] = [_s(k) for k in f["skipped_keys"][:]]
            self.feature_dtype = str(f["features"].dtype)
            self.precision = str(attrs.get("precision", ""))
            self.last_run: dict[str, Any] = json.loads(attrs.get("last_run", "{}"))
            _check_virtual_sources(f, self.path)
        except CacheError:
            self.close()
            raise
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
            self.close()
            raise CacheError(
                f"{self.path}: cannot read the cache ({type(exc).__name__}: {str(exc)[:150]}); it is truncated, "
                "corrupt or not HDF5",
                "run the same `rt extract` with --overwrite (or delete it and run again)",
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

    def dataset(self, name: str) -> Any:
        """The open h5py dataset ``name`` (e.g. ``"features"``, ``"stages/layer3"``), for block copies."""
        return self._file()[name]

    def file_stats(self) -> dict[str, tuple[tuple[int, int, int], str]]:
        """``path -> ((size, mtime_ns, inode), key)`` recorded for every row and skipped file: a file whose
        stat is unchanged keeps its key without being read again."""
        f = self._file()
        out: dict[str, tuple[tuple[int, int, int], str]] = {}
        for paths, keys, name in (
            (self.paths, self.keys, "stat"),
            ([p for p, _ in self.skipped], self.skipped_keys, "skipped_stat"),
        ):
            stats = f[name][:] if name in f else np.full((len(paths), 3), -1, dtype=np.int64)
            for p, k, st in zip(paths, keys, stats):
                out[p] = ((int(st[0]), int(st[1]), int(st[2])), k)
        return out

    def locations(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Where each row's arrays are stored: chunk file names (relative to :func:`chunk_dir`, ``""`` = this
        file itself, a merged cache), and per row the index into those names and the row in that file."""
        g = self._file()["index"]
        names = [_s(x) for x in g["chunk_files"][:]]
        return names, g["chunk"][:].astype(np.int64), g["row"][:].astype(np.int64)

    def chunk_rows(self) -> dict[str, int]:
        """Rows of each chunk file the index reads (``""``: this file itself)."""
        g = self._file()["index"]
        return {_s(x): int(n) for x, n in zip(g["chunk_files"][:], g["chunk_rows"][:])}

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_virtual(self) -> bool:
        """True when ``/features`` is an HDF5 virtual dataset over other files (a sharded run's cache)."""
        return bool(self._file()["features"].is_virtual)

    @property
    def labelled(self) -> np.ndarray:
        """Indices of labelled rows."""
        return np.flatnonzero(self.labels >= 0)

    def features(
        self,
        rows: Sequence[int] | np.ndarray | None = None,
        stage: str | Sequence[str] | None = None,
        dtype: Any = np.float32,
    ) -> np.ndarray:
        """Pooled features: all rows, or the given ones (in the given order), as ``dtype`` (float32; ``None``:
        as stored, e.g. float16, for tools that convert a block at a time).

        ``stage=None``: the backbone's final pooled features (``/features``); a stage name: that stage's
        globally average-pooled features (``/pooled/<stage>``, stored by ``rt extract --pool-stages``); a
        list of names: their concatenation in that order. Read as whole chunks into one reused buffer and
        converted block by block: no second full-size copy."""
        if stage is not None and not isinstance(stage, str):
            return np.concatenate([self.features(rows, s, dtype) for s in stage], axis=1)
        return self._read_rows(self._file()[self._pooled_name(stage)], rows, dtype)

    def _pooled_name(self, stage: str | None) -> str:
        if stage is None:
            return "features"
        if stage not in self.pooled:
            raise CacheError(
                f"{self.path} holds no pooled {stage!r} features (it has: {', '.join(self.pooled) or 'none'})",
                f"re-extract with `rt extract ... --pool-stages {stage}` (plus --overwrite)",
            )
        return f"pooled/{stage}"

    @staticmethod
    def _read_rows(ds: Any, rows: Sequence[int] | np.ndarray | None, dtype: Any) -> np.ndarray:
        n = ds.shape[0]
        out = np.empty((n if rows is None else len(rows), *ds.shape[1:]), dtype=dtype or ds.dtype)
        if rows is None and out.dtype == ds.dtype:
            if n:
                ds.read_direct(out)
            return out
        idx = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        wanted = idx[order]
        step = FEATURE_CHUNK_ROWS * 4
        buf = np.empty((min(step, n), *ds.shape[1:]), dtype=ds.dtype)
        bounds = np.searchsorted(wanted, np.arange(0, n + step, step))
        for a, b in itertools.pairwise(bounds):
            if a == b:
                continue
            lo, hi = int(wanted[a]), int(wanted[b - 1]) + 1  # the span of this block's wanted rows
            ds.read_direct(buf, np.s_[lo:hi], np.s_[0 : hi - lo])
            out[order[a:b]] = buf[wanted[a:b] - lo]
        return out

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
        from ..base import DataError

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
        if chunk_dir(self.path).is_dir():
            size += sum(p.stat().st_size for p in chunk_dir(self.path).glob("*.h5"))
        return {
            "path": str(self.path),
            "rows": self.n,
            "feature_dim": self.dim,
            "feature_dtype": self.feature_dtype,
            "classes": counts,
            "stages": {k: list(v) for k, v in self.stages.items()},
            "pooled_stages": {k: self.pooled[k] for k in self.pooled_stages},
            "skipped": len(self.skipped),
            "last_run": self.last_run.get("summary"),
            "identity": self.identity.to_dict(),
            "created": self.attrs.get("created"),
            "precision": self.attrs.get("precision"),
            "versions": json.loads(self.attrs.get("versions", "{}")),
            "source": self.attrs.get("source"),
            "root": self.attrs.get("root") or None,
            "root_relative": self.attrs.get("root_relative") or None,
            "size_mb": round(size / 1e6, 2),
        }


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _check_virtual_sources(f: Any, path: Path) -> None:
    """A cache's arrays are virtual datasets over chunk files; a missing chunk file would read as NaN rows, so
    refuse it up front."""
    names = ["features", *(f"stages/{k}" for k in f.get("stages", [])), *(f"pooled/{k}" for k in f.get("pooled", []))]
    for name in names:
        if not f[name].is_virtual:
            continue
        for src in {s.file_name for s in f[name].virtual_sources()}:
            chunk = Path(src)
            chunk = chunk if chunk.is_absolute() else path.parent / chunk
            if not chunk.exists():
                raise CacheError(
                    f"{path}: its chunk file {chunk} is missing (the cache is a virtual dataset over chunk files)",
                    f"keep {chunk.parent.name}/ next to the cache (or make one file with `rt extract ... --merge`), "
                    "or rebuild it with --overwrite",
                )
