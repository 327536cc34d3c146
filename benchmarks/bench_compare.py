"""`rt compare`'s cost: per candidate, its extract plus the scoring (curves, LogME, cost), and how the whole
run grows with images and candidates.

For each ``--images`` count, photo-like JPEGs (``common.make_photo_jpegs``) are written once; for each
``--candidates`` count, a fresh work folder is compared with that many ResNet-18 candidates of the same cost
(``none`` and checkpoints saved here, so the candidates differ only in weights). Per candidate the report
records ``extract_seconds`` (the extract calls, backbone build included) and ``score_seconds`` (the probe
fits on every k-subset and seed, LogME, the parameter count); the overhead is their ratio. The goal is
scoring under 10% of the extract, and the run's time growing linearly in candidates and images (the growth
exponent is the least-squares slope of log(seconds) on log(size): 1 is linear).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_tools import slope  # the growth exponent, as the tools benchmark computes it
from benchmarks.common import command_line, emit, fmt, machine_info, make_photo_jpegs, median


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default="160,320", help="images in --data (20%% held out), comma-separated")
    p.add_argument("--candidates", default="1,2", help="candidates per run, comma-separated")
    p.add_argument("--image-size", type=int, default=128, help="input size of the backbones")
    p.add_argument("--k", default="5,10,20", help="images per class of the curves")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="80,160 images, 1,2 candidates, 64 px")
    p.add_argument("--full", action="store_true", help="(same as the default)")
    return p.parse_args(argv)


def _checkpoints(folder: Path, n: int) -> list[str]:
    import timm
    import torch

    specs = ["resnet18=none"]
    for i in range(1, n):
        torch.manual_seed(i)
        path = folder / f"r18-{i}.pth"
        torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
        specs.append(f"resnet18={path}")
    return specs


def _one(data: Path, specs: list[str], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import os

    from resnet_transfer.tools import CompareConfig, compare

    ks = [int(k) for k in args.k.split(",")]
    t0 = time.perf_counter()
    rep = compare(
        CompareConfig(data=data, models=specs, out=work, ks=ks, seeds=args.seeds, image_size=args.image_size)
    ).report
    total = time.perf_counter() - t0
    cands = rep["candidates"]
    ext = [c["extract_seconds"] for c in cands]
    score = [c["score_seconds"] for c in cands]
    return {
        "images": rep["n_train"] + rep["n_test"],
        "candidates": len(specs),
        "seconds": total,
        "extract_seconds": ext,
        "score_seconds": score,
        "overhead": [s / e for s, e in zip(score, ext)],
        "other_seconds": total - sum(ext) - sum(score),  # listing, split, outputs (json, md, png)
        "images_per_second": [c["images_per_second"] for c in cands],
        "computed": [c["computed"] for c in cands],
        "load_avg_1m": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.quick:
        args.images, args.candidates, args.image_size = "80,160", "1,2", 64
    sizes = [int(x) for x in args.images.split(",") if x]
    counts = [int(x) for x in args.candidates.split(",") if x]
    tmp = Path(tempfile.mkdtemp(prefix="rt-bench-compare-"))
    try:
        specs = _checkpoints(tmp, max(counts))
        warm = make_photo_jpegs(tmp / "warm", 40, classes=4, seed=9)
        _one(warm, specs[:1], tmp / "warm-out", args)  # imports and first-call costs, not measured
        runs = []
        for n in sizes:
            data = make_photo_jpegs(tmp / f"data-{n}", n, classes=4, seed=0)
            for c in counts:
                runs.append(_one(data, specs[:c], tmp / f"out-{n}-{c}", args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    over = [o for r in runs for o in r["overhead"]]
    growth_images = {c: slope(sizes, [r["seconds"] for r in runs if r["candidates"] == c]) for c in counts}
    growth_cands = {n: slope(counts, [r["seconds"] for r in runs if r["images"] == n]) for n in sizes}
    lines = [f"{'images':>6s} {'cands':>5s} {'total s':>8s} {'extract s/cand':>15s} {'score s/cand':>13s} overhead"]
    for r in runs:
        lines.append(
            f"{r['images']:>6d} {r['candidates']:>5d} {fmt(r['seconds']):>8s} {fmt(median(r['extract_seconds'])):>15s} "
            f"{fmt(median(r['score_seconds']), 2):>13s} {median(r['overhead']):8.1%}"
        )
    lines.append(f"scoring / extract per candidate: median {median(over):.1%}, max {max(over):.1%} (goal < 10%)")
    lines.append(
        "growth exponent of the run's seconds in images (per candidate count): "
        + ", ".join(f"{c} cand: {fmt(g, 2)}" for c, g in growth_images.items())
        + "; in candidates (per image count): "
        + ", ".join(f"{n} img: {fmt(g, 2)}" for n, g in growth_cands.items())
    )
    result = {
        "bench": "compare",
        "figures": {
            "overhead_median": median(over),
            "overhead_max": max(over),
            "growth_in_images": growth_images,
            "growth_in_candidates": growth_cands,
        },
        "raw": runs,
        "config": {
            "images": sizes,
            "candidates": counts,
            "image_size": args.image_size,
            "k": args.k,
            "seeds": args.seeds,
        },
        "machine": machine_info(),
        "command": command_line("compare", argv),
    }
    return emit(result, lines)
