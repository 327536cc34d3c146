"""What one `rt finetune` run is: its typed configuration (:class:`FinetuneConfig`, what the CLI builds), the
live objects of a run (:class:`Run`) and the state carried from epoch to epoch (:class:`TrainState`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """What the loop carries from epoch to epoch (saved in every checkpoint as JSON)."""

    epoch: int = 0  # the next epoch to run
    best: float | None = None  # the monitored value of the candidate kept so far
    best_seen: float | None = None  # the best monitored value seen (held-back epochs too): early stopping
    best_epoch: int = -1  # -1: the start (validated before any step; :func:`training.validate_start`)
    bad: int = 0  # epochs without improvement since the best (or the latest unfreeze)
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable images met so far: path -> reason
    precision: str | None = None  # the train step's precision (auto: chosen once, kept on resume)
    precision_choice: dict[str, Any] = field(default_factory=dict)  # how it was chosen (report.json)
    start: dict[str, Any] | None = None  # the starting point's validation (val_loss, val_acc): a candidate
    lr_find: dict[str, Any] | None = None  # --lr-find: the range test's curve and the rate chosen (lr_find.py)
    start_losses: list[float] | None = None  # the start's per-image validation losses (the paired test)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        d = json.loads(text)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# what picks the best of the start and the epochs (training.track_best, depth_search): lower is better but for val_acc
MONITORS = ("val_loss_cal", "val_loss", "val_acc")


def monitor_beats(monitor: str, value: float, than: float) -> bool:
    """Whether ``value`` of ``monitor`` is better than ``than`` (higher for val_acc, lower for the losses)."""
    return value > than if monitor == "val_acc" else value < than


CHECKPOINT_DIR = "checkpoints"
TRIALS_DIR = "trials"  # `--unfreeze auto`: the deeper candidate (depth_search.py)


# ------------------------------------------------------------------------------------------------ config


@dataclass
class FinetuneConfig:
    """Everything `rt finetune` needs; the CLI fills it from its options. ``None`` means "the default
    explained in docs/finetune.md" (several depend on the starting point)."""

    out: Path
    head: Path | None = None  # a head directory from `rt fit-head` (or a finetuned model directory)
    data: Path | None = None  # image folder or CSV manifest
    cache: Path | None = None  # a cache with stages/<cut> maps: cached-stage training
    val: Path | None = None  # a held-out folder/manifest (or, with cache, a cache); else a split of the data
    model: str | None = None  # without head/cache: default resnet50
    weights: str | None = None  # without head/cache: default imagenet
    image_size: int | None = None
    unfreeze: str = "layer4"  # head | a stage name | all | auto
    schedule: str = "fixed"  # fixed | progressive
    unfreeze_at: list[int] | None = None  # progressive: the epoch each stage (top-down) unfreezes
    probe_epochs: int | None = None  # head-only epochs first (default: 1 for a fresh head on pretrained weights)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3  # the head's (AdamW); stages below get lr * lr_mult**depth
    lr_find: bool = False  # choose lr by a range test first (lr_find.py); lr is then the suggestion
    lr_mult: float | None = None  # default 0.3 (pretrained) / 1.0 (random init)
    lr_schedule: str = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 1.0
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    color_jitter: float = 0.0
    crop_scale: float = 0.35  # RandomResizedCrop minimum area fraction
    hflip: bool = True  # random horizontal flips (off for digits, text: their mirror image is another thing)
    val_fraction: float = 0.2
    monitor: str = "val_loss_cal"  # val_loss_cal | val_loss | val_acc (MONITORS; docs/finetune.md)
    start_margin: float = 1.0  # an epoch replaces the start only when better by this many standard errors
    patience: int = 3  # epochs without improvement before stopping (0: never stop early)
    fresh_head: bool = False
    hidden: int = 0  # a fresh head: 0 = linear, > 0 = MLP with this many hidden units
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: str = "auto"  # the train step: auto | on | off (step.py)
    workers: int | None = None
    overwrite: bool = False
    sync_bn: bool = False  # under torchrun on CUDA: SyncBatchNorm in the stages that train (distributed.py)
    strict: bool = False  # fail on the first unreadable image (default: skip it, list it in report.json)
    checkpoint_every: int | str = "auto"  # the resume checkpoint: auto | every N epochs (and the last); 0: never
    bn: str = "auto"  # BatchNorm of the training stages: frozen statistics | train (batch statistics) | auto

    def to_json(self) -> str:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FinetuneConfig:
        d = json.loads(text)
        for k in ("out", "head", "data", "cache", "val"):
            if d.get(k) is not None:
                d[k] = Path(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ------------------------------------------------------------------------------------------------- state


@dataclass
class Run:
    """The live objects of one run: what ``train_one_epoch``, ``validate`` and the checkpoints work on."""

    cfg: FinetuneConfig
    start: Any  # Start: backbone, head source, auto reason
    feeding: Any  # feeds.Feeding: the feed, classes, cut
    model: Any  # classifier.Classifier
    policy: Any  # freeze.FreezePolicy
    target: str
    optimizer: Any
    scheduler: Any
    scaler: Any
    generator: Any  # draws the training order and augmentations; checkpointed
    train_forward: Any  # the model, through DDP under torchrun
    device: Any
    precision: str
    state: TrainState = field(default_factory=TrainState)
    best_state: dict[str, Any] | None = None  # the best epoch's weights (a copy), on disk at the next checkpoint
    calibration: dict[str, Any] | None = None  # the temperature refitted for the final weights (recalibrate)
    best_saved: bool = True  # best.pt holds best_state
    val_losses: Any = None  # the latest validation's per-image values of the monitor (training.validate)

    @property
    def feed(self) -> Any:
        return self.feeding.feed

    @property
    def ck_dir(self) -> Path:
        return Path(self.cfg.out) / CHECKPOINT_DIR
