"""`rt extract` on a host seen for the first time: fresh speed records and an empty inductor cache, then
``--runs`` whole-process runs of `rt extract --compile auto` on the same photos, with the pipeline bound
(:mod:`benchmarks.pipeline_bound`) taken before the first run and after the last, so the load's drift shows.

    python -m benchmarks first_runs [--images 2000] [--runs 3] [--model resnet50]

Printed per run: wall seconds, img/s, what `--compile auto` said (the first run measures the compiled forward
where the job could repay it, the later ones decide from the records), the load; then each run's img/s over
the bound (library compiled forward) taken before and after; and where the fixed part of each run goes, from
the moment each of rt's log lines reached this process: ``setup`` (spawn to the "extracting ..." line:
interpreter, imports, model build, listing), ``loop`` (rt's own "extract: N img in" seconds, the compile or
package load included), ``compile_or_load`` (what rt recorded for it: a cold/warm compile or the load of
the compiled package kept on disk), ``finalize`` (the loop's end to the process's exit: HDF5 finalize,
exit), ``early`` (images the child decoded while the model was being built and the feed took:
``images.early_crops``; runs after the first recall the transform).

``--ab N`` then runs N pairs of the same command without and with that early start (the recalled transform
removed before the "without" run), in alternating order, so that the load falls on both alike; it prints
their medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, command_line, emit, fmt, machine_info, make_photo_jpegs, ratio, run_child
from benchmarks.pipeline_bound import BOUND, bound_figures, process_argv


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks first_runs")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--rounds", type=int, default=3, help="bound: rounds of the forward-only paths")
    ap.add_argument("--ab", type=int, default=0, help="then N pairs of runs without / with the early start")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rt-bench-first-") as tmp:
        work = Path(tmp)
        photos = make_photo_jpegs(work / "photos", args.images)
        env = {"RT_SPEED_RECORDS": str(work / "records.json"), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}

        def bound() -> dict[str, Any]:
            load = os.getloadavg()[0]
            cores = len(os.sched_getaffinity(0))
            child = {"model": args.model, "data": str(photos), "threads": cores, "rounds": args.rounds}
            bound_env = {"TORCHINDUCTOR_CACHE_DIR": str(work / "bound-inductor"), "RT_COMPILE_ARTEFACTS": "off"}
            res = run_child(BOUND, child, env={**env, **bound_env})  # no package for the runs to find
            return {**bound_figures(res, cores), "load_1m": [load, os.getloadavg()[0]]}

        before = bound()
        runs = []
        argv_rt = process_argv(str(photos), str(work / "f.h5"), args.model, None, "auto")
        for k in range(args.runs):
            load = os.getloadavg()[0]
            wall, said, parts = timed_process(argv_rt, env)
            parts["compile_or_load"] = _last_cost(work / "records.json")
            runs.append({"run": k + 1, "wall_s": wall, "img_s": args.images / wall, "said": said,
                         "parts_s": parts, "load_1m": [load, os.getloadavg()[0]]})  # fmt: skip
        ab = ab_runs(args.ab, argv_rt, env, work / "records-transforms.json")
        after = bound()
    b0, b1 = before["bound_img_s"]["library-compiled"], after["bound_img_s"]["library-compiled"]
    summary = [f"bound (library compiled) before {fmt(b0)} img/s, after {fmt(b1)} img/s"]
    for r in runs:
        r["over_bound"] = [ratio(r["img_s"], b0), ratio(r["img_s"], b1)]
        summary.append(
            f"run {r['run']}: {fmt(r['wall_s'])} s, {fmt(r['img_s'])} img/s = {fmt(r['over_bound'][0], 2)}x / "
            f"{fmt(r['over_bound'][1], 2)}x the bound before / after; {r['said']}"
        )
        summary.append("  parts: " + ", ".join(f"{k} {v}" for k, v in r["parts_s"].items()))
    summary += ab_summary(ab, args.images, b0, b1)
    result = {
        "bench": "first_runs",
        "runs": runs,
        "ab": ab,
        "bound_before": before,
        "bound_after": after,
        "machine": machine_info("cpu"),
        "command": command_line("first_runs", argv),
    }
    return emit(result, summary)


def ab_runs(pairs: int, argv: list[str], env: dict[str, str], memo: Path) -> list[dict[str, Any]]:
    """``pairs`` x (without, with) the early start, the order alternating pair by pair."""
    out = []
    for k in range(pairs):
        for early in (False, True) if k % 2 == 0 else (True, False):
            if not early:
                memo.unlink(missing_ok=True)  # no transform recalled: no early start (the run writes it again)
            load = os.getloadavg()[0]
            wall, _, parts = timed_process(argv, env)
            out.append({"early": early, "wall_s": wall, "parts_s": parts, "load_1m": [load, os.getloadavg()[0]]})
    return out


def ab_summary(ab: list[dict[str, Any]], images: int, b0: float, b1: float) -> list[str]:
    import statistics

    lines = []
    for early in (False, True):
        rows = [r for r in ab if r["early"] is early]
        if not rows:
            continue
        wall = statistics.median(r["wall_s"] for r in rows)
        med = {k: statistics.median(r["parts_s"].get(k) or 0 for r in rows) for k in ("setup", "loop", "early")}
        rate = images / wall
        lines.append(
            f"ab {'with' if early else 'without'} early start: median {fmt(wall)} s "
            f"({', '.join(fmt(r['wall_s']) for r in rows)}), {fmt(rate)} img/s = {fmt(ratio(rate, b0), 2)}x / "
            f"{fmt(ratio(rate, b1), 2)}x the bound; setup {med['setup']}, loop {med['loop']}, early {med['early']}"
        )
    return lines


def timed_process(argv: list[str], env: dict[str, str]) -> tuple[float, str, dict[str, Any]]:
    """Wall seconds of ``python -m resnet_transfer <argv>`` from spawn to exit, its last ``compile auto`` line,
    and the fixed parts read from when its log lines arrived (see the module doc)."""
    full = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "RT_OFFLINE": "1"}
    full["PYTHONPATH"] = os.pathsep.join([str(REPO), full.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "resnet_transfer", *argv]
    proc = subprocess.Popen(cmd, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = [(time.perf_counter() - t0, ln.rstrip()) for ln in proc.stderr or []]
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc not in (0, 3):
        raise RuntimeError(f"rt {' '.join(argv)} failed ({rc}):\n" + "\n".join(ln for _, ln in lines[-30:]))
    said = [ln for _, ln in lines if ln.startswith("compile auto")]
    setup = next((t for t, ln in lines if ln.startswith("extracting ")), None)
    done = next(((t, ln) for t, ln in lines if re.match(r"extract: \d+ img in ", ln)), None)
    loop = float(re.findall(r" in ([\d.]+)s", done[1])[0]) if done else None
    early = next((int(m[1]) for _, ln in lines if (m := re.match(r"(\d+) of them decoded while", ln))), 0)
    parts = {"setup": _r(setup), "loop": _r(loop), "finalize": _r(wall - done[0] if done else None), "early": early}
    return wall, said[-1] if said else "", parts


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _last_cost(records: Path) -> str:
    """The compile or load the last run recorded (the newest sample of whichever figure it added)."""
    try:
        (host,) = json.loads(records.read_text())["hosts"].values()
        work = max(host["work"].values(), key=lambda w: w.get("updated", ""))
    except (OSError, ValueError, KeyError):
        return "?"
    figs = [f"{k} {v[-1]:.2f}" for k, v in work.items() if k in ("compile_cold_s", "compile_warm_s", "load_s")]
    return "; ".join(figs) + " (newest samples)"


if __name__ == "__main__":
    main()
