"""What every command module shares: the error-mapping call, JSON output, shared options, small parsers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

STATE = {"debug": False, "quiet": False}
T = TypeVar("T")


def progress_interval() -> float:
    """Seconds between progress lines in logs: ``RT_PROGRESS_INTERVAL`` (default 10; 0: every step)."""
    from ..base import DEFAULT_PROGRESS_INTERVAL

    try:
        return max(0.0, float(os.environ.get("RT_PROGRESS_INTERVAL", DEFAULT_PROGRESS_INTERVAL)))
    except ValueError:
        return DEFAULT_PROGRESS_INTERVAL


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a library call with a console reporter; RtError -> one line on stderr and its exit code (2, or
    130 for an interrupt the library turned into a message saying how to resume)."""
    from ..base import Reporter, RtError, set_reporter

    previous = set_reporter(Reporter(verbose=not STATE["quiet"], progress_interval=progress_interval()))
    try:
        return fn(*args, **kwargs)
    except RtError as exc:
        if STATE["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    finally:
        set_reporter(previous)


def echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


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
CompileOpt = Annotated[
    str,
    typer.Option(
        "--compile",
        help="auto | on | off: compile the forward pass with torch.compile (inductor). auto compiles when the "
        "images to run repay the compile by what this host measured before; where it never measured it and "
        "the job is large, it compiles once to measure, keeps the faster and records both (small jobs never "
        "compile).",
    ),
]
TrainCompileOpt = Annotated[
    str,
    typer.Option(
        "--compile",
        help="auto | on | off: compile the train step (forward + backward) with torch.compile. auto decides "
        "as extract does, from this host's records, measuring once where they have nothing.",
    ),
]


TtaOpt = Annotated[
    str | None,
    typer.Option("--tta", help="Test-time augmentation: `flip` (2 views) or `tencrop` (10 crops, ResNet paper)."),
]
HeadWeightsOpt = Annotated[
    str | None,
    typer.Option("--weights", "-w", help="Backbone checkpoint, if it moved since the head was fitted."),
]
DATA_HELP = (
    "Images to train on: a folder of class folders, a CSV manifest path,label, a .zip/.tar/.tar.gz of class "
    "folders, WebDataset shards (a folder of .tar, or train-{000..009}.tar), a save_to_disk dataset or Parquet."
)
SEARCH_HELP = (
    "Neighbour search: auto (exact while it is fast, else the faiss index when installed), exact, or index "
    "(pip install 'resnet_transfer[ann]')."
)
KnnSearchOpt = Annotated[str, typer.Option("--knn-search", help="The kNN beside the head. " + SEARCH_HELP)]
ViewsOpt = Annotated[
    str | None,
    typer.Option(
        "--views",
        help="Also train on K random-resized crops of each training image, through the cache's backbone (reads "
        "the images again; costs K extracts of them; `auto`: 8 below 1,000 training images, fewer where they "
        "would take over 30 s; default: auto): +0.02 mean test accuracy on the transfer suite's small tasks.",
    ),
]
ViewsFlipOpt = Annotated[
    bool, typer.Option("--hflip/--no-hflip", help="Flip --views at random (off for digits, text).")
]
ViewsRootOpt = Annotated[
    Path | None, typer.Option("--root", help="--views: the folder the cache's images are in (default: as recorded).")
]
OodScorerOpt = Annotated[
    str | None,
    typer.Option(
        "--ood-scorer", help="knn | mahalanobis | energy | msp: the out-of-distribution score (default: the head's)."
    ),
]


def epoch_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        typer.echo(f"error: --unfreeze-at {text!r}: give epochs as integers, e.g. 3,6", err=True)
        raise typer.Exit(2) from None


def exit_3_if_skipped(result: Any) -> None:
    from ..base import launched

    if result.skipped and not launched():  # torchrun reports any non-zero exit as a crashed worker
        raise typer.Exit(3)


def int_list(text: str, option: str) -> list[int]:
    """``"5,10,all"`` -> ``[5, 10, 0]`` (0 = all rows); a bad entry is a usage error naming ``option``."""
    try:
        return [0 if x.lower() == "all" else int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        typer.echo(f"error: {option} {text!r}: give integers separated by commas, e.g. 5,10,20", err=True)
        raise typer.Exit(2) from None


def build(config_cls: type[T], options: dict[str, Any], *, cli_only: tuple[str, ...] = (), **overrides: Any) -> T:
    """The typed config ``config_cls`` from a command's options (``dict(locals())`` at the top of the command):
    each option fills the config field of its name; ``overrides`` are fields whose option is named or parsed
    differently; ``cli_only`` names options that are not config fields. Any other option is a bug (an option
    that would be dropped silently), so it raises."""
    from dataclasses import fields

    names = {f.name for f in fields(config_cls)}  # type: ignore[arg-type]
    stray = set(options) - names - set(overrides) - set(cli_only)
    if stray:
        raise TypeError(f"{config_cls.__name__} has no field for the option(s) {sorted(stray)}")
    return config_cls(**{k: v for k, v in options.items() if k in names} | overrides)
