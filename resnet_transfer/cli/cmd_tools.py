"""`rt suggest`, `rt audit`, `rt curve`, `rt compare`: what the cache makes cheap."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import common


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
        Path | None,
        typer.Option(
            "--root",
            help="Folder the pool cache's paths are relative to (its --data) (default: the folder the cache records, or found next to it).",
        ),
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
    from ..tools import SuggestConfig
    from ..tools import suggest as run_suggest

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
    res = common.call(run_suggest, cfg)
    if as_json:
        common.echo_json(res.rows)


def audit(
    cache: Annotated[Path, typer.Option("--cache", "-c", help="The labelled training cache to audit.")],
    test: Annotated[Path | None, typer.Option("--test", help="A test cache: look for train/test leakage.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for audit.json and audit.png.")] = Path("audit"),
    near: Annotated[
        float, typer.Option("--near", help="Cosine (mean-centred features) from which two images are near duplicates.")
    ] = 0.95,
    top: Annotated[int, typer.Option("--top", help="Findings shown per kind.")] = 10,
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            help="Folder --cache's paths are relative to (default: the folder the cache records, or found next to it).",
        ),
    ] = None,
    test_root: Annotated[
        Path | None,
        typer.Option(
            "--test-root",
            help="Folder --test's paths are relative to (default: the folder the cache records, or found next to it).",
        ),
    ] = None,
    sheet: Annotated[bool, typer.Option("--sheet/--no-sheet", help="Write audit.png of the images found.")] = True,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the cross-validation folds.")] = 0,
    search: Annotated[str, typer.Option("--search", help=common.SEARCH_HELP)] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Audit a dataset from its cache: exact and near duplicates, train/test leakage, likely label errors,
    class imbalance and outliers. Writes OUT/audit.json and OUT/audit.png (the images in question).

    Examples:

        rt audit --cache pets.h5 --test pets-test.h5

        rt audit --cache pets.h5 --near 0.9 --out audit/ --json
    """
    from ..tools import AuditConfig
    from ..tools import audit as run_audit

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
        search=search,
    )
    res = common.call(run_audit, cfg)
    if as_json:
        common.echo_json(res.report)


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
    knn_search: common.KnnSearchOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Label-efficiency curve: test accuracy of the linear probe (and a kNN) against labelled images per
    class, mean and 95% t-interval over seeds of the k-subset. Head fits only: seconds.

    Examples:

        rt curve --train pets.h5 --test pets-test.h5 --k 5,10,20,50 --seeds 10

        rt curve --train pets.h5 --test pets-test.h5 --k 1,2,5,all --seeds 20 --out curve/
    """
    from ..tools import CurveConfig
    from ..tools import curve as run_curve

    cfg = CurveConfig(
        train=train,
        test=test,
        ks=common.int_list(k, "--k"),
        seeds=seeds,
        out=out,
        l2=l2,
        knn=knn,
        knn_search=knn_search,
    )
    res = common.call(run_curve, cfg)
    if as_json:
        common.echo_json(res.report)


def compare(
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Labelled images: a folder (one sub-folder per class) or manifest.")
    ],
    models: Annotated[
        str,
        typer.Option(
            "--models",
            help="Candidates, comma-separated, each NAME[=WEIGHTS]: WEIGHTS is `imagenet` (default: the pretrained "
            "weights), `none` (random init), or a checkpoint PATH (.pth/.safetensors or a directory rt wrote).",
        ),
    ] = "resnet18,resnet50",
    test: Annotated[
        Path | None,
        typer.Option("--test", help="Held-out labelled images (default: a stratified split of --data, recorded)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for compare.json, compare.md, compare.png.")] = Path(
        "compare"
    ),
    work: Annotated[
        Path | None, typer.Option("--work", help="Where the candidates' caches live (default OUT/work); reused.")
    ] = None,
    k: Annotated[
        str, typer.Option("--k", help="Images per class of the curves, comma-separated; the largest is the headline.")
    ] = "5,10,20,50",
    seeds: Annotated[int, typer.Option("--seeds", help="Draws of each k-subset (the interval is over them).")] = 10,
    image_size: common.ImageSizeOpt = None,
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Without --test: the share of each class held out.")
    ] = 0.2,
    split_seed: Annotated[int, typer.Option("--split-seed", help="Without --test: the seed of the split.")] = 0,
    l2: Annotated[float | None, typer.Option("--l2", help="Fixed L2 of the probe (default: chosen per fit).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 32,
    device: common.DeviceOpt = "auto",
    precision: Annotated[
        str, typer.Option("--precision", help="auto | fp32 | bf16 | fp16 | int8, as `rt extract --precision`.")
    ] = "auto",
    compile: common.CompileOpt = "auto",
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write compare.png.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print compare.json.")] = False,
) -> None:
    """Which backbone for these images, measured on them: each candidate is extracted once (cached under
    --work; a rerun computes nothing, a new candidate only itself), then scored on the same split, k-subsets
    and seeds: probe test accuracy with its 95% interval and the label-efficiency curve, LogME, and its cost
    here (extract images/s, parameters, feature size, cache size). Recommends the fastest candidate whose
    interval overlaps the best one's, with the figures that say why. Ctrl-C, then the same command, resumes.

    Examples:

        rt compare --data ./pets --models resnet18,resnet50,convnext_tiny --out compare/

        rt compare --data ./pets --test ./pets-test --models resnet18,resnet18=none,resnet18=runs/source --k 5,20
    """
    options = dict(locals())
    from ..tools import CompareConfig
    from ..tools import compare as run_compare

    cfg = common.build(
        CompareConfig,
        options,
        cli_only=("k", "as_json", "models"),
        models=[m for m in models.split(",") if m.strip()],
        ks=common.int_list(k, "--k"),
    )
    res = common.call(run_compare, cfg)
    if as_json:
        common.echo_json(res.report)
