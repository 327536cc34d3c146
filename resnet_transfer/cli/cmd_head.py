"""`rt fit-head`, `rt predict`, `rt evaluate`: fit a head on a cache and use it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import common
from .common import CompileOpt, DeviceOpt, HeadWeightsOpt, TtaOpt


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
    head_type: Annotated[
        str,
        typer.Option(
            "--head",
            help="`auto`: fit the linear probe and fastai's MLP head (BatchNorm, dropout, 512 hidden, one-cycle "
            "AdamW) and keep the one that validates better; `linear`; `mlp`.",
        ),
    ] = "auto",
    solver: Annotated[
        str | None,
        typer.Option(
            "--solver",
            help="`lbfgs` (full batch, L2 chosen on validation; the linear head's), `adamw` (minibatch, early "
            "stopping; streams caches too large for memory), `onecycle` (the MLP head's) or `sklearn`.",
        ),
    ] = None,
    l2: Annotated[float | None, typer.Option("--l2", help="Fixed L2 (default: chosen on validation).")] = None,
    hidden: Annotated[int | None, typer.Option("--hidden", help="Hidden units of an MLP head (0: linear).")] = None,
    dropout: Annotated[float | None, typer.Option("--dropout", help="Dropout of the MLP's hidden layer.")] = None,
    class_weight: Annotated[
        str, typer.Option("--class-weight", help="`none` or `balanced` (weights n / (k * n_class) for imbalance).")
    ] = "none",
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Label smoothing in [0, 1).")] = 0.0,
    max_iter: Annotated[int | None, typer.Option("--max-iter", help="L-BFGS iterations (default: by size).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="adamw: max epochs (100); mlp: 30.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Minibatch (adamw 256, mlp 64).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate (adamw 1e-3; mlp peak 2e-3).")] = None,
    patience: Annotated[int | None, typer.Option("--patience", help="adamw: epochs without gain (5).")] = None,
    max_memory_gb: Annotated[
        float | None,
        typer.Option("--max-memory-gb", help="Stream from the cache (AdamW) above this much feature memory."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing head in --out.")] = False,
    knn_search: common.KnnSearchOpt = "auto",
    ood: Annotated[
        Path | None,
        typer.Option(
            "--ood",
            help="A few images of none of the classes (folder or cache): keep the scorer that separates them best.",
        ),
    ] = None,
    views: common.ViewsOpt = None,
    hflip: common.ViewsFlipOpt = True,
    root: common.ViewsRootOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Train a softmax head on cached features (seconds; the images are not touched again, unless --views).

    The head is the linear probe or fastai's MLP head, whichever validates better (`--head auto`; with
    few validation rows, by 5-fold cross-validation); it is the start of every `rt finetune`.

    Writes OUT/ with meta.json (backbone identity, classes), head.safetensors, report.json (accuracy,
    per-class precision/recall/F1, confusion matrix, chosen L2, time) and confusion.png.

    Examples:

        rt fit-head --cache pets.h5 --out cat-head/

        rt fit-head --cache pets.h5 --classes 3 --class-weight balanced --out cat-head/

        rt fit-head --cache pets.h5 --head mlp --out mlp-head/

        rt fit-head --cache pets.h5 --val pets-val.h5 --hidden 256 --solver adamw --out mlp-head/

        rt fit-head --cache pets.h5 --features layer3+layer4 --out stage-head/

        rt fit-head --cache pets.h5 --ood ./not-pets --out cat-head/

        rt fit-head --cache digits.h5 --views 8 --no-hflip --out digit-head/
    """
    from ..head import FitHeadConfig
    from ..head import fit_head as run_fit_head

    cw = None if class_weight.lower() == "none" else class_weight.lower()
    given = dict(solver=solver, l2=l2, hidden=hidden, dropout=dropout, epochs=epochs, batch_size=batch_size, lr=lr)
    given["patience"] = patience  # only the head parameters set on the command line go to the estimator
    # the config is built inside call: a bad option (--head, --knn-search) is the one-line error, exit 2
    kwargs = dict(cache=cache, out=out, classes=classes, val=val, val_fraction=val_fraction, seed=seed,
                  features=features, head_type=head_type, class_weight=cw, label_smoothing=label_smoothing,
                  max_iter=max_iter, max_memory_gb=max_memory_gb, overwrite=overwrite, knn_search=knn_search,
                  ood=ood, hflip=hflip, root=root)  # fmt: skip
    kwargs.update({k: v for k, v in {**given, "views": views}.items() if v is not None})
    result = common.call(lambda: run_fit_head(FitHeadConfig(**kwargs)))
    if as_json:
        common.echo_json(result.report)


