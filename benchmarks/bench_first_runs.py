"""`rt extract` on a host seen for the first time: fresh speed records and an empty inductor cache, then
``--runs`` whole-process runs of `rt extract --compile auto` on the same photos, with the pipeline bound
(:mod:`benchmarks.pipeline_bound`) taken before the first run and after the last, so the load's drift shows.

    python -m benchmarks first_runs [--images 2000] [--runs 3] [--model resnet50]

Printed per run: wall seconds, img/s, what `--compile auto` said (the first run measures the compiled forward
where the job could repay it, the later ones decide from the records), the load; then each run's img/s over
the bound (library compiled forward) taken before and after.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, emit, fmt, machine_info, make_photo_jpegs, ratio, run_child
from benchmarks.pipeline_bound import BOUND, bound_figures, process_argv, run_process


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks first_runs")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--rounds", type=int, default=3, help="bound: rounds of the forward-only paths")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rt-bench-first-") as tmp:
        work = Path(tmp)
        photos = make_photo_jpegs(work / "photos", args.images)
        env = {"RT_SPEED_RECORDS": str(work / "records.json"), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}

        def bound() -> dict[str, Any]:
            load = os.getloadavg()[0]
            cores = len(os.sched_getaffinity(0))
            child = {"model": args.model, "data": str(photos), "threads": cores, "rounds": args.rounds}
            res = run_child(BOUND, child, env={**env, "TORCHINDUCTOR_CACHE_DIR": str(work / "bound-inductor")})
            return {**bound_figures(res, cores), "load_1m": [load, os.getloadavg()[0]]}

        before = bound()
        runs = []
        argv_rt = process_argv(str(photos), str(work / "f.h5"), args.model, None, "auto")
        for k in range(args.runs):
            load = os.getloadavg()[0]
            wall, said = run_process(argv_rt, env)
            runs.append({"run": k + 1, "wall_s": wall, "img_s": args.images / wall, "said": said,
                         "load_1m": [load, os.getloadavg()[0]]})  # fmt: skip
        after = bound()
    b0, b1 = before["bound_img_s"]["library-compiled"], after["bound_img_s"]["library-compiled"]
    summary = [f"bound (library compiled) before {fmt(b0)} img/s, after {fmt(b1)} img/s"]
    for r in runs:
        r["over_bound"] = [ratio(r["img_s"], b0), ratio(r["img_s"], b1)]
        summary.append(
            f"run {r['run']}: {fmt(r['wall_s'])} s, {fmt(r['img_s'])} img/s = {fmt(r['over_bound'][0], 2)}x / "
            f"{fmt(r['over_bound'][1], 2)}x the bound before / after; {r['said']}"
        )
    result = {
        "bench": "first_runs",
        "runs": runs,
        "bound_before": before,
        "bound_after": after,
        "machine": machine_info("cpu"),
        "command": command_line("first_runs", argv),
    }
    return emit(result, summary)


if __name__ == "__main__":
    main()
