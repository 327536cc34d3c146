"""WebDataset shards: a brace pattern (``train-{000..099}.tar``), a folder of ``.tar`` files, or one shard.

A sample is the group of members that share a key (webdataset's own rule, ``webdataset.tariterators
.base_plus_ext``: the name up to the first dot of its base name); its image is the ``jpg``, ``jpeg``,
``png`` or ``webp`` entry (another image extension if none of those), its label the ``cls`` entry (a class
index or name) or the ``label`` field of its ``json`` entry. The pattern is expanded by webdataset's
``expand_urls`` (braces and ``::``-joined lists).

Why tarfile and not ``webdataset.WebDataset`` for the reading: WebDataset is a stream (an
``IterableDataset`` that yields samples in shard order and hands out each member's bytes once), while the
cache needs, before any decoding, every sample's key and label to plan what to compute, and then the decode
threads to fetch only the members of new content, by name, side by side. So the shards are indexed from their
tar headers (no image bytes read), labels read from their small ``cls``/``json`` members, and images read
with ``os.pread`` at the recorded offsets (:class:`archives.TarIndex`): a second run reads nothing but
headers, and a new shard costs only its own members.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..base import DataError
from .archives import TarIndex
from .reader import IMAGE_EXTENSIONS, Reader, Stat, is_pattern, require

IMAGE_ENTRIES = ("jpg", "jpeg", "png", "webp")
_SHARD = re.compile(r"^(.*?\.(?:tar|tar\.gz|tgz))/(.+)$", re.IGNORECASE)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class ShardReader(Reader):
    """WebDataset shards under ``root``; paths are ``<shard relative to root>/<image member>``."""

    kind = "wds"

    def __init__(self, root: Path, shards: list[Path] | None = None) -> None:
        super().__init__(root)
        self.wds = require("webdataset", "wds", "reading WebDataset shards")
        self.shards = shards
        self._index: dict[str, TarIndex] = {}

    @classmethod
    def reopen(cls, root: str) -> ShardReader:
        return cls.open(Path(root))

    @classmethod
    def open(cls, data: str | os.PathLike[str]) -> ShardReader:
        """Shards named by a brace pattern, a folder of shards, or one shard file."""
        text = os.fspath(data)
        if is_pattern(text):
            wds = require("webdataset", "wds", "reading WebDataset shards")
            shards = [Path(u).expanduser() for u in wds.shardlists.expand_urls(text)]
            missing = [s for s in shards if not s.is_file()]
            if missing:
                raise DataError(
                    f"--data {text}: {len(missing)} of {len(shards)} shards are missing ({missing[0]}, ...)",
                    "check the pattern (e.g. train-{000..099}.tar) against the files",
                )
            root = Path(os.path.commonpath([str(s.resolve().parent) for s in shards]))
            return cls(root, [s.resolve() for s in shards])
        p = Path(text).expanduser()
        if p.is_file():
            return cls(p.resolve().parent, [p.resolve()])
        return cls(p)

    def shard_files(self) -> list[Path]:
        if self.shards is None:
            self.shards = sorted(
                q for q in self.root.iterdir() if q.is_file() and q.name.lower().endswith(TAR_SUFFIXES)
            )
        return self.shards

    def _tar(self, rel: str) -> TarIndex:
        idx = self._index.get(rel)
        if idx is None:
            idx = self._index.setdefault(rel, TarIndex(self.root / rel))
        return idx

    def listing(self) -> tuple[list[str], list[str | None], list[str]]:
        names: list[str] = []
        labels: list[str | None] = []
        no_image = 0
        for shard in self.shard_files():
            rel = shard.relative_to(self.root).as_posix()
            tar = self._tar(rel)
            for sample in self._samples(tar.names()).values():
                image = _image_entry(sample)
                if image is None:
                    no_image += 1
                    continue
                names.append(f"{rel}/{image}")
                labels.append(self._label(tar, sample))
        notes = [f"{no_image} samples without an image entry (jpg, jpeg, png, webp) ignored"] if no_image else []
        return names, labels, notes

    def _samples(self, members: list[str]) -> dict[str, dict[str, str]]:
        """``key -> {extension (lower case): member name}``, in shard order (webdataset's grouping rule)."""
        split = self.wds.tariterators.base_plus_ext
        out: dict[str, dict[str, str]] = {}
        for name in members:
            key, ext = split(name)
            if key is None or os.path.basename(key).startswith("."):
                continue
            out.setdefault(key, {})[ext.lower()] = name
        return out

    def _label(self, tar: TarIndex, sample: dict[str, str]) -> str | None:
        try:
            if "cls" in sample:
                text = tar.read(sample["cls"]).decode("utf-8").strip()
                return text or None
            if "json" in sample:
                value = json.loads(tar.read(sample["json"]).decode("utf-8")).get("label")
                return None if value is None else str(value)
        except (OSError, ValueError, AttributeError) as exc:
            raise DataError(
                f"{tar.path}: the label of {sample.get('cls') or sample.get('json')} cannot be read ({exc})",
                "a cls entry holds a class index or name; a json entry an object with a 'label' field",
            ) from None
        return None

    def split(self, name: str) -> tuple[TarIndex, str]:
        m = _SHARD.match(name)
        if m is None:
            raise KeyError(name)
        return self._tar(m.group(1)), m.group(2)

    def read(self, name: str) -> bytes:
        tar, member = self.split(name)
        return tar.read(member)

    def stat(self, name: str) -> Stat:
        tar, member = self.split(name)
        return int(tar.members()[member].size), *tar.stamp

    def has(self, name: str) -> bool:
        try:
            tar, member = self.split(name)
            return tar.path.is_file() and member in tar.members()
        except (KeyError, DataError):
            return False


def _image_entry(sample: dict[str, str]) -> Any:
    for ext in IMAGE_ENTRIES:
        if ext in sample:
            return sample[ext]
    for ext, name in sample.items():
        if f".{ext}" in IMAGE_EXTENSIONS:
            return name
    return None
