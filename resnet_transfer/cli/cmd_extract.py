"""`rt extract` and `rt info`: build and inspect a feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import common
from .common import CompileOpt, DeviceOpt, ImageSizeOpt, ModelOpt, WeightsOpt

ExtractPrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (fp16 on CUDA, bf16 on CPUs that have it) | fp32 | bf16 | fp16 | int8 (x86 CPUs, pooled "
        "features only: a quantized copy of the backbone, calibrated on fixed photos or --calibration; "
        "needs pip install 'resnet_transfer[int8]'; see docs/performance.md for its speed and accuracy).",
    ),
]
CalibrationOpt = Annotated[
    Path | None,
    typer.Option(
        "--calibration",
        help="With --precision int8: a folder or manifest of your own images (64 are used) to calibrate the "
        "quantized backbone on. Use it when the backbone was trained on another kind of image than "
        "natural photos (the default set); later runs into the same cache must give the same images.",
    ),
]
MergeOpt = Annotated[
    bool,
    typer.Option(
        "--merge",
        help="Write one self-contained HDF5 file (real datasets, no <out>.chunks/ folder). Default: a small "
        "index whose datasets are virtual over immutable chunk files, so an update writes only what changed.",
    ),
]


def extract(
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            "-d",
            help="Image folder (one sub-folder per class), CSV manifest path,label, .zip/.tar/.tar.gz of class folders, WebDataset shards (a folder of .tar or train-{000..009}.tar), a save_to_disk dataset or Parquet.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HDF5 cache to write (resumed if it exists).")] = Path(
        "features.h5"
    ),
    model: ModelOpt = "resnet50",
    weights: WeightsOpt = "imagenet",
    image_size: ImageSizeOpt = None,
    cut: Annotated[
        list[str] | None,
        typer.Option("--cut", help="Also keep this stage's feature maps (e.g. layer3), for `rt finetune --cache`."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")] = 32,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Decode in this many worker processes. Default: on the CPU 0, which decodes the next batch in "
            "threads of this process while the current one runs (fastest on small machines); on CUDA, cores - 1.",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    precision: ExtractPrecisionOpt = "auto",
    calibration: CalibrationOpt = None,
    compile: CompileOpt = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", help="Storage type of pooled features: float16 | float32.")
    ] = "float16",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild the cache from scratch.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first unreadable image.")] = False,
    allow_outside: Annotated[
        bool, typer.Option("--allow-outside", help="Let manifest paths point outside the manifest's folder.")
    ] = False,
    record_root: Annotated[
        bool, typer.Option("--record-root/--no-record-root", help="Record the absolute data folder (default).")
    ] = True,
    max_pixels: Annotated[
        int | None, typer.Option("--max-pixels", help="Refuse images with more pixels (decompression bombs).")
    ] = None,
    chunk_rows: Annotated[
        int,
        typer.Option("--chunk-rows", help="Rows per committed chunk: at most this much work is redone after a kill."),
    ] = 256,
    merge: MergeOpt = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print what would change (added, changed, removed, ...) and compute nothing."),
    ] = False,
    pool_stages: Annotated[
        str | None,
        typer.Option(
            "--pool-stages",
            help="Also store the globally average-pooled features of these stages (e.g. layer3,layer4), "
            "from the same forward pass, as /pooled/<stage>.",
        ),
    ] = None,
) -> None:
    """Run the frozen backbone over the images once and cache pooled features (and --cut maps).

    Rows are keyed by the images' content: running again computes only new content (edited or added
    images) and updates moved, relabelled and deleted ones without a forward pass; interrupted runs
    resume. Images that cannot be read are skipped, listed, and make the exit code 3 (--strict: fail
    instead; a repaired file is retried).

    Examples:

        rt extract --data ./pets --out pets.h5

        rt extract --data pets.zip --out pets.h5   (also .tar, .tar.gz, shards-{000..009}.tar, a dataset folder, .parquet)

        rt extract --data ./pets --model resnet18 --weights ./resnet18.pth --out pets18.h5

        rt extract --data ./pets --cut layer3 --out pets-l3.h5

        rt extract --data ./pets --precision int8 --out pets-int8.h5
    """
    options = dict(locals())
    from ..cache import ExtractConfig
    from ..cache import extract as run_extract

    cfg = common.build(
        ExtractConfig,
        options,
        cut=list(cut or []),
        pool_stages=[x.strip() for x in (pool_stages or "").split(",") if x.strip()],
    )
    result = common.call(run_extract, cfg)
    from ..base import launched

    if result.skipped and not launched() and not dry_run:  # torchrun reports any non-zero exit as a crash
        raise typer.Exit(3)


# ---------------------------------------------------------------------------------------------- info


def info(
    path: Annotated[Path, typer.Argument(help="A cache (.h5), or a head/model directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    skipped: Annotated[bool, typer.Option("--skipped", help="List every skipped file with its reason.")] = False,
) -> None:
    """Show what a cache (or a head/model directory) holds: backbone identity, classes, sizes, skips."""
    from ..models import describe

    summary = common.call(describe, path, skipped)
    if as_json:
        common.echo_json(summary)
        return
    for key, value in summary.items():
        if isinstance(value, dict) and value:
            typer.echo(f"{key}:")
            for k, v in value.items():
                typer.echo(f"  {k}: {v}")
        elif isinstance(value, list) and value and isinstance(value[0], (list, tuple)):
            typer.echo(f"{key}:")
            for row in value:
                typer.echo("  " + ": ".join(str(x) for x in row))
        else:
            typer.echo(f"{key}: {value}")