def predict(
    model_dir: Annotated[Path, typer.Argument(help="A head directory (`rt fit-head`) or model (`rt finetune`).")],
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Image files, folders, or CSV manifests; or one .zip/.tar, WebDataset shards, saved dataset or Parquet."
        ),
    ],
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
    reject_unknown: Annotated[
        bool,
        typer.Option("--reject-unknown", help="Print `unknown` as the prediction of images unlike the training data."),
    ] = False,
    ood_threshold: Annotated[
        float | None,
        typer.Option(
            "--ood-threshold", help="Out-of-distribution score above which an image is unknown (default: the head's)."
        ),
    ] = None,
    ood_scorer: common.OodScorerOpt = None,
) -> None:
    """Classify new images with a fitted head (or finetuned model).

    Unreadable images are skipped and listed (exit code 3), never fatal.

    Examples:

        rt predict cat-head/ photo1.jpg photo2.png --top 3

        rt predict cat-head/ ./new-photos --tta flip --csv > predictions.csv

        rt predict cat-head/ ./new-photos --reject-unknown
    """
    options = dict(locals())
    from ..models import PredictConfig
    from ..models import predict as run_predict

    if as_json and as_csv:
        typer.echo("error: choose one of --json and --csv", err=True)
        raise typer.Exit(2)
    cfg = common.build(PredictConfig, options, cli_only=("as_json", "as_csv"), inputs=list(inputs))
    res = common.call(run_predict, cfg)
    from .predictions import print_predictions

    marked = min_confidence is not None or reject_unknown  # a `prediction` column: class, uncertain or unknown
    print_predictions(res, "json" if as_json else "csv" if as_csv else "table", top, marked)
    if res.skipped:
        raise typer.Exit(3)


def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="A head directory (`rt fit-head`) or model (`rt finetune`).")],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            "-d",
            help="Labelled images: a folder of class folders, a CSV, a .zip/.tar of class folders, WebDataset shards, a save_to_disk dataset or Parquet.",
        ),
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
    knn_search: common.KnnSearchOpt = "auto",
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            help="With --cache and --worst: the folder it was extracted from (default: the folder the cache records, or found next to it).",
        ),
    ] = None,
    ood: Annotated[
        Path | None,
        typer.Option("--ood", help="Images of none of the classes (folder or cache): AUROC / FPR95 of each scorer."),
    ] = None,
    ood_scorer: common.OodScorerOpt = None,
) -> None:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix on labelled data.

    Also log-loss and expected calibration error at T=1 and at the head's temperature (OUT/reliability.png),
    and, on a cache, a kNN on the same features beside the head.

    Examples:

        rt evaluate cat-head/ --data ./pets-test

        rt evaluate cat-head/ --cache pets-test.h5 --json

        rt evaluate cat-head/ --data ./pets-test --tta tencrop --out eval/

        rt evaluate cat-head/ --data ./pets-test --ood ./not-pets --out eval/
    """
    options = dict(locals())
    from ..models import EvaluateConfig
    from ..models import evaluate as run_evaluate

    res = common.call(run_evaluate, common.build(EvaluateConfig, options, cli_only=("as_json",)))
    r = res.report
    if as_json:
        common.echo_json(r)
    else:
        from ..base import format_table, metrics_rows

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
        from ..models import ood_summary_lines, summary_lines

        for line in summary_lines(r) + ood_summary_lines(r.get("ood")):
            typer.echo(line)
    if res.skipped:
        raise typer.Exit(3)
