"""The review's model of a cache: its rows with their current labels, filters, sorted pages and one row's detail.

Everything a page asks for is computed from arrays of the cache's size (filters and sorts are numpy over
N rows: a few milliseconds at 20,000) plus the row's files; nothing grows with the rows viewed (the only
caches are small, bounded LRUs). Labels change only through :class:`ReviewManifest`.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from ...base import UsageError
from ...head import NO_SCORER_HINT
from .files import ImageFiles
from .findings import KINDS, Findings
from .manifest import EXCLUDED, ReviewManifest, State
from .vectors import Vectors

UNLABELLED, EXCLUDED_ID = -1, -2
PAGE_MAX = 500
SORTS = ("auto", "row", "loss", "confidence", "confidence_asc", "audit")
VERDICTS = ("", "wrong", "uncertain", "right", "unknown")
STATUSES = ("", "changed", "relabelled", "excluded", "unchanged")
NEIGHBOURS = 8
SAMPLE = 64  # rows checked at start for "are the images there?"


@dataclass
class Query:
    """One view of the rows: filters, the sort and the page."""

    cls: str = ""  # a class name, "(unlabelled)", or "" for all
    finding: str = ""  # a finding kind, "any", or ""
    verdict: str = ""
    status: str = ""
    sort: str = "auto"
    offset: int = 0
    limit: int = 120

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Query:
        def num(name: str, default: int) -> int:
            try:
                return int(params.get(name, default))
            except ValueError:
                raise UsageError(f"{name}={params.get(name)!r} is not a number") from None

        q = cls(
            params.get("class", ""),
            params.get("finding", ""),
            params.get("verdict", ""),
            params.get("status", ""),
            params.get("sort", "auto") or "auto",
            max(0, num("offset", 0)),
            min(PAGE_MAX, max(1, num("limit", 120))),
        )
        for value, allowed, name in (
            (q.finding, ("", "any", *KINDS), "finding"),
            (q.verdict, VERDICTS, "verdict"),
            (q.status, STATUSES, "status"),
            (q.sort, SORTS, "sort"),
        ):
            if value not in allowed:
                raise UsageError(f"{name}={value!r} is not one of {', '.join(a or '(none)' for a in allowed)}")
        return q

    def key(self) -> tuple[str, ...]:
        return (self.cls, self.finding, self.verdict, self.status, self.sort)


@dataclass
class Images:
    """One cache's image files and how the page names them (``prefix``: the thumbnail/file routes)."""

    files: ImageFiles
    prefix: str
    where: str  # how the folder was chosen, for the page's "looked in" note
    found: int = 0
    sampled: int = 0

    def thumb(self, path: str, size: str = "s") -> str:
        return f"/{self.prefix}/thumb/{size}/{quote(path, safe='/')}"

    def file(self, path: str) -> str:
        return f"/{self.prefix}/file/{quote(path, safe='/')}"

    def check(self) -> None:
        n = len(self.files.paths)
        rows = np.unique(np.linspace(0, n - 1, min(n, SAMPLE)).astype(np.int64)) if n else []
        self.sampled = len(rows)
        self.found = sum(self.files.exists(int(r)) for r in rows)


