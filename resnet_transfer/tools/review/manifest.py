"""The review's one output: a ``path,label`` manifest that `rt extract --data` reads, kept by journaled writes.

The manifest lists every row of the cache that is not excluded, in the cache's order, with its current label
(empty = unlabelled); paths are relative to the manifest's folder (``rt extract`` reads them so). Excluded rows
are dropped: a cache row the manifest does not list is excluded. Rows the manifest lists that the cache does not
hold (added by hand, say) are kept as they are.

Every change is written at once:

1. the manifest's file is checked (size, mtime, inode; then its digest): if another process changed it, it is
   read again and becomes the state the change applies to (reloaded, never overwritten);
2. the change is appended to the journal ``<manifest>.journal`` (one JSON line, fsynced) with the digests of
   the manifest before and after it;
3. the new manifest replaces the old one by an atomic rename (:func:`fsutil.atomic_write_text`).

A kill between 2 and 3 leaves the old manifest and a journal line whose "before" digest is the manifest's: the
next start applies that line again. The journal is also the undo history (``u`` in the page, across reloads
and restarts) and holds the lock that keeps a second `rt review` of the same manifest out. Nothing else is
written.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...base import DataError, UsageError, atomic_write_text

EXCLUDED = "\x00excluded"  # a row's state when it is excluded (no CSV label can be this)
State = str | None  # a class name, None (unlabelled) or EXCLUDED
JOURNAL_SUFFIX = ".journal"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _encode(state: State) -> dict[str, Any]:
    return {"excluded": True} if state == EXCLUDED else {"label": state}


def _decode(obj: dict[str, Any]) -> State:
    return EXCLUDED if obj.get("excluded") else obj.get("label")


@dataclass(frozen=True)
class Change:
    """What one write did: the row, its state before and after, and whether the file was reloaded first."""

    row: int
    before: State
    after: State
    reloaded: bool = False
    seq: int = 0


def relative_path(file: Path, folder: Path) -> str:
    """``file`` as the manifest names it: relative to ``folder`` (POSIX separators; ``..`` where outside)."""
    return Path(os.path.relpath(file, folder)).as_posix()


class ReviewManifest:
    """The labels of a cache's rows as the review changed them, mirrored in ``path`` after every change.

    ``paths`` are the cache's row paths (relative to ``root``, the folder the images are in), ``labels``
    their labels in the cache (class names or ``None``). Thread-safe; one instance per manifest file (a
    second process is refused by the journal's lock)."""

    def __init__(self, path: str | Path, root: Path, paths: Sequence[str], labels: Sequence[str | None]) -> None:
        self.path = Path(path).absolute()
        if self.path.suffix.lower() not in (".csv",):
            raise UsageError(f"--manifest {path}: the manifest is a CSV file", "give a name ending in .csv")
        if self.path.is_dir():
            raise UsageError(f"--manifest {path} is a folder", "give a file name such as fixes.csv")
        self.journal_path = self.path.with_name(self.path.name + JOURNAL_SUFFIX)
        self.folder = self.path.parent.resolve()
        self.root = Path(root)
        self._real_root = self.root.resolve()
        self.paths = list(paths)
        self.base: list[State] = list(labels)
        self.state: list[State] = list(labels)
        self.extra: list[tuple[str, str]] = []  # manifest rows that are not cache rows, kept verbatim
        self._rel = [relative_path(self._file(p), self.folder) for p in self.paths]
        self._index: dict[str, int] | None = None
        self._path_index = {q: i for i, q in enumerate(self.paths)}
        self._resolved: dict[str, int] | None = None
        self._lock = threading.RLock()
        self._sig: tuple[int, int, int] | None = None
        self._sha: str | None = None
        self._seq = 0
        self._undo: list[dict[str, Any]] = []
        self.pending = 0
        self.version = 0  # bumped by every change and reload: pages poll it to refresh
        self.notes: list[str] = []
        self._journal_fd: int | None = None
        self._open()

    # ------------------------------------------------------------------------------------------ files

    def _file(self, p: str) -> Path:
        q = Path(p)
        return Path(os.path.normpath(q if q.is_absolute() else self._real_root / q))

    @property
    def outside(self) -> int:
        """How many listed paths lie outside the manifest's folder (`rt extract` then needs --allow-outside)."""
        return sum(r.startswith("../") for r in self._rel)

    def _open(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.journal_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(
                f"--manifest {self.path}: another `rt review` is writing it (its journal {self.journal_path} is locked)",
                "use that review's page, stop it first, or give another --manifest",
            ) from None
        self._journal_fd = fd
        entries = self._read_journal()
        self._seq = max((int(e.get("seq", 0)) for e in entries), default=0)
        self._undo = self._undo_stack(entries)
        if self.path.exists():
            self._load_disk()
            self._recover(entries)
        elif entries:
            self._recover_missing(entries)
        self._recount()

    def close(self) -> None:
        """Release the journal's lock. A review that changed nothing leaves no file behind (its empty
        journal, made for the lock, is removed); otherwise the manifest and its journal stay."""
        if self._journal_fd is not None:
            if os.fstat(self._journal_fd).st_size == 0 and not self.path.exists():
                with contextlib.suppress(OSError):
                    self.journal_path.unlink()
            os.close(self._journal_fd)  # closing the descriptor drops the flock
            self._journal_fd = None

    def _read_journal(self) -> list[dict[str, Any]]:
        try:
            text = self.journal_path.read_text(encoding="utf-8")
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):  # a line cut by a kill mid-append is ignored
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    def _append(self, entry: dict[str, Any]) -> None:
        assert self._journal_fd is not None
        self._seq += 1
        entry = {"seq": self._seq, "time": round(time.time(), 3), **entry}
        os.write(self._journal_fd, (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
        os.fsync(self._journal_fd)
        entry_copy = dict(entry)
        if entry["op"] == "set":
            self._undo.append(entry_copy)
        elif entry["op"] == "undo":
            self._undo = [e for e in self._undo if e["seq"] != entry["of"]]
        elif entry["op"] in ("reload", "reset"):
            self._undo = []

    @staticmethod
    def _undo_stack(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        stack: list[dict[str, Any]] = []
        for e in entries:
            if e.get("op") == "set":
                stack.append(e)
            elif e.get("op") == "undo":
                stack = [s for s in stack if s.get("seq") != e.get("of")]
            elif e.get("op") in ("reload", "reset"):
                stack = []
        return stack

    # ---------------------------------------------------------------------------------- reading the file

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (int(st.st_size), int(st.st_mtime_ns), int(st.st_ino))

    def _load_disk(self) -> None:
        """Take the manifest on disk as the state: listed rows get its label, cache rows it lacks are excluded."""
        sig = self._stat()
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise DataError(
                f"{self.path}: cannot read the manifest ({exc.strerror or exc})", "check its permissions"
            ) from exc
        self._sha, self._sig = _digest(data), sig
        listed = self._parse(data)
        state: list[State] = [EXCLUDED] * len(self.paths)
        extra: list[tuple[str, str]] = []
        for rel, label in listed:
            row = self._row_of(rel)
            if row is None:
                extra.append((rel, label))
            else:
                state[row] = label or None
        self.state, self.extra = state, extra
        if extra:
            self.notes.append(
                f"{self.path}: {len(extra)} row(s) name images that are not in the cache: kept as they are"
            )

    def _parse(self, data: bytes) -> list[tuple[str, str]]:
        """``(path, label)`` rows as `rt extract` reads them (header optional, empty label = unlabelled)."""
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.path}: not UTF-8 ({exc})", "save the manifest as UTF-8 CSV") from exc
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
        if rows and [c.strip().lower() for c in rows[0][:2]] in (["path", "label"], ["path"]):
            rows = rows[1:]
        out = []
        for n, r in enumerate(rows, start=2):
            if len(r) > 2:
                raise DataError(
                    f"{self.path}, row {n}: expected 'path,label', got {len(r)} columns", "quote paths with commas"
                )
            out.append((r[0].strip(), r[1].strip() if len(r) > 1 else ""))
        return out

    def _row_of(self, rel: str) -> int | None:
        """The cache row a manifest path names (as written by us, else after resolving symlinks, as
        `rt extract` does)."""
        if self._index is None:
            self._index = {r: i for i, r in enumerate(self._rel)}
        q = Path(rel).expanduser()
        full = q if q.is_absolute() else self.folder / q
        row = self._index.get(relative_path(Path(os.path.normpath(full)), self.folder))
        if row is not None:
            return row
        if self._resolved is None:
            self._resolved = {str(self._file(p).resolve()): i for i, p in enumerate(self.paths)}
        return self._resolved.get(str(full.resolve()))

    def _recover(self, entries: list[dict[str, Any]]) -> None:
        """Finish a change a kill interrupted (journaled, manifest not yet renamed), or note an outside edit."""
        last = next((e for e in reversed(entries) if e.get("op") in ("set", "undo", "reload", "reset", "write")), None)
        if last is None or last.get("sha") == self._sha:
            return
        row = self._row_of_path(last.get("path"))
        if last.get("op") in ("set", "undo") and last.get("sha_before") == self._sha and row is not None:
            self.state[row] = _decode(last.get("after", {}))
            self._write_file()
            self.notes.append(f"{self.path}: finished the last change a stopped review had journaled")
            return
        self._append({"op": "reload", "sha": self._sha})
        self.notes.append(f"{self.path}: changed since the last review: its rows were read as they are now")

    def _recover_missing(self, entries: list[dict[str, Any]]) -> None:
        """No manifest but a journal: a first change killed before its write (finish it), or a manifest
        deleted by hand (start again from the cache's labels)."""
        last = entries[-1]
        row = self._row_of_path(last.get("path"))
        if last.get("op") == "set" and last.get("sha_before") is None and row is not None:
            self.state[row] = _decode(last.get("after", {}))
            self._write_file()
            self.notes.append(f"{self.path}: finished the first change a stopped review had journaled")
        elif last.get("op") != "reset":
            self._append({"op": "reset", "sha": None})

    def _row_of_path(self, p: Any) -> int | None:
        return self._path_index.get(p) if isinstance(p, str) else None

    def _recount(self) -> None:
        self.pending = sum(s != b for s, b in zip(self.state, self.base))

    # ------------------------------------------------------------------------------------------- writing

    def text(self) -> str:
        """The manifest's CSV text for the current state."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label"])
        for rel, s in zip(self._rel, self.state):
            if s != EXCLUDED:
                w.writerow([rel, s or ""])
        for rel, label in self.extra:
            w.writerow([rel, label])
        return buf.getvalue()

    def _write_file(self, text: str | None = None) -> str:
        data = (text if text is not None else self.text()).encode("utf-8")
        atomic_write_text(self.path, data.decode("utf-8"))
        self._sha, self._sig = _digest(data), self._stat()
        return self._sha

    def check_disk(self) -> bool:
        """Reload the manifest if another process changed it since it was last read or written; True if so."""
        with self._lock:
            sig = self._stat()
            if sig == self._sig:
                return False
            if sig is None:  # deleted: the next change writes it again from the current state
                self._sig = None
                return False
            data = self.path.read_bytes()
            if _digest(data) == self._sha:
                self._sig = sig  # touched, not changed
                return False
            self._load_disk()
            self._append({"op": "reload", "sha": self._sha})
            self._recount()
            self.version += 1
            return True

    def set(self, row: int, state: State) -> Change:
        """Give ``row`` the state ``state`` (a class name, ``None`` or :data:`EXCLUDED`) and write it."""
        with self._lock:
            if not 0 <= row < len(self.paths):
                raise UsageError(f"row {row} is not a row of the cache (0..{len(self.paths) - 1})")
            reloaded = self.check_disk()
            before = self.state[row]
            if before == state:  # no change: nothing written, nothing to undo
                return Change(row, before, state, reloaded, self._seq)
            return self._apply(row, before, state, {"op": "set"}, reloaded)

    def undo(self) -> Change | None:
        """Undo the latest change not undone yet (of any tab, also before a restart); ``None`` if none."""
        with self._lock:
            reloaded = self.check_disk()
            if not self._undo:
                return None
            entry = self._undo[-1]
            row = self._row_of_path(entry.get("path"))
            if row is None:
                self._undo.pop()
                return None
            target = _decode(entry.get("before", {}))
            return self._apply(row, self.state[row], target, {"op": "undo", "of": entry["seq"]}, reloaded)

    def _apply(self, row: int, before: State, after: State, entry: dict[str, Any], reloaded: bool) -> Change:
        sha_before = self._sha if self.path.exists() else None
        self.state[row] = after
        text = self.text()
        sha = _digest(text.encode("utf-8"))
        try:
            self._append(
                {
                    **entry,
                    "path": self.paths[row],
                    "before": _encode(before),
                    "after": _encode(after),
                    "sha_before": sha_before,
                    "sha": sha,
                }
            )
            self._write_file(text)
        except BaseException:
            self.state[row] = before
            raise
        self.pending += (after != self.base[row]) - (before != self.base[row])
        self.version += 1
        return Change(row, before, after, reloaded, self._seq)

    def before_exclusion(self, row: int) -> tuple[bool, State]:
        """``(True, state)``: the state ``row`` had before it was excluded (the latest such change still in
        the history); ``(False, None)`` when the history does not say (an outside edit excluded it)."""
        path = self.paths[row]
        for e in reversed(self._undo):
            if e.get("path") == path and e.get("after", {}).get("excluded"):
                before = _decode(e.get("before", {}))
                if before != EXCLUDED:
                    return True, before
        return False, None

    @property
    def can_undo(self) -> int:
        """How many changes can still be undone."""
        return len(self._undo)
