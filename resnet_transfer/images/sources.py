"""Where images live besides a folder: one reader per source, all answering the same few questions.

A :class:`Reader` is a zip or tar of a class-folder tree (:mod:`archives`), WebDataset shards (:mod:`shards`),
or a Hugging Face dataset saved with ``save_to_disk`` or Parquet files (:mod:`hfdata`). It lists its images
as an :class:`ImageList` whose ``root`` is the archive (or the dataset's folder) and whose ``paths`` are
member names (``cat/001.jpg``, ``train-003.tar/000017.jpg``, ``train.parquet/00000017``); it reads one
member's bytes (``read``: thread-safe, so the decode threads read members side by side), gives a cheap
``stat`` (a changed one means "read it again for its key"), and a :class:`Member` handle that
:func:`data.load_image` decodes. Nothing is unpacked to disk and no source is held whole in memory.

:func:`detect` decides, from ``--data`` alone, which reader (if any) a path needs; :func:`open_source`
opens one again from what a cache records (its ``source`` and ``root`` attributes), for the tools that show
a cache's images (review, audit, sheets).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..base import UsageError
from .reader import IMAGE_EXTENSIONS, Reader, is_pattern

SOURCE_KINDS = ("zip", "tar", "wds", "hf", "parquet")


def detect(data: str | Path) -> str | None:
    """The kind of source ``--data`` names (one of :data:`SOURCE_KINDS`), or None for a folder, a manifest or
    an image file (what :func:`data.list_images` reads itself)."""
    text = os.fspath(data)
    if is_pattern(text):
        return "wds"
    p = Path(text).expanduser()
    name = p.name.lower()
    if p.is_file():
        if name.endswith(".zip"):
            return "zip"
        if name.endswith((".tar", ".tar.gz", ".tgz")):
            from .archives import looks_like_shard

            return "wds" if looks_like_shard(p) else "tar"
        if name.endswith(".parquet"):
            return "parquet"
        return None
    if not p.is_dir():
        return None
    if (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()):
        return "hf"
    entries = [e for e in os.scandir(p) if not e.name.startswith(".")]
    if any(e.is_dir() for e in entries):
        return None
    files = [e.name.lower() for e in entries if e.is_file()]
    if any(Path(f).suffix in IMAGE_EXTENSIONS for f in files):
        return None  # a folder of loose images, whatever else lies beside them
    if any(f.endswith(".parquet") for f in files):
        return "parquet"
    if any(f.endswith((".tar", ".tar.gz", ".tgz")) for f in files):
        return "wds"
    return None


def open_source(kind: str, data: str | Path) -> Reader:
    """The reader of ``kind`` for ``data`` (what ``--data`` named, or the root a cache records)."""
    if kind in ("zip", "tar"):
        from .archives import TarReader, ZipReader

        return ZipReader(Path(data)) if kind == "zip" else TarReader(Path(data))
    if kind == "wds":
        from .shards import ShardReader

        return ShardReader.open(data)
    if kind in ("hf", "parquet"):
        from .hfdata import HfReader, ParquetReader

        return HfReader.open(Path(data)) if kind == "hf" else ParquetReader.open(Path(data))
    raise UsageError(f"unknown image source {kind!r}", f"one of {', '.join(SOURCE_KINDS)}")
