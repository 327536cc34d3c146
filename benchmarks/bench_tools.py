"""The cache tools as the training rows grow: time, peak memory and growth exponent per tool, exact and
index neighbour search side by side.

For each ``--rows`` count, ``tests/planted.py`` writes (through the project's cache writer) a float16
training cache with planted duplicates, near copies, flipped labels and outliers, a test cache of
``--test-rows`` (with leaks of training rows) and an unlabelled pool of the same size; each measurement is
a fresh process (``tune_process()`` as `rt` does, then the library call) whose peak resident set is the
kernel's high-water mark (``wait4``). Tools: ``audit`` (with --test), ``fit-head`` (its kNN beside the head
reported apart), ``evaluate`` (the kNN beside the head on the test cache), ``suggest`` (50 of the pool)
and ``curve`` (--k 5,20,100 --seeds 5). The growth exponent is the least-squares slope of log(seconds) on
log(rows): 1 is linear, 2 quadratic. Caches live under ``--workdir`` (a temporary folder by default) and
are deleted at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, command_line, emit, fmt, machine_info, run_child

PATHS = ("exact", "index")
TOOLS = ("audit", "fit-head", "evaluate", "suggest", "curve")

CHILD = """
from resnet_transfer.base import tune_process
tune_process()
import time
from pathlib import Path
A = ARGS
t = time.perf_counter()
extra = {}
if A["tool"] == "audit":
    from resnet_transfer.tools import AuditConfig, audit
    r = audit(AuditConfig(Path(A["train"]), Path(A["test"]), Path(A["out"]), sheet=False, search=A["path"])).report
    extra = {"stages": r["seconds"], "train_search": r["neighbours"]["train"], "found": {
        "near": len(r["duplicates"]["near"]), "leaks": len(r["duplicates"]["leakage_exact"]),
        "near_leaks": len(r["duplicates"]["leakage_near"]), "flagged": r["label_errors"].get("flagged")}}
elif A["tool"] == "fit-head":
    from resnet_transfer.head import FitHeadConfig, fit_head
    r = fit_head(FitHeadConfig(Path(A["train"]), Path(A["out"]), overwrite=True, plot=False,
                               knn_search=A["path"])).report
    extra = {"knn_search": r["knn"].get("search"), "knn_skipped": r["knn"].get("skipped")}
elif A["tool"] == "evaluate":
    from resnet_transfer.models import EvaluateConfig, evaluate
    r = evaluate(EvaluateConfig(A["head"], cache=A["test"], knn_search=A["path"])).report
    extra = {"knn_search": r["knn"].get("search"), "knn_skipped": r["knn"].get("skipped")}
elif A["tool"] == "suggest":
    from resnet_transfer.tools import SuggestConfig, suggest
    suggest(SuggestConfig(Path(A["head"]), Path(A["pool"]), Path(A["out"]) / "to-label.csv", n=50, sheet=False,
                          root=Path(A["out"])))
else:
    from resnet_transfer.tools import CurveConfig, curve
    curve(CurveConfig(Path(A["train"]), Path(A["test"]), ks=(5, 20, 100), seeds=5, out=Path(A["out"]), plot=False,
                      knn_search=A["path"]))
print(json.dumps({"seconds": time.perf_counter() - t, **extra}))
"""


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks tools", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="10000,30000,100000", help="training rows per size, comma-separated")
    p.add_argument("--quick", action="store_true", help="--rows 2000,4000 --test-rows 500: a smoke test")
    p.add_argument("--test-rows", type=int, default=4000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--classes", type=int, default=37)
    p.add_argument("--paths", default="exact,index", help="neighbour searches to measure (exact, index)")
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--workdir", type=Path, default=None, help="where the caches go (default: a temp folder)")
    return p.parse_args(argv)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(ys) on log(xs) (NaN for fewer than two points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else float("nan")


def _measure(tool: str, path: str, files: dict[str, str], out: Path) -> dict[str, Any]:
    args = {"tool": tool, "path": path, "out": str(out), **files}
    t0 = time.perf_counter()
    res = run_child(CHILD, args, env={"OMP_WAIT_POLICY": "PASSIVE"}, timeout=3600)
    res["wall_seconds"] = round(time.perf_counter() - t0, 2)  # the whole process: start-up and imports too
    res["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return res


def _one_size(rows: int, args: argparse.Namespace, work: Path, tools: list[str], paths: list[str]) -> list[dict]:
    sys.path.insert(0, str(REPO / "tests"))
    from planted import write_planted

    sets = write_planted(work / f"rows-{rows}", rows, args.test_rows, rows, args.classes, args.dim)
    files = {"train": str(sets.train), "test": str(sets.test), "pool": str(sets.pool), "head": str(work / "head")}
    results = []
    # the head that evaluate and suggest use: fitted once per size (the fit-head figures are measured below)
    _measure("fit-head", "index" if "index" in paths else "exact", {**files}, work / "head")
    for tool in tools:
        for path in paths if tool != "suggest" else ["-"]:
            res = _measure(tool, path if path != "-" else "auto", files, work / f"out-{tool}-{path}-{rows}")
            results.append({"tool": tool, "path": path, "rows": rows, **res})
            print(
                f"  {tool:9s} {path:5s} {rows:>7,} rows: {fmt(res['seconds'])} s ({fmt(res['wall_seconds'])} s with "
                f"start-up), {fmt(res['max_rss_mb'], 0)} MB "
                f"(load {res['load_avg_1m']})",
                file=sys.stderr,
                flush=True,
            )
    shutil.rmtree(work / f"rows-{rows}", ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    rows = [2000, 4000] if args.quick else [int(x) for x in args.rows.split(",") if x]
    if args.quick:
        args.test_rows = 500
    tools = [t for t in args.tools.split(",") if t]
    paths = [p for p in args.paths.split(",") if p]
    tmp = tempfile.mkdtemp(prefix="rt-bench-tools-")
    work = Path(args.workdir or tmp)
    try:
        results = [r for n in rows for r in _one_size(n, args, work, tools, paths)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    growth = {}
    for tool in tools:
        for path in paths if tool != "suggest" else ["-"]:
            pts = [r for r in results if r["tool"] == tool and r["path"] == path]
            growth[f"{tool}/{path}"] = slope([r["rows"] for r in pts], [r["seconds"] for r in pts])
    lines = [f"{'tool':9s} {'path':5s} " + " ".join(f"{n:>16,}" for n in rows) + "  exponent"]
    for key, g in growth.items():
        tool, path = key.split("/")
        cells = []
        for n in rows:
            r = next((r for r in results if r["tool"] == tool and r["path"] == path and r["rows"] == n), None)
            cells.append(f"{fmt(r['seconds']):>7s} s {fmt(r['max_rss_mb'], 0):>5s} MB" if r else " " * 16)
        lines.append(f"{tool:9s} {path:5s} " + " ".join(cells) + f"  {fmt(g, 2):>8s}")
    lines.append(
        f"test rows {args.test_rows}, {args.dim} float16 features, {args.classes} classes; load per row in JSON"
    )
    result = {
        "bench": "tools",
        "figures": {"growth_exponent": growth},
        "raw": results,
        "config": {"rows": rows, "test_rows": args.test_rows, "dim": args.dim, "classes": args.classes},
        "machine": machine_info(),
        "command": command_line("tools", argv),
    }
    return emit(result, lines)


if __name__ == "__main__":
    main()
