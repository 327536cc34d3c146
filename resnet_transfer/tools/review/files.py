"""Which image files the review server may read: those a cache lists, inside the folder its images are in.

A request names an image by the path the cache records for it (``cat/001.jpg``). It is served only when
that exact path is a row of the cache (or of the ``--test`` cache), has an image extension, and its real
location (symlinks followed) is a regular file inside the real image folder. Anything else (``..``,
absolute paths, a symlink pointing out of the folder, a path the cache does not list) is "not found": the
server says 404 without telling which rule refused it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...images import IMAGE_EXTENSIONS


def unsafe_segment(path: str) -> bool:
    """True for a request path that could step out of a folder: empty, absolute, ``.``/``..`` segments,
    backslashes, NUL or control characters, a drive letter."""
    if not path or path.startswith("/") or "\\" in path or any(ord(c) < 32 for c in path):
        return True
    parts = path.split("/")
    return any(p in ("", ".", "..") for p in parts) or (len(parts[0]) == 2 and parts[0][1] == ":")


class ImageFiles:
    """The files of one cache's rows under ``root`` (``None``: the folder is not known, nothing is served)."""

    def __init__(self, root: Path | None, paths: Sequence[str], reader: Any = None) -> None:
        self.reader = reader  # a source's reader (images.sources): rows are its members, served from it
        self.root = Path(root) if root is not None else None
        self.real_root = Path(os.path.realpath(self.root)) if self.root is not None else None
        self.paths = list(paths)
        self._rows = {p: i for i, p in enumerate(self.paths)}

    def row_of(self, path: str) -> int | None:
        """The row whose recorded path is exactly ``path`` (``None`` if the cache lists no such row)."""
        if unsafe_segment(path) and not os.path.isabs(path):
            return None
        return self._rows.get(path)

    def location(self, row: int) -> Any:
        """Where row ``row``'s file should be (not checked); ``None`` without a root; a member of the source
        when the cache was extracted from one."""
        if self.reader is not None:
            return self.reader.member(self.paths[row])
        if self.root is None:
            return None
        p = Path(self.paths[row])
        return p if p.is_absolute() else self.root / p

    def exists(self, row: int) -> bool:
        loc = self.location(row)
        return loc is not None and loc.is_file()

    def servable(self, row: int) -> Any:
        """The real file of ``row`` if it may be served: an image extension, a regular file, inside the real
        root (a symlink out of it is refused); a member the source holds; else ``None``."""
        loc = self.location(row)
        if self.reader is not None:
            return loc if loc.exists() else None
        if loc is None or self.real_root is None or loc.suffix.lower() not in IMAGE_EXTENSIONS:
            return None
        real = Path(os.path.realpath(loc))
        try:
            real.relative_to(self.real_root)
        except ValueError:
            return None
        return real if real.is_file() else None

    def servable_path(self, path: str) -> Any:
        """:meth:`servable` of the row recorded as ``path``; ``None`` when there is none."""
        row = self.row_of(path)
        return None if row is None else self.servable(row)
