"""The trained-network rows of offline_digits: from scratch, finetune layer4 / all, for several k and seeds.

Each (method, k, seed) is exactly one `rt finetune` + one `rt evaluate` (the same library calls the CLI
makes: ``resnet_transfer.finetuning.finetune`` and ``resnet_transfer.models.evaluate``), run in this one
process so that the recipe pays Python/torch start-up (~5-8 s on 2 cores) once instead of 2 x 20 times. The
equivalent command line of every run is printed. The k training images per class are drawn from
``DATA/train`` by seed with the same sampler as the probe curves (``results.subset_rows``) and written as a
CSV manifest next to the images (``DATA/subset_k<k>_seed<s>.csv``).

Writes ``RUN/eval/<method>/k<k>/seed<s>/report.json`` (`rt evaluate`'s report) and the model directories
``RUN/models/<method>/k<k>_seed<s>/`` (no resume checkpoints: ``--checkpoint-every 0``; each run is
short enough to redo).
The finetunes start, as the toolkit's workflow does, from a probe fitted on the same k images (`rt extract`
with the source backbone + `rt fit-head`); that probe is scored too (``RUN/eval/probe_fitted/``), so the
finetune-minus-probe gain is measured on the same images, seed by seed.

Usage::

    python recipes/offline_digits/sweep.py RUN --source RUN/models/source --methods scratch,layer4,all \\
        --scratch-ks 5,10,20,50,300 --finetune-ks 300 --seeds 3
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import subset_rows  # the probe curves' sampler


def write_manifest(data: Path, k: int, seed: int) -> Path:
    """``DATA/subset_k<k>_seed<s>.csv``: k images per class of ``DATA/train`` (paths relative to DATA)."""
    files = sorted(p for p in (data / "train").rglob("*.png"))
    classes = sorted({p.parent.name for p in files})
    labels = [classes.index(p.parent.name) for p in files]
    rows = subset_rows(labels, k, seed)
    out = data / f"subset_k{k}_seed{seed}.csv"  # next to train/: a manifest's paths stay inside its folder
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for r in rows:
            w.writerow([files[r].relative_to(data).as_posix(), files[r].parent.name])
    return out


def epochs_for(k: int, table: dict[int, int], default: int) -> int:
    """The epochs entry for ``k``: the largest table key <= k (small sets get more passes)."""
    keys = [key for key in sorted(table) if key <= k]
    return table[keys[-1]] if keys else default


def batch_for(k: int, classes: int, limit: int) -> int:
    """A batch of about a quarter of the training images (at most ``limit``), so that tiny sets get several
    optimiser steps per epoch (each epoch also pays a validation pass and a checkpoint)."""
    return max(4, min(limit, int(0.8 * k * classes) // 4))


def _settings(args: argparse.Namespace, method: str, k: int) -> dict[str, Any]:
    common = {
        "image_size": args.size,
        "epochs": (args.finetune_epochs if method != "scratch" and args.finetune_epochs else None)
        or epochs_for(k, args.epochs, 10),
        "batch_size": batch_for(k, 3, args.batch_size),
        "patience": 0,
        "crop_scale": args.crop_scale,
        "hflip": False,
        "color_jitter": args.color_jitter,
        "precision": args.precision,
        "checkpoint_every": 0,  # short runs: cheaper to redo than to save 134 MB of resume state per epoch
    }
    if method == "scratch":
        return {**common, "model": "resnet18", "weights": "none", "unfreeze": "all", "lr": args.scratch_lr}
    return {
        **common,
        "model": "resnet18",
        "weights": str(args.source),
        "unfreeze": method,
        "lr": args.lr,
        "lr_mult": args.lr_mult,
    }


def _command(manifest: Path, out: Path, seed: int, s: dict[str, Any], head: Path | None) -> str:
    flags = " ".join(
        f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else (f"--{k}" if v else f"--no-{k}")
        for k, v in s.items()
    )
    return f"rt finetune {head or ''} --data {manifest} {flags} --seed {seed} --out {out}".replace("  ", " ")


def _evaluate(args: argparse.Namespace, model: Path, report_dir: Path, **where: Any) -> float:
    from resnet_transfer.models import EvaluateConfig, evaluate

    src = where.get("cache") or where.get("data")
    print(f"$ rt evaluate {model} --{next(iter(where))} {src} --out {report_dir}", flush=True)
    return float(evaluate(EvaluateConfig(model, precision=args.precision, out=report_dir, **where)).report["accuracy"])


def probe_head(args: argparse.Namespace, manifest: Path, k: int, seed: int) -> Path:
    """`rt extract` of the k images with the source backbone + `rt fit-head`: the probe the finetunes start
    from (as in the toolkit's workflow), scored on the source-feature test cache when the run has one."""
    from resnet_transfer.cache import ExtractConfig, extract
    from resnet_transfer.head import FitHeadConfig, fit_head

    cache = args.run / "cache" / "source" / f"k{k}_seed{seed}.h5"
    head = args.run / "models" / "probe_source" / f"k{k}_seed{seed}"
    print(f"$ rt extract --data {manifest} --model resnet18 --weights {args.source} --image-size {args.size} "
          f"--out {cache} --overwrite", flush=True)  # fmt: skip
    extract(ExtractConfig(data=manifest, out=cache, model="resnet18", weights=str(args.source),
                          image_size=args.size, overwrite=True))  # fmt: skip
    print(f"$ rt fit-head --cache {cache} --seed {seed} --no-hflip --out {head} --overwrite", flush=True)
    fit_head(FitHeadConfig(cache=cache, out=head, seed=seed, overwrite=True, hflip=False))  # digits: no mirror views
    test_cache = args.run / "cache" / "source" / "test.h5"
    if test_cache.exists():
        report_dir = args.run / "eval" / "probe_fitted" / f"k{k}" / f"seed{seed}"
        acc = _evaluate(args, head, report_dir, cache=test_cache)
        print(f"probe (fit-head) k={k} seed={seed}: test accuracy {acc:.3f}", flush=True)
    return head


def run_one(args: argparse.Namespace, method: str, k: int, seed: int, head: Path | None) -> float:
    from resnet_transfer.finetuning import FinetuneConfig, finetune

    manifest = write_manifest(args.data, k, seed)
    name = "scratch" if method == "scratch" else f"finetune_{method}"
    model = args.run / "models" / name / f"k{k}_seed{seed}"
    report_dir = args.run / "eval" / name / f"k{k}" / f"seed{seed}"
    s = _settings(args, method, k)
    if head is not None:  # the backbone and head come from the probe's directory
        s = {key: v for key, v in s.items() if key not in ("model", "weights", "image_size")}
    print(f"$ {_command(manifest, model, seed, s, head)}", flush=True)
    t0 = time.perf_counter()
    finetune(FinetuneConfig(out=model, head=head, data=manifest, seed=seed, overwrite=True, **s))
    t1 = time.perf_counter()
    acc = _evaluate(args, model, report_dir, data=args.data / "test")
    shutil.rmtree(model / "checkpoints", ignore_errors=True)
    print(f"{name} k={k} seed={seed}: test accuracy {acc:.3f} ({t1 - t0:.1f}s train)", flush=True)
    return acc


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _table(text: str) -> dict[int, int]:
    return {int(a): int(b) for a, b in (kv.split(":") for kv in text.split(",") if kv.strip())}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the recipe's run directory (data/ inside it)")
    p.add_argument("--data", type=Path, default=None, help="target data (default RUN/data/target)")
    p.add_argument("--source", type=Path, default=None, help="source model directory (default RUN/models/source)")
    p.add_argument("--methods", default="scratch,layer4,all", help="scratch | layer4 | all, comma-separated")
    p.add_argument("--scratch-ks", default="10", help="k for from-scratch training")
    p.add_argument("--finetune-ks", default="300", help="k for finetuning layer4 / all")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=8, help="finetune epochs (default: --epochs by k)")
    p.add_argument("--epochs", type=_table, default=_table("1:10,50:8,100:6"), help="k:epochs,...")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--lr", type=float, default=2e-3, help="finetune: the head's peak lr (each stage below: x --lr-mult)"
    )
    p.add_argument("--lr-mult", type=float, default=0.5, help="finetune: each stage down trains at this x the lr above")
    p.add_argument("--scratch-lr", type=float, default=3e-3)
    p.add_argument("--crop-scale", type=float, default=0.8, help="random-resized-crop minimum area")
    p.add_argument("--color-jitter", type=float, default=0.0)
    p.add_argument("--size", type=int, default=32)
    p.add_argument(
        "--precision", default="auto", help="auto: what the source model's rt finetune --precision auto chose"
    )
    args = p.parse_args(argv)
    args.data = args.data or args.run / "data" / "target"
    args.source = args.source or args.run / "models" / "source"
    if args.precision == "auto":  # the source run's probe already timed fp32 vs bf16 on this host and shape
        try:
            args.precision = json.loads((args.source / "report.json").read_text())["precision"]
            print(f"precision: {args.precision}, as the source model's --precision auto chose", flush=True)
        except (OSError, KeyError, ValueError):
            pass  # each run decides for itself

    from resnet_transfer.base import Reporter, set_reporter, tune_process

    tune_process()
    set_reporter(Reporter(verbose=True, stream=sys.stdout))  # what `rt` prints, into the recipe's log
    results: dict[str, float] = {}
    methods = [m for m in args.methods.split(",") if m]
    if "scratch" in methods:
        for k in _ints(args.scratch_ks):
            for seed in range(args.seeds):
                results[f"scratch/k{k}/seed{seed}"] = run_one(args, "scratch", k, seed, None)
    for k in _ints(args.finetune_ks):
        for seed in range(args.seeds):
            if not any(m != "scratch" for m in methods):
                break
            head = probe_head(args, write_manifest(args.data, k, seed), k, seed)
            for method in (m for m in methods if m != "scratch"):
                results[f"{method}/k{k}/seed{seed}"] = run_one(args, method, k, seed, head)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
