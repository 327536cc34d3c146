"""The `rt` command line: parse options, build a config, call the library, turn errors into one line.

Start-up stays cheap: this module imports typer and nothing heavy; torch, timm, scikit-learn and matplotlib
are imported by the library calls that need them (`rt --help`, `--version` and `rt info` never load torch).
Exit codes: 0 success; 2 an error you can fix (message says how); 3 finished but some images were skipped;
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

from .runtime import tune_process


class _Group(TyperGroup):
    """The root command group: Ctrl-C anywhere in a command (inside a library call or not) exits 130."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    name="rt",
    cls=_Group,
    help=(
        "Transfer learning with pretrained ResNets.\n\n"
        "The small-data workflow: `rt extract` runs the frozen backbone once and caches its features; "
        "`rt fit-head` trains a softmax head on the cache in seconds; `rt finetune` unfreezes more layers "
        "when you have more data; `rt predict` / `rt evaluate` use the result on new images."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

_STATE = {"debug": False, "quiet": False}
T = TypeVar("T")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"rt (resnet_transfer) {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    _STATE["debug"] = debug
    _STATE["quiet"] = quiet


def _progress_interval() -> float:
    """Seconds between progress lines in logs: ``RT_PROGRESS_INTERVAL`` (default 10; 0: every step)."""
    from .report import DEFAULT_PROGRESS_INTERVAL

    try:
        return max(0.0, float(os.environ.get("RT_PROGRESS_INTERVAL", DEFAULT_PROGRESS_INTERVAL)))
    except ValueError:
        return DEFAULT_PROGRESS_INTERVAL


def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a library call with a console reporter; RtError -> one line on stderr and its exit code (2, or
    130 for an interrupt the library turned into a message saying how to resume)."""
    from .errors import RtError
    from .report import Reporter, set_reporter

    previous = set_reporter(Reporter(verbose=not _STATE["quiet"], progress_interval=_progress_interval()))
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
CompileOpt = Annotated[
    str,
    typer.Option(
        "--compile",
        help="auto | on | off: compile the forward pass with torch.compile (inductor). auto compiles when the "
        "images to run repay the compile on this host (or it is already in inductor's cache).",
    ),
]


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
        typer.Option(
            "--workers",
            help="Decode in this many worker processes. Default: on the CPU 0, which decodes the next batch in "
            "threads of this process while the current one runs (fastest on small machines); on CUDA, cores - 1.",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="auto (fp16 on CUDA, bf16 on CPUs that have it) | fp32 | bf16 | fp16 | int8 (x86 CPUs, pooled "
            "features only: a quantized copy of the backbone, calibrated on fixed photos or --calibration; "
            "needs pip install 'resnet_transfer[int8]'; see docs/performance.md for its speed and accuracy).",
        ),
    ] = "auto",
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="With --precision int8: a folder or manifest of your own images (64 are used) to calibrate the "
            "quantized backbone on. Use it when the backbone was trained on another kind of image than "
            "natural photos (the default set); later runs into the same cache must give the same images.",
        ),
    ] = None,
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
            help="Write one self-contained HDF5 file (real datasets, no <out>.chunks/ folder). Default: a small "
            "index whose datasets are virtual over immutable chunk files, so an update writes only what changed.",
        ),
    ] = False,
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

        rt extract --data ./pets --model resnet18 --weights ./resnet18.pth --out pets18.h5

        rt extract --data ./pets --cut layer3 --out pets-l3.h5

        rt extract --data ./pets --precision int8 --out pets-int8.h5
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
        compile=compile,
        dtype=dtype,
        overwrite=overwrite,
        allow_outside=allow_outside,
        strict=strict,
        record_root=record_root,
        max_pixels=max_pixels,
        chunk_rows=chunk_rows,
        merge=merge,
        dry_run=dry_run,
        pool_stages=[x.strip() for x in (pool_stages or "").split(",") if x.strip()],
        calibration=calibration,
    )
    result = _call(run_extract, cfg)
    from .distributed import launched

    if result.skipped and not launched() and not dry_run:  # torchrun reports any non-zero exit as a crash
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


# ----------------------------------------------------------------------------- fit-head / predict / evaluate


@app.command("fit-head")
def fit_head_cmd(
    cache: Annotated[Path, typer.Option("--cache", "-c", help="The feature cache written by `rt extract`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The head directory to write.")] = Path("head"),
    classes: Annotated[
        int | None,
        typer.Option("--classes", help="Expected number of classes; checked against the cache (default: the cache's)."),
    ] = None,
    val: Annotated[
        Path | None,
        typer.Option("--val", help="A separate validation cache (same backbone) instead of a split of --cache."),
    ] = None,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Stratified share of --cache held out for validation.")
    ] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split, subsample and minibatch order.")] = 0,
    features: Annotated[
        str,
        typer.Option(
            "--features",
            help="Which pooled features the head reads: `auto` (choose on validation among the final ones, each "
            "stage the cache stores and their concatenation; the final ones when it stores none), `final`, a "
            "stage (`layer3`) or stages joined by + (`layer3+layer4`).",
        ),
    ] = "auto",
    solver: Annotated[
        str,
        typer.Option(
            "--solver",
            help="`lbfgs` (full batch, L2 chosen on validation), `adamw` (minibatch, early stopping; streams "
            "caches too large for memory) or `sklearn` (LogisticRegression, the reference).",
        ),
    ] = "lbfgs",
    l2: Annotated[
        float | None,
        typer.Option("--l2", help="Fixed L2 strength (default: chosen on the validation rows from a grid)."),
    ] = None,
    hidden: Annotated[int, typer.Option("--hidden", help="Hidden units of a one-layer MLP head (0: linear).")] = 0,
    dropout: Annotated[float, typer.Option("--dropout", help="Dropout of the MLP's hidden layer.")] = 0.0,
    class_weight: Annotated[
        str, typer.Option("--class-weight", help="`none` or `balanced` (weights n / (k * n_class) for imbalance).")
    ] = "none",
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Label smoothing in [0, 1).")] = 0.0,
    max_iter: Annotated[
        int | None, typer.Option("--max-iter", help="L-BFGS iterations of the final fit (default: by size).")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="AdamW: maximum epochs.")] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="AdamW: minibatch size.")] = 256,
    lr: Annotated[float, typer.Option("--lr", help="AdamW: learning rate.")] = 1e-3,
    patience: Annotated[int, typer.Option("--patience", help="AdamW: epochs without improvement before stopping.")] = 5,
    max_memory_gb: Annotated[
        float | None,
        typer.Option("--max-memory-gb", help="Stream from the cache (AdamW) above this much feature memory."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing head in --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Train a softmax head on cached features (seconds; the images are not touched again).

    Writes OUT/ with meta.json (backbone identity, classes), head.safetensors, report.json (accuracy,
    per-class precision/recall/F1, confusion matrix, chosen L2, time) and confusion.png.

    Examples:

        rt fit-head --cache pets.h5 --out cat-head/

        rt fit-head --cache pets.h5 --classes 3 --class-weight balanced --out cat-head/

        rt fit-head --cache pets.h5 --val pets-val.h5 --hidden 256 --solver adamw --out mlp-head/

        rt fit-head --cache pets.h5 --features layer3+layer4 --out stage-head/
    """
    from .fit import FitHeadConfig
    from .fit import fit_head as run_fit_head

    cw = None if class_weight.lower() == "none" else class_weight.lower()
    cfg = FitHeadConfig(
        cache=cache,
        out=out,
        classes=classes,
        val=val,
        val_fraction=val_fraction,
        seed=seed,
        features=features,
        solver=solver,
        l2=l2,
        hidden=hidden,
        dropout=dropout,
        class_weight=cw,
        label_smoothing=label_smoothing,
        max_iter=max_iter,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        max_memory_gb=max_memory_gb,
        overwrite=overwrite,
    )
    result = _call(run_fit_head, cfg)
    if as_json:
        _echo_json(result.report)


TtaOpt = Annotated[
    str | None,
    typer.Option("--tta", help="Test-time augmentation: `flip` (2 views) or `tencrop` (10 crops, ResNet paper)."),
]
HeadWeightsOpt = Annotated[
    str | None,
    typer.Option("--weights", "-w", help="Backbone checkpoint, if it moved since the head was fitted."),
]


@app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(help="A head directory (`rt fit-head`) or model (`rt finetune`).")],
    inputs: Annotated[list[Path], typer.Argument(help="Image files, folders, or CSV manifests.")],
    top: Annotated[int, typer.Option("--top", "-k", help="Classes to show per image.")] = 3,
    tta: TtaOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
    as_csv: Annotated[
        bool, typer.Option("--csv", help="CSV output: path,class,probability[,class,probability ...]")
    ] = False,
    weights: HeadWeightsOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")] = 32,
    device: DeviceOpt = "auto",
    min_confidence: Annotated[
        float | None,
        typer.Option("--min-confidence", help="Mark images whose top probability is below this as `uncertain`."),
    ] = None,
    compile: CompileOpt = "auto",
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="auto | fp32 | bf16 | fp16 | int8: the backbone's precision (use the one the head's cache was "
            "extracted in: `rt info CACHE` says it).",
        ),
    ] = "auto",
) -> None:
    """Classify new images with a fitted head (or finetuned model).

    Unreadable images are skipped and listed (exit code 3), never fatal.

    Examples:

        rt predict cat-head/ photo1.jpg photo2.png --top 3

        rt predict cat-head/ ./new-photos --tta flip --csv > predictions.csv
    """
    from .predict import predict as run_predict

    if as_json and as_csv:
        typer.echo("error: choose one of --json and --csv", err=True)
        raise typer.Exit(2)
    res = _call(
        run_predict,
        model_dir,
        list(inputs),
        tta=tta,
        top=top,
        weights=weights,
        batch_size=batch_size,
        device=device,
        min_confidence=min_confidence,
        compile=compile,
        precision=precision,
    )
    marked = min_confidence is not None  # then a `prediction` column says the class or `uncertain`
    if as_json:
        _echo_json(
            {
                "classes": res.classes,
                "predictions": [{**r, "top": [{"class": c, "probability": p} for c, p in r["top"]]} for r in res.rows],
                "skipped": [{"path": p, "reason": why} for p, why in res.skipped],
            }
        )
    elif as_csv:
        import csv

        w = csv.writer(sys.stdout)
        k = max((len(r["top"]) for r in res.rows), default=0)
        pcol = ["prediction"] if marked else []
        w.writerow(["path", *pcol] + [x for i in range(1, k + 1) for x in (f"class_{i}", f"probability_{i}")])
        for r in res.rows:
            pval = [r["prediction"]] if marked else []
            w.writerow([r["path"], *pval] + [x for c, p in r["top"] for x in (c, f"{p:.6f}")])
    else:
        from .report import print_table

        columns = ["image", *(["prediction"] if marked else [])] + [
            f"#{i + 1}" for i in range(min(top, len(res.classes)))
        ]
        rows = [
            [r["path"], *([r["prediction"]] if marked else []), *[f"{c} {p:.3f}" for c, p in r["top"]]]
            for r in res.rows
        ]
        print_table(columns, rows, title=f"{len(res.rows)} image(s)")
    if res.skipped:
        raise typer.Exit(3)


