"""What is known to be odd about each row: `rt audit`'s findings (``audit.json``) and exact copies by content key.

``audit.json`` (written by :func:`resnet_transfer.audit.audit`) names rows by their cache path: likely label
errors (``label_errors.rows``: given, suggested, p_given, p_suggested), duplicates (``duplicates.exact``,
``duplicates.near``: path pairs with their cosine), leakage into the test cache (``duplicates.leakage_exact``,
``leakage_near``: train / test paths) and outliers (``outliers.rows``: lof). Without an audit, exact
duplicates (rows with one content key) and, with ``--test``, exact leaks (a key the test cache holds too)
still come from the caches' keys, which cost nothing to compare.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...base import DataError

KINDS = ("label_error", "duplicate", "leak", "outlier")
TITLES = {"label_error": "label error", "duplicate": "duplicate", "leak": "leak", "outlier": "outlier"}


@dataclass
class Findings:
    """Findings per cache row. ``rank[kind]`` orders the rows of a kind as the audit ranked them."""

    by_kind: dict[str, dict[int, list[dict[str, Any]]]] = field(default_factory=lambda: {k: {} for k in KINDS})
    source: str | None = None  # the audit.json read, if any
    unmatched: int = 0  # findings naming paths this cache does not hold
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, row: int, detail: dict[str, Any]) -> None:
        self.by_kind[kind].setdefault(row, []).append(detail)

    def rows(self, kind: str) -> np.ndarray:
        """Rows with a finding of ``kind`` (``"any"``: of any kind), in the audit's order."""
        if kind == "any":
            seen: dict[int, None] = {}
            for k in KINDS:
                seen.update(dict.fromkeys(self.by_kind[k]))
            return np.fromiter(seen, dtype=np.int64, count=len(seen))
        return np.fromiter(self.by_kind[kind], dtype=np.int64, count=len(self.by_kind[kind]))

    def of(self, row: int) -> dict[str, list[dict[str, Any]]]:
        return {k: self.by_kind[k][row] for k in KINDS if row in self.by_kind[k]}

    def counts(self) -> dict[str, int]:
        return {k: len(self.by_kind[k]) for k in KINDS}

    def badges(self, row: int) -> list[dict[str, str]]:
        """Short tags for a grid tile: ``[{"kind": ..., "text": ...}]``."""
        out = []
        for kind, items in self.of(row).items():
            d = items[0]
            if kind == "label_error":
                text = f"→ {d['suggested']}?"
            elif kind == "duplicate":
                text = "copy" if d.get("exact") else f"near {d.get('cosine', 0):.2f}"
            elif kind == "leak":
                text = "leak" if d.get("exact") else f"leak {d.get('cosine', 0):.2f}"
            else:
                text = f"outlier {d.get('lof', 0):.1f}"
            out.append({"kind": kind, "text": text})
        return out


def read_audit(path: str | Path) -> dict[str, Any]:
    """The report of `rt audit --out DIR` (``DIR`` or ``DIR/audit.json``)."""
    p = Path(path)
    f = p / "audit.json" if p.is_dir() else p
    if not f.is_file():
        raise DataError(f"--audit {path}: no audit.json there", "give the --out folder of `rt audit`")
    try:
        report = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{f}: not readable as JSON ({exc})", "run `rt audit` again") from exc
    if not isinstance(report, dict) or report.get("kind") != "audit":
        raise DataError(f"{f}: not an `rt audit` report", "give the --out folder of `rt audit`")
    return report


def collect(
    paths: Sequence[str],
    keys: Sequence[str],
    audit: dict[str, Any] | None = None,
    test_keys: Sequence[str] | None = None,
    test_paths: Sequence[str] | None = None,
    source: str | None = None,
) -> Findings:
    """The findings of the rows ``paths`` (with content ``keys``): from ``audit`` if given, plus exact copies
    and (with the test cache's keys) exact leaks by content key."""
    out = Findings(source=source)
    index = {p: i for i, p in enumerate(paths)}
    if audit is not None:
        _from_audit(out, audit, index)
    _by_keys(out, paths, keys, test_keys or [], test_paths or [])
    if out.unmatched:
        out.notes.append(
            f"{out.unmatched} finding(s) of {source or 'the audit'} name images this cache does not hold "
            "(an audit of another cache, or of an older state of this one)"
        )
    return out


def _row(out: Findings, index: dict[str, int], path: Any) -> int | None:
    row = index.get(path) if isinstance(path, str) else None
    if row is None:
        out.unmatched += 1
    return row


def _from_audit(out: Findings, audit: dict[str, Any], index: dict[str, int]) -> None:
    for rank, r in enumerate(audit.get("label_errors", {}).get("rows", [])):
        row = _row(out, index, r.get("path"))
        if row is not None:
            keep = ("given", "suggested", "p_given", "p_suggested")
            out.add("label_error", row, {"rank": rank, **{k: r.get(k) for k in keep}})
    d = audit.get("duplicates", {})
    for group in d.get("exact", []):
        rows = [index.get(p) for p in group]
        for p, row in zip(group, rows):
            if row is not None:
                for q in group:
                    if q != p:
                        out.add("duplicate", row, {"path": q, "row": index.get(q), "cosine": 1.0, "exact": True})
    for pair in d.get("near", []):
        a, b = pair.get("a"), pair.get("b")
        for p, q in ((a, b), (b, a)):
            row = _row(out, index, p)
            if row is not None:
                out.add(
                    "duplicate", row, {"path": q, "row": index.get(q), "cosine": pair.get("cosine"), "exact": False}
                )
    for name, exact in (("leakage_exact", True), ("leakage_near", False)):
        for pair in d.get(name, []):
            row = _row(out, index, pair.get("train"))
            if row is not None:
                out.add("leak", row, {"test_path": pair.get("test"), "cosine": pair.get("cosine", 1.0), "exact": exact})
    for rank, r in enumerate(audit.get("outliers", {}).get("rows", [])):
        row = _row(out, index, r.get("path"))
        if row is not None:
            out.add("outlier", row, {"rank": rank, "lof": r.get("lof")})


def _by_keys(
    out: Findings, paths: Sequence[str], keys: Sequence[str], test_keys: Sequence[str], test_paths: Sequence[str]
) -> None:
    by: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        if k:
            by[k].append(i)
    for group in by.values():
        if len(group) < 2:
            continue
        for i in group:
            known = {d.get("path") for d in out.by_kind["duplicate"].get(i, [])}
            for j in group:
                if j != i and paths[j] not in known:
                    out.add("duplicate", i, {"path": paths[j], "row": j, "cosine": 1.0, "exact": True})
    test_by = defaultdict(list)
    for p, k in zip(test_paths, test_keys):
        if k:
            test_by[k].append(p)
    for i, k in enumerate(keys):
        known = {d.get("test_path") for d in out.by_kind["leak"].get(i, [])}
        for p in test_by.get(k, []):
            if p not in known:
                out.add("leak", i, {"test_path": p, "cosine": 1.0, "exact": True})
