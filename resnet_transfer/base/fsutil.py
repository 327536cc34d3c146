"""Files that are either whole or absent: write to a temporary name, fsync, rename over the target.

Every file the package writes (caches, chunks, checkpoints, model directories, reports, exports) goes
through :func:`atomic_path` or one of the ``atomic_write_*`` helpers, so a kill at any moment leaves the
previous file or the new one, never a torn one. A full disk is reported as such (:class:`DiskFullError`).
:class:`FileLock` keeps a second writer of the same output out.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CacheError, RtError


class DiskFullError(RtError):
    """The disk (or quota) filled up while writing; the previous file, if any, is untouched."""


def _is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space" in str(exc))


def disk_full(path: Path, exc: BaseException) -> DiskFullError:
    """The error to raise when writing ``path`` failed with ENOSPC/EDQUOT."""
    return DiskFullError(
        f"disk full while writing {path} ({getattr(exc, 'strerror', None) or exc})",
        "free some space (or write to another disk with --out) and run the same command again; finished work was kept",
    )


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to disk (for files written by libraries that do not fsync: h5py, torch)."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_name(path: Path) -> Path:
    """The temporary sibling a write of ``path`` goes to (hidden, per process, so two writers never share)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block finishes, fsync it and rename it over
    ``path``. On any exception the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _is_disk_full(exc):
            raise disk_full(path, exc) from exc
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (non-JSON values via ``str``)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


DIGEST_BYTES = 16  # blake2b-128: collision odds of ~2^-64 for a billion images
_READ = 1 << 20


def file_digest(path: str | Path) -> str:
    """The content key of a file: blake2b-128 of its bytes, as 32 hex characters.

    Two files with the same bytes have the same key wherever they live, so a cache row, a head's recorded
    split or a label suggestion follows the image's content, not its path."""
    import hashlib

    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            h.update(chunk)
    return h.hexdigest()


def bytes_digest(data: bytes) -> str:
    """The content key of ``data`` (an archive member, a dataset row's image bytes): the same blake2b-128 as
    :func:`file_digest`, so an image packed in a zip or a shard has the key of the file it was made from."""
    import hashlib

    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).hexdigest()


class FileLock:
    """An exclusive, non-blocking ``flock`` on ``<target>.lock``; released when the process dies.

    A second holder gets a :class:`CacheError` naming ``target`` and the pid that holds it."""

    def __init__(self, target: str | Path, what: str = "`rt extract`") -> None:
        target = Path(target)
        self.target = target
        self.what = what
        self.path = target.with_name(target.name + ".lock")
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
                f"{self.target}: another {self.what} (pid {other}) is writing this cache",
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

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def save_png(fig: Any, path: str | Path, dpi: int = 90) -> Path:
    """Lay ``fig`` out and write it to ``path`` as a PNG, atomically (a reader never sees half a file)."""
    out = Path(path)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return out
