"""`rt extract` from where data lives: the same photos as a folder, a tar, a zip and Parquet, side by side.

``--images`` JPEGs ~500x375 (random crops of the photographs shipped with scikit-learn / scikit-image, q90,
1 in 4 portrait) are written as a class-folder tree, then packed as an uncompressed ``.tar`` (tarfile), a
``.zip`` (zipfile, stored: JPEG does not deflate) and one Parquet file (``datasets``: an ``Image`` column
with the bytes embedded and a ``ClassLabel``, ``to_parquet``). Each round extracts every source from
scratch (``--overwrite``), in a rotated order, in this one process; each figure is the median of
``--repeats`` rounds, the whole ``extract()`` call (backbone build, listing, content keys, decode, forward,
writes), with the raw samples. A second extract of each (nothing to compute: listing + stat check only)
is timed too. The forward is eager (``--compile off``) so that every source gets the same forward.

The forward is the same for every source and dominates (and on a loaded machine swings by 2x from run to
run), so the reading side is also timed alone: **feed** = list the source, take every image's content key,
and decode + crop every image through the feed `rt extract` uses (``images.normalized_batches``, its decode
threads), no forward; ``--feed-repeats`` rounds, order rotated.
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, emit, fmt, machine_info, make_phone_jpegs, median, ratio, summarize

SOURCES = ("folder", "tar", "zip", "parquet")


def pack(folder: Path, work: Path) -> dict[str, Path]:
    """The folder, and the same images as a tar, a zip and a Parquet file (the first run writes them)."""
    from resnet_transfer.images import list_images

    listing = list_images(folder)
    out = {"folder": folder, "tar": work / "photos.tar", "zip": work / "photos.zip", "parquet": work / "pq"}
    if not out["tar"].exists():
        with tarfile.open(out["tar"], "w") as t:
            for p in listing.paths:
                t.add(folder / p, p)
    if not out["zip"].exists():
        with zipfile.ZipFile(out["zip"], "w", zipfile.ZIP_STORED) as z:
            for p in listing.paths:
                z.write(folder / p, p)
    if not out["parquet"].exists():
        import datasets

        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=listing.classes)})
        rows = {
            "image": [{"bytes": (folder / p).read_bytes(), "path": p} for p in listing.paths],
            "label": listing.labels,
        }
        out["parquet"].mkdir()
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(out["parquet"] / "train.parquet"))
    return out


def _config(data: Path, out: Path, args: Any, overwrite: bool) -> Any:
    from resnet_transfer.cache import ExtractConfig

    return ExtractConfig(
        data=data,
        out=out,
        model=args.model,
        weights="none",
        image_size=args.image_size,
        batch_size=args.batch_size,
        compile="off",
        overwrite=overwrite,
    )


def _round(sources: dict[str, Path], work: Path, args: Any, k: int) -> dict[str, tuple[float, float, int]]:
    """One extract from scratch and one no-op re-extract of every source, order rotated by ``k``."""
    from resnet_transfer.cache import extract

    out: dict[str, tuple[float, float, int]] = {}
    order = SOURCES[k % len(SOURCES) :] + SOURCES[: k % len(SOURCES)]
    for name in order:
        cache = work / f"{name}.h5"
        t = time.perf_counter()
        res = extract(_config(sources[name], cache, args, overwrite=True))
        full = time.perf_counter() - t
        t = time.perf_counter()
        again = extract(_config(sources[name], cache, args, overwrite=False))
        noop = time.perf_counter() - t
        assert again.computed == 0, f"{name}: a second extract computed {again.computed} images"
        out[name] = (full, noop, res.computed)
    return out


def _feed(data: Path) -> float:
    """Seconds to list ``data``, key every image and decode + crop it through extract's feed (no forward)."""
    import torch

    from resnet_transfer.images import TransformConfig, list_images, normalized_batches

    t = time.perf_counter()
    listing = list_images(data)
    for i in range(len(listing)):
        listing.digest(i)
    n = sum(len(idx) for _, idx, _ in normalized_batches(listing, TransformConfig(), 32, torch.device("cpu")))
    assert n == len(listing)
    return time.perf_counter() - t


