"""Incremental `rt extract`: updating a cache that holds ``--cut layer3`` maps after adding 1% more images,
against rebuilding it from scratch, side by side in one process.

- **base**: ``--images`` photo-like JPEGs extracted once (pooled features + layer3 maps) into a cache.
- **update**: a copy of that cache (index + chunk folder, copied before each timed run) brought up to date
  after 1% more images were added: the new images are decoded and forwarded, their chunk files and a new
  index are written; nothing else is rewritten.
- **rebuild**: the same data extracted with ``--overwrite`` (every image computed, every byte written).

Each figure is the median of ``--repeats`` timed runs (raw samples printed), each run a full
``extract()`` call including the backbone build (timm model creation, shown separately as ``build_s``),
the listing, the content keys (stat check: unchanged files are not read), the forward passes and the
writes. ``bytes_written`` counts the files each run created. Nothing here is compiled.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, emit, fmt, machine_info, make_photo_jpegs, median, ratio, summarize


def _config(data: Path, out: Path, args: Any, overwrite: bool) -> Any:
    from resnet_transfer.cache import ExtractConfig

    return ExtractConfig(
        data=data,
        out=out,
        model=args.model,
        weights="none",
        image_size=args.image_size,
        cut=["layer3"],
        batch_size=args.batch_size,
        workers=0,
        overwrite=overwrite,
    )


def _written(before: dict[Path, int], root: Path) -> int:
    """Bytes in files under ``root`` that are new or changed since ``before``."""
    now = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    return sum(p.stat().st_size for p, m in now.items() if before.get(p) != m)


def _snapshot(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _copy_cache(src: Path, dest: Path) -> None:
    """A copy of the cache ``src`` (index and chunk folder) at ``dest``, replacing what was there."""
    from resnet_transfer.cache import chunk_dir

    dest.unlink(missing_ok=True)
    shutil.rmtree(chunk_dir(dest), ignore_errors=True)
    shutil.copy2(src, dest)
    shutil.copytree(chunk_dir(src), chunk_dir(dest))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks incremental", description=__doc__)
    ap.add_argument("--images", type=int, default=1000, help="images in the base cache")
    ap.add_argument("--add", type=float, default=0.01, help="fraction of images added before the update")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="200 images, 2 repeats (a smoke run)")
    ap.add_argument("--full", action="store_true", help="same as the defaults")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 200, 2
    from resnet_transfer.backbone import build_backbone
    from resnet_transfer.cache import extract

    work = Path(args.dir or tempfile.mkdtemp(prefix="rt-bench-incr-"))
    data = make_photo_jpegs(work / "data", args.images, size=(320, 240), seed=0)
    n_add = max(1, round(args.images * args.add))
    extra = make_photo_jpegs(work / "extra", n_add, size=(320, 240), seed=1)
    base = work / "base.h5"
    t = time.perf_counter()
    extract(_config(data, base, args, overwrite=True))
    base_s = time.perf_counter() - t
    for i, p in enumerate(sorted(extra.rglob("*.jpg"))):  # +1%: new files in the class folders
        shutil.copy2(p, data / p.parent.name / f"added_{i:05d}.jpg")
    t = time.perf_counter()
    build_backbone(args.model, "none", args.image_size)
    build_s = time.perf_counter() - t
    update, rebuild, update_bytes, rebuild_bytes, computed = [], [], [], [], []
    for _ in range(args.repeats):
        upd = work / "update.h5"
        _copy_cache(base, upd)
        before = _snapshot(work)
        t = time.perf_counter()
        res = extract(_config(data, upd, args, overwrite=False))
        update.append(time.perf_counter() - t)
        update_bytes.append(_written(before, work))
        computed.append(res.computed)
        before = _snapshot(work)
        t = time.perf_counter()
        extract(_config(data, work / "rebuild.h5", args, overwrite=True))
        rebuild.append(time.perf_counter() - t)
        rebuild_bytes.append(_written(before, work))
    figures = {
        "update_s": median(update),
        "rebuild_s": median(rebuild),
        "update_over_rebuild": ratio(median(update), median(rebuild)),
        "update_bytes": median(update_bytes),
        "rebuild_bytes": median(rebuild_bytes),
        "bytes_ratio": ratio(median(update_bytes), median(rebuild_bytes)),
        "build_s": build_s,
        "base_extract_s": base_s,
        "images_computed_by_update": computed[0],
    }
    result = {
        "bench": "incremental",
        "figures": figures,
        "raw": {
            "update_s": summarize(update),
            "rebuild_s": summarize(rebuild),
            "update_bytes": update_bytes,
            "rebuild_bytes": rebuild_bytes,
        },
        "config": {
            "images": args.images,
            "added": n_add,
            "model": args.model,
            "image_size": args.image_size,
            "cut": "layer3",
            "batch_size": args.batch_size,
            "repeats": args.repeats,
        },
        "machine": machine_info(),
        "command": command_line("incremental", argv),
    }
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"{args.images} images + {n_add} added, {args.model} at {args.image_size} px with layer3 maps, "
        f"medians of {args.repeats}:",
        f"update {fmt(figures['update_s'], 2)} s (computed {computed[0]} images) vs rebuild "
        f"{fmt(figures['rebuild_s'], 2)} s: {fmt(100 * figures['update_over_rebuild'])}% of a rebuild",
        f"written: update {fmt(figures['update_bytes'] / 1e6)} MB vs rebuild {fmt(figures['rebuild_bytes'] / 1e6)} MB "
        f"({fmt(100 * figures['bytes_ratio'], 2)}%)",
        f"raw update s {result['raw']['update_s']['samples']}, rebuild s {result['raw']['rebuild_s']['samples']}; "
        f"backbone build {fmt(build_s, 2)} s (in both)",
    ]
    return emit(result, lines)


if __name__ == "__main__":
    main()