@dataclass
class ReviewState:
    """Rows, labels and what is known about them; every public method is what one request needs."""

    name: str
    paths: list[str]
    classes: list[str]
    given: np.ndarray  # (N,) cache label ids into ``classes``, -1 unlabelled
    manifest: ReviewManifest
    images: Images
    vectors: Vectors
    findings: Findings
    uncertain: float = 0.6
    test_images: Images | None = None
    extract_options: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._version = -1
        self._losses: tuple[int, np.ndarray] | None = None
        self._queries: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self.neighbours = functools.lru_cache(maxsize=512)(self._neighbours)
        self._sync()

    # ------------------------------------------------------------------------------------ labels

    def _sync(self) -> None:
        """Current label ids from the manifest (after a change or a reload)."""
        if self._version == self.manifest.version:
            return
        for s in self.manifest.state:
            if s not in (None, EXCLUDED) and s not in self._class_index():
                self.classes.append(s)
        index = self._class_index()
        self.current = np.fromiter(
            (EXCLUDED_ID if s == EXCLUDED else UNLABELLED if s is None else index[s] for s in self.manifest.state),
            dtype=np.int64,
            count=len(self.paths),
        )
        self._head_map = self._head_index()
        self._version = self.manifest.version
        self._queries.clear()

    def _class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def _head_index(self) -> np.ndarray:
        head = self.vectors.head
        if head is None:
            return np.zeros(0, dtype=np.int64)
        hi = {c: i for i, c in enumerate(head.classes)}
        return np.asarray([hi.get(c, -1) for c in self.classes], dtype=np.int64)

    def refresh(self) -> bool:
        """Pick up an outside change of the manifest; True if it was reloaded."""
        changed = self.manifest.check_disk()
        self._sync()
        return changed

    def set_label(self, row: int, label: str | None) -> dict[str, Any]:
        if label is not None and label not in self._class_index():
            raise UsageError(f"{label!r} is not a class of this review ({', '.join(self.classes)})")
        return self._change(self.manifest.set(row, label))

    def set_excluded(self, row: int, excluded: bool) -> dict[str, Any]:
        if not 0 <= row < len(self.paths):
            raise UsageError(f"row {row} is not a row of the cache")
        if excluded:
            target: State = EXCLUDED
        elif self.manifest.state[row] != EXCLUDED:
            target = self.manifest.state[row]  # not excluded: nothing to include
        else:  # back to what it was before (a relabel kept), else to the cache's label
            gid = int(self.given[row])
            known, before = self.manifest.before_exclusion(row)
            target = before if known else self.classes[gid] if gid >= 0 else None
        return self._change(self.manifest.set(row, target))

    def undo(self) -> dict[str, Any]:
        change = self.manifest.undo()
        if change is None:
            self._sync()
            return {"row": None, **self.counters()}
        return self._change(change)

    def _change(self, change: Any) -> dict[str, Any]:
        self._sync()
        return {"row": self.row(change.row), "reloaded": change.reloaded, **self.counters()}

    def counters(self) -> dict[str, Any]:
        m = self.manifest
        return {"pending": m.pending, "can_undo": m.can_undo, "version": m.version}

    # ------------------------------------------------------------------------------------ rows

    def status_of(self, row: int) -> str:
        cur, given = int(self.current[row]), int(self.given[row])
        return "excluded" if cur == EXCLUDED_ID else "unchanged" if cur == given else "relabelled"

    def label_name(self, cid: int) -> str | None:
        return self.classes[cid] if cid >= 0 else None

    def row(self, i: int) -> dict[str, Any]:
        """What a grid tile shows of row ``i``."""
        p = self.paths[i]
        out: dict[str, Any] = {
            "row": i,
            "path": p,
            "label": self.label_name(int(self.current[i])),
            "given": self.label_name(int(self.given[i])),
            "status": self.status_of(i),
            "thumb": self.images.thumb(p),
            "exists": self.images.files.exists(i),
            "badges": self.findings.badges(i),
        }
        head = self.vectors.head
        if head is not None:
            k = int(head.probs[i].argmax())
            out["pred"] = {"label": head.classes[k], "p": round(float(head.probs[i, k]), 4)}
            loss = self._loss()[i]
            out["loss"] = None if np.isnan(loss) else round(float(loss), 4)
            out["wrong"] = bool(out["label"] is not None and out["label"] != head.classes[k])
        return out

    def _loss(self) -> np.ndarray:
        """-log p(current label) per row under the head (NaN: unlabelled, excluded, or a class it lacks);
        computed once per state of the labels."""
        if self._losses is not None and self._losses[0] == self._version:
            return self._losses[1]
        head = self.vectors.head
        assert head is not None
        cur = self.current
        hid = np.where(cur >= 0, self._head_map[np.clip(cur, 0, None)], -1)
        p = head.probs[np.arange(len(cur)), np.clip(hid, 0, None)]
        loss = np.where(hid >= 0, -np.log(np.maximum(p, 1e-12)), np.nan)
        self._losses = (self._version, loss)
        return loss

    def select(self, q: Query) -> np.ndarray:
        """The rows ``q`` shows, in its order (cached per filter set until the labels change)."""
        self._sync()
        key = (*q.key(), self._version)
        hit = self._queries.get(key)
        if hit is not None:
            self._queries.move_to_end(key)
            return hit
        rows = self._filter(q)
        if len(self._queries) >= 8:
            self._queries.popitem(last=False)
        self._queries[key] = rows
        return rows

    def _filter(self, q: Query) -> np.ndarray:
        n = len(self.paths)
        mask = np.ones(n, dtype=bool)
        cur = self.current
        if q.cls == "(unlabelled)":
            mask &= cur == UNLABELLED
        elif q.cls:
            index = self._class_index()
            if q.cls not in index:
                raise UsageError(f"class={q.cls!r} is not a class of this review")
            mask &= cur == index[q.cls]
        if q.status == "excluded":
            mask &= cur == EXCLUDED_ID
        elif q.status == "relabelled":
            mask &= (cur != self.given) & (cur != EXCLUDED_ID)
        elif q.status == "changed":
            mask &= cur != self.given
        elif q.status == "unchanged":
            mask &= cur == self.given
        head = self.vectors.head
        if q.verdict and head is None:
            raise UsageError("the head's verdicts need a head", "start `rt review` with --head DIR (from rt fit-head)")
        if head is not None and q.verdict:
            pred = head.predicted
            hid = np.where(cur >= 0, self._head_map[np.clip(cur, 0, None)], -2)
            if q.verdict == "wrong":
                mask &= (cur >= 0) & (hid != pred)
            elif q.verdict == "right":
                mask &= hid == pred
            elif q.verdict == "unknown":  # unlike the training data (the head's out-of-distribution scorer)
                if head.unknown is None:
                    raise UsageError("verdict=unknown: the head has no out-of-distribution scorer", NO_SCORER_HINT)
                mask &= head.unknown
            else:
                mask &= head.confidence < self.uncertain
        order = self._order(q)
        return order[mask[order]]

    def _order(self, q: Query) -> np.ndarray:
        sort = q.sort
        head = self.vectors.head
        if sort == "auto":
            sort = (
                "audit"
                if q.finding
                else "loss"
                if q.verdict == "wrong" and head is not None
                else "confidence_asc"
                if q.verdict == "uncertain" and head is not None
                else "row"
            )
        if sort == "audit":
            first = self.findings.rows(q.finding or "any")
            if q.finding:
                return first
            rest = np.setdiff1d(np.arange(len(self.paths)), first, assume_unique=True)
            return np.concatenate([first, rest])
        if q.finding:  # a finding filter with another sort: its rows, sorted below
            base = np.sort(self.findings.rows(q.finding))
        else:
            base = np.arange(len(self.paths))
        if sort in ("loss", "confidence", "confidence_asc"):
            if head is None:
                raise UsageError(f"sort={sort} needs a head", "start `rt review` with --head DIR (from rt fit-head)")
            if sort == "loss":
                key = -np.nan_to_num(self._loss()[base], nan=-np.inf)
            else:
                conf = head.confidence[base]
                key = -conf if sort == "confidence" else conf
            return base[np.argsort(key, kind="stable")]
        return base

    def page(self, q: Query) -> dict[str, Any]:
        rows = self.select(q)
        shown = rows[q.offset : q.offset + q.limit]
        return {"total": len(rows), "offset": q.offset, "rows": [self.row(int(i)) for i in shown], **self.counters()}

    # ------------------------------------------------------------------------------------ detail

    def _neighbours(self, row: int) -> tuple[tuple[int, float], ...]:
        return tuple(self.vectors.neighbours(row, NEIGHBOURS))

    def detail(self, i: int) -> dict[str, Any]:
        """The side panel of row ``i``: large image, probabilities, findings with their partners, neighbours."""
        if not 0 <= i < len(self.paths):
            raise UsageError(f"row {i} is not a row of the cache (0..{len(self.paths) - 1})")
        self._sync()
        out = self.row(i)
        out["large"] = self.images.thumb(self.paths[i], "l")
        loc = self.images.files.location(i)
        out["location"] = str(loc) if loc is not None else None
        out["file"] = self.images.file(self.paths[i])
        head = self.vectors.head
        if head is not None:
            order = np.argsort(-head.probs[i], kind="stable")[:10]
            out["probs"] = [{"label": head.classes[k], "p": round(float(head.probs[i, k]), 4)} for k in order]
        out["findings"] = self._findings(i)
        out["neighbours"] = [
            {**self._small(j), "cosine": round(c, 4)}
            for j, c in self.neighbours(i)  # type: ignore[misc]
        ]
        return out

    def _small(self, j: int) -> dict[str, Any]:
        p = self.paths[j]
        return {
            "row": j,
            "path": p,
            "label": self.label_name(int(self.current[j])),
            "thumb": self.images.thumb(p),
            "exists": self.images.files.exists(j),
        }

    def _findings(self, i: int) -> list[dict[str, Any]]:
        out = []
        for kind, items in self.findings.of(i).items():
            for d in items[:3]:
                item = {"kind": kind, **{k: v for k, v in d.items() if k != "row"}}
                if kind == "duplicate" and d.get("row") is not None:
                    item["partner"] = self._small(int(d["row"]))
                if kind == "leak" and self.test_images is not None and d.get("test_path"):
                    tp = str(d["test_path"])
                    item["partner"] = {"path": tp, "thumb": self.test_images.thumb(tp), "label": None, "test": True}
                out.append(item)
        return out

    # ------------------------------------------------------------------------------------ the page's facts

    def info(self) -> dict[str, Any]:
        m = self.manifest
        labels = self.current
        counts = np.bincount(labels[labels >= 0], minlength=len(self.classes)) if len(labels) else []
        head = self.vectors.head
        root = self.images.files.root
        return {
            "name": self.name,
            "rows": len(self.paths),
            "classes": [{"name": c, "count": int(n)} for c, n in zip(self.classes, counts)],
            "unlabelled": int((labels == UNLABELLED).sum()),
            "excluded": int((labels == EXCLUDED_ID).sum()),
            "manifest": str(m.path),
            "outside": m.outside,
            "images": {
                "root": str(root) if root is not None else None,
                "where": self.images.where,
                "found": self.images.found,
                "sampled": self.images.sampled,
            },
            "head": {"path": str(head.path), "classes": head.classes, "uncertain": self.uncertain} if head else None,
            "findings": {"source": self.findings.source, "counts": self.findings.counts()},
            "neighbours": "in memory" if self.vectors.in_memory else "read from the cache per query",
            "notes": [*self.notes, *m.notes, *self.findings.notes],
            "commands": self.commands(),
            **self.counters(),
        }

    def commands(self) -> list[str]:
        """What to run once the labels are fixed."""
        from .commands import loop_commands

        head = self.vectors.head
        m = self.manifest
        return loop_commands(m.path, Path(self.name), self.extract_options, m.outside, head.path if head else None)
