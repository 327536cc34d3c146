"""What an `rt extract` run has to do, decided before any forward pass: the plan.

Each listed image gets its content key (``fsutil.file_digest``), unless its file's size, mtime_ns and inode
are those recorded in the cache with its key (the stat check: a no-op run reads no image). A key whose
arrays are stored (in the cache or in finished chunk files of an interrupted run) is reused wherever the
image now lives and whatever its label; a key recorded as unreadable is not retried; every other key is
computed once, however many paths share it. Rows keep their order: the cache's rows that still exist, then
new paths in listing order. A cache extracted from another folder than this run's root (a manifest beside
the image folder) has its paths rebased first (:func:`rebase`), so the same file is the same row. :func:`changes`
compares two states of a cache in one line (``added 3, changed 1, removed 2, relabelled 1, moved 0,
unchanged 412``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .writer import Row, SkippedFile, Stat

CHANGE_FIELDS = ("added", "changed", "removed", "relabelled", "moved", "unchanged")


@dataclass
class Plan:
    """The rows a run will leave (``paths`` in order, with labels, keys and stats), which of them need a
    forward pass (``compute``: one listing index per new key), and what is already known unreadable."""

    images: Any  # the ImageList, classes in the cache's order
    order: list[int]  # listing indices in the order of the new cache's rows/skips
    keys: list[str]  # per listing index
    stats: list[Stat]
    compute: list[int]  # listing indices to forward (first path of each new key)
    unreadable: dict[int, str] = field(default_factory=dict)  # listing index -> reason (stat/read failed)
    hashed: int = 0  # files read to take their key (the rest passed the stat check)

    def todo(self) -> tuple[Any, list[str]]:
        """The images to compute (an ImageList) and their keys."""
        return self.images.subset(self.compute), [self.keys[i] for i in self.compute]

    def result(self, known: set[str], skips: dict[str, str]) -> tuple[list[Row], list[SkippedFile]]:
        """The new cache's rows and skipped files once every key to compute is either ``known`` (stored)
        or in ``skips``. A key in neither stays out (a lost chunk: the writer reports it)."""
        rows: list[Row] = []
        skipped: list[SkippedFile] = []
        im = self.images
        for i in self.order:
            path, key, stat = im.paths[i], self.keys[i], self.stats[i]
            if i in self.unreadable:
                skipped.append(SkippedFile(path, self.unreadable[i], key, stat))
            elif key in known:
                rows.append(Row(path, int(im.labels[i]), key, stat))
            elif key in skips:
                skipped.append(SkippedFile(path, skips[key], key, stat))
            else:
                rows.append(Row(path, int(im.labels[i]), key, stat))  # reported as lost by the writer
        return rows, skipped


def take_keys(images: Any, recorded: dict[str, tuple[Stat, str]]) -> tuple[list[str], list[Stat], dict[int, str], int]:
    """Content keys of the listed images: the recorded key where the stat is unchanged (a file's size,
    mtime_ns and inode; a member's size and its archive's mtime_ns and inode), else a digest of the bytes
    (:meth:`ImageList.digest`: the same key for a file and a member with its bytes). Returns keys, stats,
    unreadable images (index -> reason), images read for their key."""
    keys: list[str] = []
    stats: list[Stat] = []
    bad: dict[int, str] = {}
    hashed = 0
    for i, p in enumerate(images.paths):
        try:
            stat = images.stat(i)
            rec = recorded.get(p)
            if rec is not None and rec[0] == stat:
                key = rec[1]
            else:
                key = images.digest(i)
                hashed += 1
        except OSError as exc:
            bad[i] = f"cannot read the file ({exc.strerror or exc})"
            stat, key = (-1, -1, -1), ""
        keys.append(key)
        stats.append(stat)
    return keys, stats, bad, hashed


def make_plan(
    images: Any,
    old_paths: Sequence[str],
    recorded: dict[str, tuple[Stat, str]],
    known: set[str],
    skips: dict[str, str],
) -> Plan:
    """The plan for ``images`` given the cache's row paths (``old_paths``, in order), its recorded stats and
    keys, the keys whose arrays are stored (``known``) and the keys known unreadable (``skips``)."""
    keys, stats, bad, hashed = take_keys(images, recorded)
    index = {p: i for i, p in enumerate(images.paths)}
    order = [index[p] for p in old_paths if p in index]
    placed = set(order)
    order += [i for i in range(len(images.paths)) if i not in placed]
    compute: list[int] = []
    seen: set[str] = set()
    for i in order:
        k = keys[i]
        if i in bad or k in known or k in skips or k in seen:
            continue
        seen.add(k)
        compute.append(i)
    return Plan(images, order, keys, stats, compute, bad, hashed)


def changes(old: Sequence[tuple[str, str, str | None]], new: Sequence[tuple[str, str, str | None]]) -> dict[str, int]:
    """Counts of what changed between two lists of ``(path, key, class name or None)`` rows (paths as the
    same root names them: :func:`rebase`). A changed label counts as relabelled whatever else changed; else
    a path kept with the same key is unchanged, with another key changed; a new path whose key left another
    (gone) path is moved, else added; a gone path not moved is removed."""
    before = {p: (k, c) for p, k, c in old}
    after = {p: (k, c) for p, k, c in new}
    out = dict.fromkeys(CHANGE_FIELDS, 0)
    for p, (k, c) in after.items():
        if p in before:
            k0, c0 = before[p]
            out["relabelled" if c0 != c else "unchanged" if k0 == k else "changed"] += 1
    gone: dict[str, list[str | None]] = {}
    for p, (k, c) in before.items():
        if p not in after:
            gone.setdefault(k, []).append(c)
    for p, (k, c) in after.items():
        if p not in before:
            labels = gone.get(k)
            if not labels:
                out["added"] += 1
                continue
            was = labels.pop(labels.index(c) if c in labels else 0)
            out["moved" if was == c else "relabelled"] += 1
    out["removed"] = sum(len(v) for v in gone.values())
    return out


def rebase(paths: Sequence[str], old_root: str | Path | None, new_root: str | Path | None) -> list[str]:
    """A cache's row ``paths`` (relative to ``old_root``, the folder it was extracted from) as a listing
    relative to ``new_root`` names the same files: a manifest beside the image folder names ``cat/1.jpg`` as
    ``pets/cat/1.jpg``, and it is the same file, not a moved one. A path outside ``new_root`` becomes
    absolute (as ``--allow-outside`` lists it); with either root unknown, or the same, ``paths`` as they are."""
    if old_root is None or new_root is None:
        return list(paths)
    old, new = Path(old_root).resolve(), Path(new_root).resolve()
    if old == new:
        return list(paths)
    out = []
    for p in paths:
        full = Path(os.path.normpath(p if os.path.isabs(p) else old / p))
        try:
            out.append(full.relative_to(new).as_posix())
        except ValueError:
            out.append(full.as_posix())
    return out


def change_line(counts: dict[str, int], skipped: int = 0) -> str:
    """``added 3, changed 1, removed 2, relabelled 1, moved 0, unchanged 412`` (``, skipped N`` if any)."""
    line = ", ".join(f"{k} {counts.get(k, 0)}" for k in CHANGE_FIELDS)
    return line + (f", skipped {skipped}" if skipped else "")


def row_names(
    paths: Sequence[str], keys: Sequence[str], labels: Sequence[int], classes: Sequence[str]
) -> list[tuple[str, str, str | None]]:
    """``(path, key, class name or None)`` per row, for :func:`changes`."""
    return [(p, k, classes[y] if y >= 0 else None) for p, k, y in zip(paths, keys, labels)]
