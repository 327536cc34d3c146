"""`rt finetune` and `rt export`: unfreeze and train, then write a servable file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import common
from .common import DeviceOpt, ImageSizeOpt

UnfreezeOpt = Annotated[
    str,
    typer.Option(
        "--unfreeze",
        "-u",
        help="Train this stage and everything above it: head | layer4 | layer3 | layer2 | layer1 | all | auto "
        "(depth from labelled images per class, the rule printed; then, with >= 50 validation images and time "
        "for it, one stage deeper is trained too and the better on validation kept: report.json "
        "unfreeze_search, the other in OUT/trials/).",
    ),
]
MonitorOpt = Annotated[
    str,
    typer.Option(
        "--monitor",
        help="Picks the best of the start and the epochs: val_loss_cal (the loss after each one's own "
        "temperature, as the model handed back is calibrated) | val_loss | val_acc.",
    ),
]
StartMarginOpt = Annotated[
    float,
    typer.Option(
        "--start-margin",
        help="An epoch replaces the starting head only when it validates better by more than this many "
        "standard errors of the per-image difference (0: any gain).",
    ),
]
BnOpt = Annotated[
    str,
    typer.Option(
        "--bn",
        help="BatchNorm in the stages that train: frozen (keep the pretrained running statistics; scale and "
        "shift still learn) | train (batch statistics) | auto (frozen for pretrained weights, train for "
        "--weights none) | adapt (batch statistics in the frozen stages too: their running statistics move to "
        "the target's, their weights stay). Frozen keeps the fitted head's features intact when the backbone "
        "starts to move.",
    ),
]
CheckpointEveryOpt = Annotated[
    str,
    typer.Option(
        "--checkpoint-every",
        help="When to write the resume checkpoint (model, optimiser, RNG: ~3x the model's size): auto (after "
        "an epoch once 60 s of training went unsaved, after the last, and on Ctrl-C between epochs) | N "
        "(every N epochs and after the last) | 0 (never). An interrupted run resumes from the last one.",
    ),
]
HeadDirArg = Annotated[
    Path | None,
    typer.Argument(
        help="A head directory from `rt fit-head` to start from. Omitted, on pretrained weights: the probe is "
        "fitted first, in this process (extract + fit-head into OUT/start); --fresh-head: a fresh head."
    ),
]


def finetune(
    head_dir: HeadDirArg = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help=common.DATA_HELP)] = None,
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
    unfreeze: UnfreezeOpt = "layer4",
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
    lr_find: Annotated[
        bool, typer.Option("--lr-find", help="Choose --lr by a range test first (fastai's lr_find): lr_find.png.")
    ] = False,
    lr_mult: Annotated[
        float | None, typer.Option("--lr-mult", help="Each stage down: this x the lr above (0.3; 1.0 from scratch).")
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
    monitor: MonitorOpt = "val_loss_cal",
    start_margin: StartMarginOpt = 1.0,
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
    compile: common.TrainCompileOpt = "auto",
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
    bn: BnOpt = "auto",
    checkpoint_every: CheckpointEveryOpt = "auto",
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
    options = dict(locals())
    from ..finetuning import FinetuneConfig
    from ..finetuning import finetune as run_finetune

    if resume is not None:
        common.exit_3_if_skipped(common.call(run_finetune, FinetuneConfig(out=resume), resume=resume))
        return
    cfg = common.build(
        FinetuneConfig,
        options,
        cli_only=("head_dir", "resume"),
        head=head_dir,
        unfreeze_at=common.epoch_list(unfreeze_at),
    )
    common.exit_3_if_skipped(common.call(run_finetune, cfg))


def export(
    model_dir: Annotated[Path, typer.Argument(help="A model directory from `rt finetune` (or a head directory).")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="onnx | torchscript | timm (a timm model folder)")
    ] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="File to write (default: MODEL_DIR/model.onnx or .torchscript.pt; timm: MODEL_DIR/timm/).",
        ),
    ] = None,
) -> None:
    """Write the whole classifier (backbone + head) as one file for serving without this package.

    Input: RGB in [0, 1], N x 3 x S x S (normalisation is inside); output: logits. A JSON sidecar next to
    the file records the resize/crop to apply first and the class names. The file is reloaded and
    compared with the original before the command succeeds.

    --format timm writes a folder in timm's own layout (config.json with the preprocessing and class names,
    model.safetensors): timm.create_model("local-dir:DIR", pretrained=True) loads it, and
    huggingface_hub.upload_folder publishes it (then "hf-hub:user/name"). Linear heads only.

    Examples:

        rt export cat-l4/ --format onnx

        rt export cat-l4/ --format timm --out cat-timm/

        rt export cat-l4/ --format torchscript --out serve/cat.pt
    """
    from ..models import ExportConfig
    from ..models import export as run_export

    common.call(run_export, ExportConfig(model_dir=model_dir, format=fmt, out=out))
