"""Zip and tar archives of a class-folder tree (``cat/001.jpg``, optionally under one top folder), read in
place with the standard library's ``zipfile`` and ``tarfile``.

Neither handle is safe to share between threads (a read is a seek then a read of one file position), so:
- a plain ``.tar`` is indexed once (every member's data offset and size, from its headers alone: tarfile seeks
  past the data) and members are read with ``os.pread`` on one descriptor, which threads may share;
- a ``.zip`` and a compressed tar (``.tar.gz``, ``.tgz``) get one handle per decode thread. A compressed tar
  is a stream: its rows stay in archive order, so each thread's reads only go forward (a backward seek
  restarts decompression from the top).
"""

from __future__ import annotations

import os
import tarfile
import threading
from pathlib import Path
from typing import Any

from ..base import DataError
from .reader import IMAGE_EXTENSIONS, Reader, Stat, file_stamp, is_litter


def _is_image(name: str) -> bool:
    parts = name.split("/")
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not any(is_litter(p) for p in parts if p)


def tree_labels(names: list[str]) -> tuple[list[str | None], list[str]]:
    """Class names of archive members laid out as a class-folder tree: the first folder, below one folder
    that holds everything when there is one (``pets/cat/001.jpg``); an image directly at the top is
    unlabelled. Returns the labels and notes."""
    parts = [[p for p in n.split("/") if p and p != "."] for n in names]
    top = {p[0] for p in parts if len(p) >= 2}
    skip = 1 if len(top) == 1 and all(len(p) >= 2 for p in parts) and any(len(p) >= 3 for p in parts) else 0
    labels = [p[skip] if len(p) > skip + 1 else None for p in parts]
    notes = []
    loose = sum(1 for y in labels if y is None)
    if loose and loose < len(labels):
        notes.append(f"{loose} images directly at the archive's top (not in a class folder) are unlabelled")
    return labels, notes


class ZipReader(Reader):
    """A ``.zip`` of a class-folder tree; one ``ZipFile`` per reading thread."""

    kind = "zip"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._local = threading.local()
        self._pid = os.getpid()
        self._info: dict[str, Any] | None = None
        self._stamp: tuple[int, int] | None = None

    def _zip(self) -> Any:
        import zipfile

        if self._pid != os.getpid():  # a forked DataLoader worker: its own handles, never the parent's
            self._local, self._pid = threading.local(), os.getpid()
        zf = getattr(self._local, "zf", None)
        if zf is None:
            try:
                zf = self._local.zf = zipfile.ZipFile(self.root)
            except (OSError, zipfile.BadZipFile) as exc:
                raise DataError(f"{self.root}: not a readable zip archive ({exc})", "check the file") from None
        return zf

    def _index(self) -> dict[str, Any]:
        if self._info is None:
            self._info = {i.filename: i for i in self._zip().infolist() if not i.is_dir()}
            self._stamp = file_stamp(self.root)
        return self._info

    def listing(self) -> tuple[list[str], list[str | None], list[str]]:
        names = [n for n in self._index() if _is_image(n)]
        labels, notes = tree_labels(names)
        return names, labels, notes

    def read(self, name: str) -> bytes:
        return self._zip().read(self._index()[name])

    def stat(self, name: str) -> Stat:
        info = self._index()[name]
        assert self._stamp is not None
        return int(info.file_size), *self._stamp

    def has(self, name: str) -> bool:
        return name in self._index()


def _compressed(path: Path) -> bool:
    return not path.name.lower().endswith(".tar")


class TarIndex:
    """One tar file's regular members: ``name -> TarInfo`` (data offset and size), built from its headers.
    Plain tars are read by ``os.pread``; compressed ones through one ``TarFile`` per thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.compressed = _compressed(self.path)
        self._local = threading.local()
        self._pid = os.getpid()
        self._members: dict[str, tarfile.TarInfo] | None = None
        self._order: list[str] = []
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.stamp: tuple[int, int] = (0, 0)

    def members(self) -> dict[str, tarfile.TarInfo]:
        with self._lock:
            if self._members is None:
                try:
                    with tarfile.open(self.path, "r:*") as tf:
                        found = {m.name: m for m in tf if m.isreg()}
                except (OSError, tarfile.TarError, EOFError) as exc:
                    raise DataError(f"{self.path}: not a readable tar archive ({exc})", "check the file") from None
                self.stamp = file_stamp(self.path)
                self._order = list(found)
                self._members = found
        return self._members

    def names(self) -> list[str]:
        """Member names in archive order."""
        self.members()
        return list(self._order)

    def read(self, name: str) -> bytes:
        info = self.members()[name]
        if not self.compressed:
            if self._fd is None:
                with self._lock:
                    if self._fd is None:
                        self._fd = os.open(self.path, os.O_RDONLY)
            data = os.pread(self._fd, info.size, info.offset_data)
            if len(data) != info.size:
                raise OSError(f"truncated member ({len(data)} of {info.size} bytes)")
            return data
        if self._pid != os.getpid():  # a forked DataLoader worker: its own handles, never the parent's
            self._local, self._pid = threading.local(), os.getpid()
        tf = getattr(self._local, "tf", None)
        if tf is None:
            tf = self._local.tf = tarfile.open(self.path, "r:*")  # noqa: SIM115 (one per thread, kept open)
        fh = tf.extractfile(info)
        assert fh is not None
        return fh.read()

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


class TarReader(Reader):
    """A ``.tar`` / ``.tar.gz`` of a class-folder tree."""

    kind = "tar"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.index = TarIndex(self.root)
        self.sorted_rows = not self.index.compressed

    def listing(self) -> tuple[list[str], list[str | None], list[str]]:
        names = [n for n in self.index.names() if _is_image(n)]
        labels, notes = tree_labels(names)
        return names, labels, notes

    def read(self, name: str) -> bytes:
        return self.index.read(name)

    def stat(self, name: str) -> Stat:
        return int(self.index.members()[name].size), *self.index.stamp

    def has(self, name: str) -> bool:
        return name in self.index.members()


SHARD_ENTRIES = frozenset({"cls", "json"})
PEEK = 64  # members looked at to tell a WebDataset shard from a class-folder tree


def looks_like_shard(path: Path) -> bool:
    """Whether a single tar is a WebDataset shard (members beside their images carry ``cls`` or ``json``
    labels) rather than a class-folder tree."""
    try:
        with tarfile.open(path, "r:*") as tf:
            for i, m in enumerate(tf):
                if i >= PEEK:
                    break
                base = m.name.rsplit("/", 1)[-1]
                if m.isreg() and "." in base and base.split(".", 1)[1].lower() in SHARD_ENTRIES:
                    return True
    except (OSError, tarfile.TarError, EOFError):
        return False  # TarReader says what is wrong with it
    return False
