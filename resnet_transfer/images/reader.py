"""What every image source answers (:mod:`sources` picks one): a :class:`Reader` lists its members with their
class names, reads one member's bytes (thread-safe), gives a cheap ``stat`` and a :class:`Member` handle that
:func:`data.load_image` decodes. Also the image-name rules shared by folders and archives.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base import UsageError

Stat = tuple[int, int, int]
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
LITTER = frozenset({"thumbs.db", "desktop.ini", ".ds_store", "__macosx"})


def is_litter(name: str) -> bool:
    """Hidden files and OS litter (``.DS_Store``, ``Thumbs.db``, ``__MACOSX``, AppleDouble ``._x``)."""
    return name.startswith(".") or name.lower() in LITTER


def require(module: str, extra: str, what: str) -> Any:
    """Import ``module`` or raise a :class:`UsageError` naming the optional extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(
            f"{what} needs the {module} package, which is not installed",
            f"pip install 'resnet_transfer[{extra}]'",
        ) from None


@dataclass(frozen=True)
class Member:
    """One image inside a source: what :func:`data.load_image` decodes, what sheets and review show."""

    reader: Any
    name: str

    def read(self) -> bytes:
        return self.reader.read(self.name)

    def exists(self) -> bool:
        return self.reader.has(self.name)

    is_file = exists

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    def __str__(self) -> str:
        return f"{self.reader.root}:{self.name}"


class Reader:
    """The questions every source answers. Subclasses set ``kind`` and implement :meth:`listing`,
    :meth:`read`, :meth:`stat` and :meth:`has`."""

    kind = ""
    sorted_rows = True  # rows by class then name; False: in the source's own order (a compressed stream)

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def listing(self) -> tuple[list[str], list[str | None], list[str]]:
        """Member names, their class names (None: unlabelled) and notes on what was passed over."""
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def stat(self, name: str) -> Stat:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def __reduce__(self) -> Any:
        """Pickled (torchrun ranks, DataLoader workers started by spawn) as "open the same source again": no
        handle, lock or thread-local crosses a process."""
        return (self.__class__.reopen, (str(self.root),))

    @classmethod
    def reopen(cls, root: str) -> Reader:
        return cls(Path(root))

    def member(self, name: str) -> Member:
        return Member(self, name)

    def digest(self, name: str) -> str:
        from ..base import bytes_digest

        return bytes_digest(self.read(name))

    def class_sort(self, names: Iterable[str]) -> list[str]:
        """The order of classes found in the source (sorted; numeric names by value)."""
        found = set(names)
        if found and all(n.isdigit() for n in found):
            return sorted(found, key=int)
        return sorted(found)


def file_stamp(path: Path) -> tuple[int, int]:
    """``(mtime_ns, inode)`` of an archive or data file: unchanged, its members are unchanged."""
    st = os.stat(path)
    return int(st.st_mtime_ns), int(st.st_ino)


def is_pattern(data: str) -> bool:
    return "{" in data and ".." in data and "}" in data