def _same_rows(work: Path) -> bool:
    """Whether every source's cache has the folder's keys and labels, row by row."""
    import numpy as np

    from resnet_transfer.cache import FeatureCache

    with FeatureCache(work / "folder.h5") as want:
        for name in SOURCES[1:]:
            with FeatureCache(work / f"{name}.h5") as got:
                if list(got.keys) != list(want.keys) or not np.array_equal(got.labels, want.labels):
                    return False
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks sources", description=__doc__)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=None, help="default: the model's (224)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--feed-repeats", type=int, default=5, help="rounds of the feed-only timing")
    ap.add_argument("--quick", action="store_true", help="200 images, 2 rounds (a smoke run)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one; kept if given)")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.feed_repeats = 200, 2, 3
    work = Path(args.dir or tempfile.mkdtemp(prefix="rt-bench-sources-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = make_phone_jpegs(work / "photos", args.images, size=(500, 375), seed=0)
    t = time.perf_counter()
    sources = pack(folder, work)
    pack_s = time.perf_counter() - t
    _feed(sources["folder"])  # warm-up: imports, page cache
    feed: dict[str, list[float]] = {s: [] for s in SOURCES}
    for k in range(args.feed_repeats):
        for s in SOURCES[k % len(SOURCES) :] + SOURCES[: k % len(SOURCES)]:
            feed[s].append(_feed(sources[s]))
    rounds = [_round(sources, work, args, k) for k in range(args.repeats)]
    full = {s: [r[s][0] for r in rounds] for s in SOURCES}
    noop = {s: [r[s][1] for r in rounds] for s in SOURCES}
    figures = {
        **{f"{s}_s": median(full[s]) for s in SOURCES},
        **{f"{s}_img_per_s": args.images / median(full[s]) for s in SOURCES},
        **{f"{s}_over_folder": ratio(median(full[s]), median(full["folder"])) for s in SOURCES[1:]},
        **{f"{s}_noop_s": median(noop[s]) for s in SOURCES},
        **{f"{s}_feed_s": median(feed[s]) for s in SOURCES},
        **{f"{s}_feed_over_folder": ratio(median(feed[s]), median(feed["folder"])) for s in SOURCES[1:]},
        "same_keys_and_labels": _same_rows(work),
        "pack_s": pack_s,
    }
    sizes = {
        s: sum(p.stat().st_size for p in ([q] if q.is_file() else q.rglob("*")) if p.is_file())
        for s, q in sources.items()
    }
    result = {
        "bench": "sources",
        "figures": figures,
        "raw": {
            **{f"{s}_s": summarize(full[s]) for s in SOURCES},
            **{f"{s}_noop_s": noop[s] for s in SOURCES},
            **{f"{s}_feed_s": summarize(feed[s]) for s in SOURCES},
        },
        "config": {
            "images": args.images,
            "photo_size": "500x375 (1 in 4 portrait), crops of shipped photographs, JPEG q90",
            "model": args.model,
            "image_size": args.image_size or "model default",
            "weights": "none",
            "compile": "off",
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "bytes": sizes,
        },
        "machine": machine_info(),
        "command": command_line("sources", argv),
    }
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"{args.images} photos ~500x375, {args.model} (--weights none, eager), whole extract(), medians of "
        f"{args.repeats} rounds (order rotated):",
        *[
            f"{s:8s} {fmt(figures[f'{s}_s'], 2)} s ({fmt(figures[f'{s}_img_per_s'])} img/s)"
            + ("" if s == "folder" else f", {fmt(figures[f'{s}_over_folder'], 3)}x the folder's time")
            + f"; raw {result['raw'][f'{s}_s']['samples']}; re-extract (nothing to compute) {fmt(figures[f'{s}_noop_s'], 2)} s"
            for s in SOURCES
        ],
        "feed only (list + keys + decode/crop, no forward), medians of "
        f"{args.feed_repeats}: "
        + ", ".join(
            f"{s} {fmt(figures[f'{s}_feed_s'], 2)} s"
            + ("" if s == "folder" else f" ({fmt(figures[f'{s}_feed_over_folder'], 3)}x)")
            for s in SOURCES
        ),
        *[f"  raw feed {s}: {result['raw'][f'{s}_feed_s']['samples']}" for s in SOURCES],
        f"same keys and labels as the folder, row by row: {figures['same_keys_and_labels']}; packing took {fmt(pack_s, 1)} s",
    ]
    return emit(result, lines)


if __name__ == "__main__":
    main()
