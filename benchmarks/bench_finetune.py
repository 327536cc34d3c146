"""The cached-stage benchmark: `rt finetune --unfreeze layer4` from a cache of layer3 maps vs the same
finetune reading images and running the frozen stem..layer3 at every step.

Setup (timed once, reported separately): a class-structured image folder (coloured shapes on noisy
backgrounds, JPEG, photo-sized so decoding costs what it does), `rt extract --cut layer3` into a cache
(pooled features + layer3 maps), `rt fit-head` on the cache's pooled features. Both arms then start from
that fitted head and run the library's `finetune()` with identical settings (same split, seed, batch,
epochs, precision); only the input differs. Rounds alternate (images, cache) so load on the machine hits
both alike. The figure: median epoch wall time (train + validation) of the cached arm / the image arm,
with best validation accuracy of each side by side. The target from the issue is <= 0.33x.

The backbone is randomly initialised (`--weights none`: no pretrained weights can be downloaded here), so
accuracies are those of a random stem..layer3 with layer4 + head trained; the timing does not depend on
the weights' values.

    python -m benchmarks finetune                 # resnet50 @160 px, 160 images, 3 rounds x 3 epochs
    python benchmarks/bench_finetune.py --quick   # resnet18 @64 px, a smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:  # run as `python -m benchmarks finetune` (package) or as a script
    from benchmarks.common import command_line, emit, fmt, machine_info, median, ratio, summarize
except ImportError:  # pragma: no cover - script mode
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import command_line, emit, fmt, machine_info, median, ratio, summarize

COLOURS = ((220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 40))


def make_shapes(root: Path, per_class: int, size: tuple[int, int] = (320, 240), seed: int = 0) -> Path:
    """``per_class`` JPEGs per class under ``root/<class>/``: a coloured circle/square/triangle/bar at a
    random place and scale on a noisy background (a learnable signal: colour and shape)."""
    import numpy as np
    from PIL import Image, ImageDraw

    marker = root / f".made-{per_class}-{size[0]}x{size[1]}-{seed}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    names = ("circle", "square", "triangle", "bar")
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size
            img = Image.fromarray(rng.integers(0, 110, size=(h, w, 3), dtype=np.uint8), "RGB")
            d = ImageDraw.Draw(img)
            s = int(min(w, h) * rng.uniform(0.35, 0.75))
            x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            colour = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLOURS[c], rng.integers(-30, 30, 3)))
            if name == "circle":
                d.ellipse([x0, y0, x0 + s, y0 + s], fill=colour)
            elif name == "square":
                d.rectangle([x0, y0, x0 + s, y0 + s], fill=colour)
            elif name == "triangle":
                d.polygon([(x0 + s // 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=colour)
            else:
                d.rectangle([x0, y0 + s // 3, x0 + s, y0 + 2 * s // 3], fill=colour)
            img.save(root / name / f"{name}_{i:04d}.jpg", quality=90)
    marker.touch()
    return root


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="bench_finetune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--per-class", type=int, default=40, help="images per class (4 classes)")
    ap.add_argument("--photo-size", default="320x240", help="JPEG size WxH (e.g. 500x375, as the extract bench)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run")
    ap.add_argument("--rounds", type=int, default=3, help="runs per arm, alternating")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workdir", type=Path, default=None, help="keep data/cache here (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="resnet18 @64 px, 16 per class, 2 rounds x 2 epochs")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.image_size, args.per_class, args.epochs, args.rounds = "resnet18", 64, 16, 2, 2

    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        return _run(args, work, argv)


def _run(args: argparse.Namespace, work: Path, argv: list[str] | None) -> dict[str, Any]:
    import shutil

    import torch

    from resnet_transfer.base import tune_process
    from resnet_transfer.cache import ExtractConfig, extract
    from resnet_transfer.finetuning import FinetuneConfig, finetune
    from resnet_transfer.head import FitHeadConfig, fit_head

    tune_process()
    w, h = (int(v) for v in args.photo_size.lower().split("x"))
    data = make_shapes(work / f"data-{w}x{h}", args.per_class, size=(w, h))
    cache = work / "l3.h5"
    t = time.perf_counter()
    extract(ExtractConfig(data=data, out=cache, model=args.model, weights="none", image_size=args.image_size,
                          cut=["layer3"], precision=args.precision, batch_size=args.batch_size, overwrite=True))  # fmt: skip
    extract_s = time.perf_counter() - t
    head = work / "head"
    shutil.rmtree(head, ignore_errors=True)
    fit_head(FitHeadConfig(cache=cache, out=head, plot=False))

    common = {"head": head, "unfreeze": "layer4", "epochs": args.epochs, "batch_size": args.batch_size,
              "precision": args.precision, "patience": 0, "seed": 0}  # fmt: skip
    arms = {"images": {"data": data}, "cache": {"cache": cache}}
    epoch_s: dict[str, list[float]] = {a: [] for a in arms}
    train_s: dict[str, list[float]] = {a: [] for a in arms}
    run_s: dict[str, list[float]] = {a: [] for a in arms}
    acc: dict[str, list[float]] = {a: [] for a in arms}
    n_train = {}
    for r in range(args.rounds):
        for arm, extra in arms.items():
            out = work / f"ft-{arm}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            res = finetune(FinetuneConfig(out=out, **common, **extra))
            run_s[arm].append(time.perf_counter() - t)
            hist = res.history[1:] if len(res.history) > 1 else res.history  # epoch 1 includes warm-up
            epoch_s[arm] += [h["seconds"] for h in hist]
            train_s[arm] += [h["train_seconds"] for h in hist]
            acc[arm].append(float(res.best["val_acc"]))
            n_train[arm] = len(res.history)
            shutil.rmtree(out, ignore_errors=True)

    med = {a: median(epoch_s[a]) for a in arms}
    med_train = {a: median(train_s[a]) for a in arms}
    saved = med["images"] - med["cache"]
    result = {
        "bench": "finetune",
        "figures": {
            "epoch_time_ratio_cache_vs_images": round(ratio(med["cache"], med["images"]), 4),
            "train_time_ratio_cache_vs_images": round(ratio(med_train["cache"], med_train["images"]), 4),
            "target_ratio": 0.33,
            "epoch_s_images_median": round(med["images"], 3),
            "epoch_s_cache_median": round(med["cache"], 3),
            "val_acc_images_median": median(acc["images"]),
            "val_acc_cache_median": median(acc["cache"]),
            "extract_with_maps_s": round(extract_s, 2),
            "break_even_epochs": round(extract_s / saved, 2) if saved > 0 else None,
        },
        "raw": {
            "epoch_s": {a: summarize(v) for a, v in epoch_s.items()},
            "train_s": {a: summarize(v) for a, v in train_s.items()},
            "run_s": {a: summarize(v) for a, v in run_s.items()},
            "val_acc": acc,
        },
        "config": {
            "model": args.model,
            "weights": "none",
            "image_size": args.image_size,
            "photo_size": args.photo_size,
            "images": 4 * args.per_class,
            "epochs": args.epochs,
            "rounds": args.rounds,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "threads": torch.get_num_threads(),
        },
        "machine": machine_info(),
        "command": command_line("finetune", sys.argv[1:] if argv is None else argv),
    }
    fig = result["figures"]
    summary = [
        f"{args.model} @{args.image_size}px, {4 * args.per_class} {args.photo_size} JPEGs, --unfreeze layer4 from a fitted head, "
        f"{args.rounds} rounds x {args.epochs} epochs per arm (first epoch of each run not counted)",
        f"epoch wall time (train + val), median: images {fmt(med['images'], 2)} s | cached layer3 "
        f"{fmt(med['cache'], 2)} s -> ratio {fmt(fig['epoch_time_ratio_cache_vs_images'], 3)}x (target <= 0.33x)",
        f"train part only, median: images {fmt(med_train['images'], 2)} s | cache {fmt(med_train['cache'], 2)} s "
        f"-> {fmt(fig['train_time_ratio_cache_vs_images'], 3)}x",
        f"best val accuracy per run: images {acc['images']} | cache {acc['cache']} (random-init backbone, 32 "
        "images: these swing with 1e-6 changes of the inputs; a smoke signal, not a comparison)",
        f"one-off extract with layer3 maps: {fmt(extract_s, 1)} s (pays for itself after "
        f"{fig['break_even_epochs']} epochs)",
    ]
    return emit(result, summary)


if __name__ == "__main__":
    main()
