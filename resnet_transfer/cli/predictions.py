"""How `rt predict` prints its rows: JSON, CSV or a table (a `prediction` column where --min-confidence or
--reject-unknown can change it; `ood_score` and `unknown` as the last columns where the head has an
out-of-distribution scorer, so the columns before them stay where they were)."""

from __future__ import annotations

import sys
from typing import Any

from . import common


def print_predictions(res: Any, fmt: str, top: int, marked: bool) -> None:
    """``fmt``: json | csv | table. ``marked``: a ``prediction`` column (the class, `uncertain` or `unknown`)."""
    scored = any("ood_score" in r for r in res.rows)
    if fmt == "json":
        common.echo_json(
            {
                "classes": res.classes,
                "predictions": [{**r, "top": [{"class": c, "probability": p} for c, p in r["top"]]} for r in res.rows],
                "skipped": [{"path": p, "reason": why} for p, why in res.skipped],
            }
        )
    elif fmt == "csv":
        import csv

        w = csv.writer(sys.stdout)
        k = max((len(r["top"]) for r in res.rows), default=0)
        pcol = ["prediction"] if marked else []
        ocol = ["ood_score", "unknown"] if scored else []
        w.writerow(["path", *pcol] + [x for i in range(1, k + 1) for x in (f"class_{i}", f"probability_{i}")] + ocol)
        for r in res.rows:
            pval = [r["prediction"]] if marked else []
            oval = [f"{r['ood_score']:.6g}", str(r["unknown"]).lower()] if "ood_score" in r else []
            w.writerow([r["path"], *pval] + [x for c, p in r["top"] for x in (c, f"{p:.6f}")] + oval)
    else:
        from ..base import print_table

        ocol = ["ood score", "unknown"] if scored else []
        columns = ["image", *(["prediction"] if marked else [])]
        columns += [f"#{i + 1}" for i in range(min(top, len(res.classes)))] + ocol
        rows = [
            [
                r["path"],
                *([r["prediction"]] if marked else []),
                *[f"{c} {p:.3f}" for c, p in r["top"]],
                *([f"{r['ood_score']:.4g}", "yes" if r["unknown"] else "no"] if "ood_score" in r else []),
            ]
            for r in res.rows
        ]
        print_table(columns, rows, title=f"{len(res.rows)} image(s)")