@app.command()
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="A head directory (`rt fit-head`) or model (`rt finetune`).")],
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="Labelled images: a folder of class folders, or a CSV.")
    ] = None,
    cache: Annotated[
        Path | None, typer.Option("--cache", "-c", help="Or a labelled feature cache of the same backbone.")
    ] = None,
    tta: TtaOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Also write report.json + confusion.png here.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the machine-readable report.")] = False,
    weights: HeadWeightsOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")] = 32,
    device: DeviceOpt = "auto",
    worst: Annotated[
        int, typer.Option("--worst", help="Write OUT/worst.png: the N most confidently wrong images.")
    ] = 0,
    knn: Annotated[bool, typer.Option("--knn/--no-knn", help="Show a cosine kNN beside the head (--cache).")] = True,
    knn_cache: Annotated[
        Path | None, typer.Option("--knn-cache", help="The kNN's training cache (default: the head's own).")
    ] = None,
    root: Annotated[
        Path | None, typer.Option("--root", help="With --cache and --worst: the folder it was extracted from.")
    ] = None,
) -> None:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix on labelled data.

    Also log-loss and expected calibration error at T=1 and at the head's temperature (OUT/reliability.png),
    and, on a cache, a kNN on the same features beside the head.

    Examples:

        rt evaluate cat-head/ --data ./pets-test

        rt evaluate cat-head/ --cache pets-test.h5 --json

        rt evaluate cat-head/ --data ./pets-test --tta tencrop --out eval/
    """
    from .predict import evaluate as run_evaluate

    res = _call(
        run_evaluate,
        model_dir,
        data=data,
        cache=cache,
        tta=tta,
        weights=weights,
        batch_size=batch_size,
        device=device,
        out=out,
        worst=worst,
        knn=knn,
        knn_cache=knn_cache,
        root=root,
    )
    r = res.report
    if as_json:
        _echo_json(r)
    else:
        from .metrics import metrics_rows
        from .report import format_table

        typer.echo(f"accuracy: {r['accuracy']:.4f} ({r['n']} images, {r['source']})")
        if r.get("balanced_accuracy") is not None:
            typer.echo(f"balanced accuracy: {r['balanced_accuracy']:.4f}   macro F1: {r['macro_f1']:.4f}")
        cols, rows = metrics_rows(r)
        typer.echo(format_table(cols, [[str(x) for x in row] for row in rows]))
        typer.echo("confusion matrix (rows: true, columns: predicted):")
        names = [str(c) for c in r["classes"]]
        width = max(len(c) for c in names)
        cells = [[f"{v:5d}" for v in line] for line in r["confusion_matrix"]]
        for c, line in zip(names, cells):
            typer.echo(f"  {c:>{width}} " + " ".join(line))
        from .insights import summary_lines

        for line in summary_lines(r):
            typer.echo(line)
    if res.skipped:
        raise typer.Exit(3)


# ------------------------------------------------------------------------------------- finetune / export


def _epoch_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        typer.echo(f"error: --unfreeze-at {text!r}: give epochs as integers, e.g. 3,6", err=True)
        raise typer.Exit(2) from None


@app.command()
def finetune(
    head_dir: Annotated[
        Path | None,
        typer.Argument(help="A head directory from `rt fit-head` to start from (omit it to start with a fresh head)."),
    ] = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Image folder or CSV manifest to train on.")] = None,
    cache: Annotated[
        Path | None,
        typer.Option("--cache", help="Train on a cache's stage maps (`rt extract --cut layer3`) instead of images."),
    ] = None,
    val: Annotated[
        Path | None,
        typer.Option("--val", help="Held-out validation images (a cache with --cache); default: a split of the data."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The model directory to write.")] = Path("finetuned"),
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Backbone without a head dir (default resnet50).")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option("--weights", "-w", help="Without a head dir: imagenet (default) | none (from scratch) | PATH."),
    ] = None,
    image_size: ImageSizeOpt = None,
    unfreeze: Annotated[
        str,
        typer.Option(
            "--unfreeze",
            "-u",
            help="Train this stage and everything above it: head | layer4 | layer3 | layer2 | layer1 | all | auto "
            "(depth from labelled images per class; the rule is printed).",
        ),
    ] = "layer4",
    schedule: Annotated[
        str, typer.Option("--schedule", help="fixed (all at once) | progressive (one stage at a time from the top).")
    ] = "fixed",
    unfreeze_at: Annotated[
        str | None,
        typer.Option("--unfreeze-at", help="progressive: epoch (0-based) each stage unfreezes, top first, e.g. 3,6."),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", "-e", help="Epochs (early stopping may end sooner).")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Peak AdamW learning rate of the head.")] = 1e-3,
    lr_mult: Annotated[
        float | None,
        typer.Option(
            "--lr-mult", help="Each stage down trains at this times the lr above (default 0.3; 1.0 from scratch)."
        ),
    ] = None,
    lr_schedule: Annotated[str, typer.Option("--lr-schedule", help="cosine | onecycle | constant")] = "cosine",
    warmup_epochs: Annotated[
        float, typer.Option("--warmup-epochs", help="Linear warm-up per newly unfrozen stage.")
    ] = 1.0,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW decay (not on biases/norms).")] = 0.01,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing")] = 0.1,
    color_jitter: Annotated[float, typer.Option("--color-jitter", help="Colour jitter strength (0: off).")] = 0.0,
    crop_scale: Annotated[float, typer.Option("--crop-scale", help="Random-resized-crop minimum area.")] = 0.35,
    hflip: Annotated[
        bool, typer.Option("--hflip/--no-hflip", help="Random horizontal flips (off for digits, text).")
    ] = True,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Stratified validation share.")] = 0.2,
    monitor: Annotated[str, typer.Option("--monitor", help="val_loss | val_acc: picks the best epoch.")] = "val_loss",
    patience: Annotated[
        int, typer.Option("--patience", help="Stop after this many epochs without improvement (0: never).")
    ] = 3,
    probe_epochs: Annotated[
        int | None, typer.Option("--probe-epochs", help="Head-only epochs first (default 1 for a fresh head).")
    ] = None,
    fresh_head: Annotated[bool, typer.Option("--fresh-head", help="Ignore the fitted head's weights.")] = False,
    hidden: Annotated[int, typer.Option("--hidden", help="A fresh head: 0 linear, > 0 MLP hidden units.")] = 0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: DeviceOpt = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto | fp32 | bf16 | fp16")] = "auto",
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", help="DataLoader worker processes for decoding and augmentation (default: by device)."
        ),
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue an interrupted run in this --out directory.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in an --out that holds a run.")] = False,
    sync_bn: Annotated[
        bool,
        typer.Option("--sync-bn", help="Under torchrun on GPUs: SyncBatchNorm in the stages that train."),
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first unreadable image.")] = False,
    bn: Annotated[
        str,
        typer.Option(
            "--bn",
            help="BatchNorm in the stages that train: frozen (keep the pretrained running statistics; scale and "
            "shift still learn) | train (batch statistics) | auto (frozen for pretrained weights, train for "
            "--weights none). Frozen keeps the fitted head's features intact when the backbone starts to move.",
        ),
    ] = "auto",
    checkpoint_every: Annotated[
        int,
        typer.Option(
            "--checkpoint-every",
            help="Write the resume checkpoint (model, optimiser, RNG: ~3x the model's size) every N epochs and "
            "after the last; an interrupted run resumes from the last one written. 0: never (a short run "
            "that is cheaper to redo than to save).",
        ),
    ] = 1,
) -> None:
    """Unfreeze the top of the backbone (or all of it) and train it with the head.

    Starts from a fitted head (`rt fit-head`), so the head is never random when the backbone starts
    moving. Writes a model directory for `rt predict` / `rt evaluate` / `rt export` (its backbone also
    works as `--weights DIR`), with report.json, curves.png and per-epoch checkpoints. Defaults and the
    `auto` rule: docs/finetune.md. Images that cannot be read are skipped, listed in report.json, and make
    the exit code 3 (--strict: fail instead).

    Examples:

        rt finetune cat-head/ --data ./pets --unfreeze layer4 --epochs 5 --out cat-l4/

        rt finetune cat-head/ --data ./pets --unfreeze layer3 --schedule progressive --epochs 9 --out cat-l3/

        rt finetune cat-head/ --data ./pets --unfreeze auto --out cat-auto/

        rt finetune cat-head/ --cache pets-l3.h5 --unfreeze layer4 --out cat-fast/

        rt finetune --data ./digits --model resnet18 --weights none --unfreeze all --out src/

        rt finetune --resume cat-l3/
    """
    from .finetune import FinetuneConfig
    from .finetune import finetune as run_finetune

    if resume is not None:
        _exit_3_if_skipped(_call(run_finetune, FinetuneConfig(out=resume), resume=resume))
        return
    cfg = FinetuneConfig(
        out=out,
        head=head_dir,
        data=data,
        cache=cache,
        val=val,
        model=model,
        weights=weights,
        image_size=image_size,
        unfreeze=unfreeze,
        schedule=schedule,
        unfreeze_at=_epoch_list(unfreeze_at),
        probe_epochs=probe_epochs,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_mult=lr_mult,
        lr_schedule=lr_schedule,
        warmup_epochs=warmup_epochs,
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        color_jitter=color_jitter,
        crop_scale=crop_scale,
        hflip=hflip,
        val_fraction=val_fraction,
        monitor=monitor,
        patience=patience,
        fresh_head=fresh_head,
        hidden=hidden,
        seed=seed,
        device=device,
        precision=precision,
        workers=workers,
        overwrite=overwrite,
        sync_bn=sync_bn,
        strict=strict,
        checkpoint_every=checkpoint_every,
        bn=bn,
    )
    _exit_3_if_skipped(_call(run_finetune, cfg))


def _exit_3_if_skipped(result: Any) -> None:
    from .distributed import launched

    if result.skipped and not launched():  # torchrun reports any non-zero exit as a crashed worker
        raise typer.Exit(3)


@app.command()
def export(
    model_dir: Annotated[Path, typer.Argument(help="A model directory from `rt finetune` (or a head directory).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="torchscript | onnx")] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="File to write (default: MODEL_DIR/model.onnx or .torchscript.pt)."),
    ] = None,
) -> None:
    """Write the whole classifier (backbone + head) as one file for serving without this package.

    Input: RGB in [0, 1], N x 3 x S x S (normalisation is inside); output: logits. A JSON sidecar next to
    the file records the resize/crop to apply first and the class names. The file is reloaded and
    compared with the original before the command succeeds.

    Examples:

        rt export cat-l4/ --format onnx

        rt export cat-l4/ --format torchscript --out serve/cat.pt
    """
    from .export import export_model

    _call(export_model, model_dir, fmt, out)


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


# ------------------------------------------------------------------- cache tools: suggest / audit / curve
# (h-tools; self-contained block: the library calls live in suggest.py, audit.py, curve.py)


def _int_list(text: str, option: str) -> list[int]:
    """``"5,10,all"`` -> ``[5, 10, 0]`` (0 = all rows); a bad entry is a usage error naming ``option``."""
    try:
        return [0 if x.lower() == "all" else int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        typer.echo(f"error: {option} {text!r}: give integers separated by commas, e.g. 5,10,20", err=True)
        raise typer.Exit(2) from None


@app.command()
def suggest(
    head: Annotated[Path, typer.Option("--head", help="The head directory that scores the pool.")],
    pool: Annotated[
        Path,
        typer.Option(
            "--pool",
            help="Unlabelled images: a cache (its rows with an empty label), or a folder / manifest of images "
            "(extracted first; only images not cached yet are computed).",
        ),
    ],
    n: Annotated[int, typer.Option("-n", "--n", help="How many images to suggest.")] = 50,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The CSV manifest to write (path,label with empty labels).")
    ] = Path("to-label.csv"),
    strategy: Annotated[str, typer.Option("--strategy", help="Uncertainty: margin | entropy | least.")] = "margin",
    candidates: Annotated[
        float, typer.Option("--candidates", help="Diversify among the candidates x n most uncertain images.")
    ] = 5.0,
    root: Annotated[
        Path | None, typer.Option("--root", help="Folder the pool cache's paths are relative to (its --data).")
    ] = None,
    pool_cache: Annotated[
        Path | None, typer.Option("--pool-cache", help="Where a folder/manifest pool is cached (default OUT.pool.h5).")
    ] = None,
    sheet: Annotated[bool, typer.Option("--sheet/--no-sheet", help="Also write OUT.png, the picks as a grid.")] = True,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the clustering.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the suggestions as JSON.")] = False,
) -> None:
    """Which unlabelled images to label next: the most uncertain, spread over the feature space.

    Writes a CSV manifest to fill in (paths relative to it), OUT.json with the scores and OUT.png.
    After labelling: `rt extract --data OUT` (the cache reuses the pool's rows).

    Examples:

        rt suggest --head cat-head/ --pool unlabelled.h5 -n 50 --out to-label.csv

        rt suggest --head cat-head/ --pool ./new-photos -n 20
    """
    from .suggest import SuggestConfig
    from .suggest import suggest as run_suggest

    cfg = SuggestConfig(
        head=head,
        pool=pool,
        out=out,
        n=n,
        strategy=strategy,
        candidates=candidates,
        root=root,
        pool_cache=pool_cache,
        sheet=sheet,
        seed=seed,
    )
    res = _call(run_suggest, cfg)
    if as_json:
        _echo_json(res.rows)


@app.command()
def audit(
    cache: Annotated[Path, typer.Option("--cache", "-c", help="The labelled training cache to audit.")],
    test: Annotated[Path | None, typer.Option("--test", help="A test cache: look for train/test leakage.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for audit.json and audit.png.")] = Path("audit"),
    near: Annotated[
        float, typer.Option("--near", help="Cosine (mean-centred features) from which two images are near duplicates.")
    ] = 0.95,
    top: Annotated[int, typer.Option("--top", help="Findings shown per kind.")] = 10,
    root: Annotated[Path | None, typer.Option("--root", help="Folder --cache's paths are relative to.")] = None,
    test_root: Annotated[
        Path | None, typer.Option("--test-root", help="Folder --test's paths are relative to.")
    ] = None,
    sheet: Annotated[bool, typer.Option("--sheet/--no-sheet", help="Write audit.png of the images found.")] = True,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the cross-validation folds.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Audit a dataset from its cache: exact and near duplicates, train/test leakage, likely label errors,
    class imbalance and outliers. Writes OUT/audit.json and OUT/audit.png (the images in question).

    Examples:

        rt audit --cache pets.h5 --test pets-test.h5

        rt audit --cache pets.h5 --near 0.9 --out audit/ --json
    """
    from .audit import AuditConfig
    from .audit import audit as run_audit

    cfg = AuditConfig(
        cache=cache,
        test=test,
        out=out,
        near_threshold=near,
        top=top,
        root=root,
        test_root=test_root,
        sheet=sheet,
        seed=seed,
    )
    res = _call(run_audit, cfg)
    if as_json:
        _echo_json(res.report)


@app.command()
def curve(
    train: Annotated[Path, typer.Option("--train", help="Labelled training cache to draw k-subsets from.")],
    test: Annotated[Path, typer.Option("--test", help="Labelled test cache (same backbone and classes).")],
    k: Annotated[str, typer.Option("--k", help="Images per class, comma-separated; `all` = every row.")] = "5,10,20,50",
    seeds: Annotated[int, typer.Option("--seeds", help="Draws of each k-subset (the interval is over them).")] = 10,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for curve.json and curve.png.")] = Path("curve"),
    l2: Annotated[
        float | None, typer.Option("--l2", help="Fixed L2 of the probe (default: chosen per fit, as fit-head).")
    ] = None,
    knn: Annotated[bool, typer.Option("--knn/--no-knn", help="Also the cosine kNN baseline.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Label-efficiency curve: test accuracy of the linear probe (and a kNN) against labelled images per
    class, mean and 95% t-interval over seeds of the k-subset. Head fits only: seconds.

    Examples:

        rt curve --train pets.h5 --test pets-test.h5 --k 5,10,20,50 --seeds 10

        rt curve --train pets.h5 --test pets-test.h5 --k 1,2,5,all --seeds 20 --out curve/
    """
    from .curve import CurveConfig
    from .curve import curve as run_curve

    cfg = CurveConfig(train=train, test=test, ks=_int_list(k, "--k"), seeds=seeds, out=out, l2=l2, knn=knn)
    res = _call(run_curve, cfg)
    if as_json:
        _echo_json(res.report)
