"""`rt info`: describe a cache or a model directory as plain data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def describe(path: str | Path, list_skipped: bool = False) -> dict[str, Any]:
    """A summary of a cache file or a head/model directory (what `rt info` prints)."""
    from ..base import RtError

    p = Path(path)
    if not p.exists():
        raise RtError(f"{p}: no such file or directory", "give a cache (.h5) or a model directory")
    if p.is_dir():
        from ..head import read_model_dir

        md = read_model_dir(p)
        out: dict[str, Any] = {
            "path": str(p),
            "kind": md.kind,
            "classes": md.classes,
            "head": md.head_config,
            "identity": md.identity.to_dict(),
        }
        if md.meta.get("ood"):  # the out-of-distribution scorer predictions use (head/ood_store.py)
            o = md.meta["ood"]
            out["ood"] = {"scorer": o["scorer"], "threshold": o["threshold"], "scorers": sorted(o["scorers"])}
        report = p / "report.json"
        if report.exists():
            try:
                r = json.loads(report.read_text())
                out["metrics"] = {k: r[k] for k in ("accuracy", "n_val", "seconds") if k in r}
            except (OSError, ValueError):
                out["metrics"] = "report.json unreadable"
        return out
    from ..cache import FeatureCache

    with FeatureCache(p) as cache:
        out = cache.summary()
        if list_skipped:
            out["skipped_files"] = [list(x) for x in cache.skipped]
        elif cache.skipped:
            out["skipped"] = f"{len(cache.skipped)} (list them with --skipped)"
    return out
