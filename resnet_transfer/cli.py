"""The `rt` command line: parse options, build a config, call the library, turn errors into one line.

Imports of torch/timm happen inside the commands, so `rt --help` and argument errors answer at once.
Exit codes: 0 success; 2 an error you can fix (message says how); 3 finished but some images were skipped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from .runtime import tune_process

app = typer.Typer(
    name="rt",
    help=(
        "Transfer learning with pretrained ResNets.\n\n"
        "The small-data workflow: `rt extract` runs the frozen backbone once and caches its features; "
        "`rt fit-head` trains a softmax head on the cache in seconds; `rt finetune` unfreezes more layers "
        "when you have more data; `rt predict` / `rt evaluate` use the result on new images."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

_STATE = {"debug": False, "quiet": False}
T = TypeVar("T")


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    _STATE["debug"] = debug
    _STATE["quiet"] = quiet


def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a library call with a console reporter; RtError -> one line on stderr and exit code 2."""
    from .errors import RtError
    from .report import Reporter, set_reporter

    previous = set_reporter(Reporter(verbose=not _STATE["quiet"]))
    try:
        return fn(*args, **kwargs)
    except RtError as exc:
        if _STATE["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    finally:
        set_reporter(previous)


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


# ------------------------------------------------------------------------------------------- extract

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Backbone: a timm name (`resnet50`, `resnet50.a1_in1k`, any timm CNN) or torchvision "
        "`tv:resnet18|34|50|101|152`.",
    ),
]
WeightsOpt = Annotated[
    str,
    typer.Option(
        "--weights",
        "-w",
        help="`imagenet` (pretrained, from the hub or its local cache), `none` (random init), or a PATH to "
        "a .pth/.safetensors state dict or a model directory written by `rt finetune`.",
    ),
]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option("--image-size", help="Input size (crop) in pixels; default: the model's own eval size."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]


@app.command()
def extract(
    data: Annotated[
        Path,
        typer.Option("--data", "-d", help="Image folder (one sub-folder per class) or CSV manifest path,label."),
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
        typer.Option("--workers", help="DataLoader decode workers (default: chosen for the device)."),
    ] = None,
    device: DeviceOpt = "auto",
    precision: Annotated[
        str,
        typer.Option("--precision", help="auto (fp16 on CUDA, bf16 on CPUs that have it) | fp32 | bf16 | fp16"),
    ] = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", help="Storage type of pooled features: float16 | float32.")
    ] = "float16",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild the cache from scratch.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first unreadable image.")] = False,
    allow_outside: Annotated[
        bool, typer.Option("--allow-outside", help="Let manifest paths point outside the manifest's folder.")
    ] = False,
    record_root: Annotated[
        bool, typer.Option("--record-root", help="Store the absolute data folder in the cache.")
    ] = False,
    max_pixels: Annotated[
        int | None, typer.Option("--max-pixels", help="Refuse images with more pixels (decompression bombs).")
    ] = None,
    chunk_rows: Annotated[
        int,
        typer.Option("--chunk-rows", help="Rows per committed chunk: at most this much work is redone after a kill."),
    ] = 256,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="Under torchrun: write one real HDF5 file and delete the shards (default: a virtual dataset "
            "over the per-rank shard files).",
        ),
    ] = False,
) -> None:
    """Run the frozen backbone over the images once and cache pooled features (and --cut maps).

    Interrupted runs resume; running again adds only new images. Images that cannot be read are
    skipped, listed, and make the exit code 3 (--strict: fail instead).

    Examples:

        rt extract --data ./pets --out pets.h5

        rt extract --data ./pets --model resnet18 --weights ./resnet18.pth --out pets18.h5

        rt extract --data ./pets --cut layer3 --out pets-l3.h5
    """
    from .extract import ExtractConfig
    from .extract import extract as run_extract

    cfg = ExtractConfig(
        data=data,
        out=out,
        model=model,
        weights=weights,
        image_size=image_size,
        cut=list(cut or []),
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        dtype=dtype,
        overwrite=overwrite,
        allow_outside=allow_outside,
        strict=strict,
        record_root=record_root,
        max_pixels=max_pixels,
        chunk_rows=chunk_rows,
        merge=merge,
    )
    result = _call(run_extract, cfg)
    from .distributed import launched

    if result.skipped and not launched():  # torchrun reports any non-zero exit as a crashed worker
        raise typer.Exit(3)


# ---------------------------------------------------------------------------------------------- info


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="A cache (.h5), or a head/model directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    skipped: Annotated[bool, typer.Option("--skipped", help="List every skipped file with its reason.")] = False,
) -> None:
    """Show what a cache (or a head/model directory) holds: backbone identity, classes, sizes, skips."""
    from .info import describe

    summary = _call(describe, path, skipped)
    if as_json:
        _echo_json(summary)
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


def main() -> None:
    """Console entry point (`rt`)."""
    tune_process()
    try:
        app(prog_name="rt")
    except SystemExit:
        raise
    except BaseException:
        if "--debug" in sys.argv:
            raise
        import traceback

        typer.echo(
            "internal error (a bug in rt; please report it with the command you ran):\n"
            + "".join(traceback.format_exc().splitlines(keepends=True)[-3:]),
            err=True,
        )
        raise SystemExit(1) from None
