"""`rt finetune`: unfreeze the top of the backbone (or all of it) and train it with the head.

The pieces, each small enough to test on its own:

* :class:`FreezePolicy` decides *which* parts train, *from which epoch* and *at what learning rate*
  (Lightning's ``BaseFinetuning`` idea as one object): the head at ``lr``, the top stage at ``lr * lr_mult``,
  the next at ``lr * lr_mult**2`` ... Frozen parts have ``requires_grad=False`` and are kept in eval mode
  (BatchNorm running statistics do not drift) even while the rest of the model trains.
* :func:`lr_factor` is the learning-rate shape (cosine with warm-up, or one-cycle), applied per stage from
  the step that stage is unfrozen, so a stage unfrozen late still gets its own warm-up.
* :func:`finetune` is the visible training loop: build -> (resume) -> for each epoch: unfreeze what is due,
  train, validate, early-stopping bookkeeping, checkpoint -> write the model directory.

With ``cache`` (a cache holding ``stages/<cut>`` maps from ``rt extract --cut``) the loop feeds those maps to
the part of the network after the cut (``Backbone.split(cut)``'s ``rest``): no image decoding, no frozen stages.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import stratified_split
from .distributed import all_reduce_sums, is_main, loader_args, rank_part
from .errors import DataError, IdentityMismatch, RtError, UsageError
from .fsutil import atomic_path, atomic_write_json
from .report import get_reporter

CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.pt"
BEST_CKPT = "best.pt"
CKPT_FORMAT = "resnet_transfer.finetune-checkpoint"
CKPT_VERSION = 1
CURVES_PNG = "curves.png"
REPORT_JSON = "report.json"

# `--unfreeze auto`: labelled images per class (median over classes) -> how many stages from the top train.
# Below the first threshold only the head trains; at or above the last one everything does.
AUTO_RULE: tuple[tuple[int, int], ...] = ((50, 0), (200, 1), (500, 2), (1000, 3))
AUTO_RULE_TEXT = (
    "median labelled images per class: < 50 -> head only; 50-199 -> top stage (layer4); 200-499 -> top two "
    "(layer3); 500-999 -> top three (layer2); >= 1000 -> all; a randomly initialised backbone (--weights none) "
    "-> all"
)


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
    lr_mult: float | None = None  # default 0.3 (pretrained) / 1.0 (random init)
    lr_schedule: str = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 1.0
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    color_jitter: float = 0.0
    crop_scale: float = 0.35  # RandomResizedCrop minimum area fraction
    hflip: bool = True  # random horizontal flips (off for digits, text: their mirror image is another thing)
    val_fraction: float = 0.2
    monitor: str = "val_loss"  # val_loss | val_acc
    patience: int = 3  # epochs without improvement before stopping (0: never stop early)
    fresh_head: bool = False
    hidden: int = 0  # a fresh head: 0 = linear, > 0 = MLP with this many hidden units
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    overwrite: bool = False
    sync_bn: bool = False  # under torchrun on CUDA: SyncBatchNorm in the stages that train (distributed.py)

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


@dataclass
class FinetuneResult:
    out: Path
    epochs_run: int
    best_epoch: int
    best: dict[str, float]
    stopped_early: bool
    unfreeze: str
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- freeze policy


@dataclass
class StagePlan:
    """One part of the model: ``depth`` 0 is the head, 1 the top stage ...; ``start`` the epoch it starts
    training (``None``: frozen throughout); ``lr`` its peak learning rate."""

    name: str
    modules: list[Any]
    depth: int
    start: int | None
    lr: float

    def parameters(self) -> list[Any]:
        return [p for m in self.modules for p in m.parameters()]


def unfreeze_choices(stages: Sequence[str]) -> list[str]:
    """Valid ``--unfreeze`` values for a model with these stages (top first)."""
    return ["head", *reversed(list(stages)), "all", "auto"]


class FreezePolicy:
    """Which modules train, from which epoch, at which learning rate.

    ``stage_groups`` is :meth:`Backbone.stage_groups` (input to output, then ``head``); ``head`` the
    :class:`HeadModule`. ``target`` is ``head`` (only the head trains), a stage (that stage and everything
    after it train) or ``all``. ``schedule="fixed"`` unfreezes every target stage at ``probe_epochs``;
    ``"progressive"`` one stage at a time from the top at ``unfreeze_at`` (default: evenly spread over
    ``epochs``). Stage ``depth`` d trains at ``lr * lr_mult**d``."""

    def __init__(
        self,
        stage_groups: Sequence[tuple[str, list[Any]]],
        head: Any,
        target: str,
        schedule: str = "fixed",
        epochs: int = 10,
        unfreeze_at: Sequence[int] | None = None,
        lr: float = 1e-3,
        lr_mult: float = 0.3,
        probe_epochs: int = 0,
    ) -> None:
        groups = list(stage_groups)
        if not groups or groups[-1][0] != "head":
            raise ValueError("stage_groups must end with the 'head' group")
        stages = [name for name, _ in groups[:-1]]
        if target not in ("head", "all", *stages):
            raise UsageError(
                f"--unfreeze {target!r} is not a stage of this model",
                f"use one of: {', '.join(unfreeze_choices(stages))}",
            )
        if schedule not in ("fixed", "progressive"):
            raise UsageError(f"--schedule {schedule!r} is not known", "use fixed or progressive")
        if lr <= 0 or lr_mult <= 0:
            raise UsageError(f"--lr {lr} and --lr-mult {lr_mult} must be positive")
        top_down = list(reversed(groups[:-1]))  # layer4, layer3, ...
        n_train = 0 if target == "head" else len(stages) if target == "all" else stages[::-1].index(target) + 1
        starts = self._starts(n_train, schedule, epochs, unfreeze_at, probe_epochs, [n for n, _ in top_down])
        self.target = target
        self.schedule = schedule
        self.epochs = epochs
        self.plans: list[StagePlan] = [StagePlan("head", [head, *groups[-1][1]], 0, 0, lr)]
        for d, (name, modules) in enumerate(top_down, start=1):
            start = starts[d - 1] if d <= n_train else None
            self.plans.append(StagePlan(name, list(modules), d, start, lr * lr_mult**d))

    @staticmethod
    def _starts(
        n: int, schedule: str, epochs: int, unfreeze_at: Sequence[int] | None, probe: int, names: list[str]
    ) -> list[int]:
        if n == 0:
            if unfreeze_at:
                raise UsageError("--unfreeze-at has no stages to unfreeze with --unfreeze head")
            return []
        if schedule == "fixed":
            if unfreeze_at:
                raise UsageError("--unfreeze-at is for --schedule progressive", "add --schedule progressive")
            if not 0 <= probe < epochs:
                raise UsageError(f"--probe-epochs {probe} must be between 0 and --epochs - 1 ({epochs - 1})")
            return [probe] * n
        if unfreeze_at is None:
            # evenly spread: with 9 epochs and 2 stages, layer4 at 3 and layer3 at 6
            starts = [max(1, round(i * epochs / (n + 1))) for i in range(1, n + 1)]
        else:
            starts = [int(e) for e in unfreeze_at]
            if len(starts) != n:
                raise UsageError(
                    f"--unfreeze-at needs {n} epoch(s), one per stage from the top ({', '.join(names[:n])}); "
                    f"got {len(starts)}",
                    f"e.g. --unfreeze-at {','.join(str(max(1, round(i * epochs / (n + 1)))) for i in range(1, n + 1))}",
                )
        if any(starts[i + 1] < starts[i] for i in range(len(starts) - 1)) or starts[0] < 0 or starts[-1] >= epochs:
            raise UsageError(
                f"--unfreeze-at {','.join(map(str, starts))}: epochs must be non-decreasing and below --epochs {epochs}",
                "give the epoch (0-based) at which each stage unfreezes, top stage first",
            )
        return starts

    # -- queries
    @property
    def trained(self) -> list[StagePlan]:
        """The parts that train at some point (head first)."""
        return [p for p in self.plans if p.start is not None]

    @property
    def last_start(self) -> int:
        return max(p.start for p in self.trained)  # type: ignore[type-var]

    def trainable_at(self, epoch: int) -> list[str]:
        return [p.name for p in self.plans if p.start is not None and p.start <= epoch]

    def unfrozen_at(self, epoch: int) -> list[str]:
        """Stages (not the head) that start training exactly at ``epoch``."""
        return [p.name for p in self.plans if p.depth > 0 and p.start == epoch]

    # -- actions
    def apply(self, epoch: int) -> None:
        """Set ``requires_grad`` for ``epoch``: True for the parts due to train, False for the rest."""
        for p in self.plans:
            on = p.start is not None and p.start <= epoch
            for param in p.parameters():
                param.requires_grad_(on)

    def train_mode(self, epoch: int) -> None:
        """Training mode for the parts that train at ``epoch``, eval mode for the frozen ones (so their
        BatchNorm layers normalise with, and do not update, their running statistics)."""
        for p in self.plans:
            on = p.start is not None and p.start <= epoch
            for m in p.modules:
                m.train(on)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: per trained part, one with weight decay (weights) and one without (biases and
        normalisation parameters, i.e. tensors with one dimension)."""
        groups = []
        for p in self.trained:
            params = p.parameters()
            decay = [x for x in params if x.ndim > 1]
            no_decay = [x for x in params if x.ndim <= 1]
            for suffix, ps, wd in (("", decay, weight_decay), (".no_decay", no_decay, 0.0)):
                if ps:
                    groups.append({"params": ps, "lr": p.lr, "weight_decay": wd, "name": p.name + suffix})
        return groups

    def lr_lambdas(
        self, groups: Sequence[dict[str, Any]], steps_per_epoch: int, kind: str, warmup_epochs: float
    ) -> list[Callable[[int], float]]:
        """One multiplier function per optimiser group: zero before its part is unfrozen, then
        :func:`lr_factor` over the rest of the run."""
        total = self.epochs * steps_per_epoch
        starts = {p.name: int(p.start or 0) * steps_per_epoch for p in self.trained}
        warm = max(0, round(warmup_epochs * steps_per_epoch))
        out = []
        for g in groups:
            s = starts[str(g["name"]).removesuffix(".no_decay")]
            out.append(lambda step, s=s: lr_factor(step, s, total, warm, kind))
        return out

    def describe(self) -> list[list[Any]]:
        """Rows for a table: part, from epoch, peak lr."""
        return [[p.name, "frozen" if p.start is None else p.start, f"{p.lr:.2e}"] for p in self.plans]


def lr_factor(step: int, start: int, total: int, warmup: int, kind: str) -> float:
    """The learning-rate multiplier at optimiser ``step`` for a part unfrozen at ``start`` (steps).

    ``cosine``: linear warm-up over ``warmup`` steps (at most a third of the part's span), then cosine
    decay to 0. ``onecycle``: cosine rise from 1/25 over 30% of the span, cosine fall to 1/25e4 (the
    shape of ``torch.optim.lr_scheduler.OneCycleLR``, without momentum cycling). ``constant``: warm-up then
    flat."""
    if step < start:
        return 0.0
    t, span = step - start, max(1, total - start)
    if kind == "onecycle":
        up = max(1, int(0.3 * span))
        lo, end = 1 / 25, 1 / 25e4
        if t < up:
            return lo + (1 - lo) * (1 - math.cos(math.pi * t / up)) / 2
        return end + (1 - end) * (1 + math.cos(math.pi * min(1.0, (t - up) / max(1, span - up)))) / 2
    w = min(warmup, span // 3)
    if t < w:
        return (t + 1) / (w + 1)
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - w) / max(1, span - w))))
    raise UsageError(f"--lr-schedule {kind!r} is not known", "use cosine, onecycle or constant")


def auto_unfreeze(per_class: float, stages: Sequence[str], random_init: bool) -> tuple[str, str]:
    """``--unfreeze auto``: the target and a one-line reason, from the median labelled images per class."""
    if random_init:
        return "all", "the backbone is randomly initialised (--weights none): its features must be learnt"
    depth = None
    for limit, d in AUTO_RULE:
        if per_class < limit:
            depth = d
            break
    if depth is None or depth >= len(stages):
        return "all", f"{per_class:g} labelled images per class (>= {AUTO_RULE[-1][0]})"
    if depth == 0:
        return "head", f"{per_class:g} labelled images per class (< {AUTO_RULE[0][0]}): too few to move the backbone"
    return stages[-depth], f"{per_class:g} labelled images per class"


# --------------------------------------------------------------------------------------------- the model


class Classifier:
    """Holder for the trunk and head (not an ``nn.Module``, so no state is duplicated): ``images(x)`` runs
    the whole classifier, ``maps(m)`` the part after the cut (``Backbone.split(cut)``'s ``rest``)."""

    def __init__(self, net: Any, head: Any, rest: Any = None) -> None:
        self.net, self.head, self.rest = net, head, rest

    def images(self, x: Any) -> Any:
        return self.head(self.net(x))

    def maps(self, m: Any) -> Any:
        return self.head(self.rest(m))

    def state(self) -> dict[str, Any]:
        return {
            "backbone": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
        }

    def load(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["backbone"])
        self.head.load_state_dict(state["head"])


def _adamw(groups: list[dict[str, Any]], lr: float, device: Any) -> Any:
    """AdamW with the fused kernel where torch has one for the device (one kernel for all parameters:
    measured 2x faster steps for ResNet-50's layer4 on the CPU, docs/performance.md), else the default."""
    import torch

    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, lr=lr)


# --------------------------------------------------------------------------------------------- data feeds


class _Feed:
    """What both feeds share: the number of optimiser steps in an epoch (a final partial batch is dropped
    when there is more than one batch)."""

    batch_size: int
    drop_last: bool

    @property
    def n_train(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        n = self.n_train
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class _ImageFeed(_Feed):
    """Batches from image files: augmented for training, eval transform for validation."""

    def __init__(
        self, images: Any, train_idx: np.ndarray, val_images: Any, cfg: FinetuneConfig, tcfg: Any, device: Any
    ):
        from .data import ImageDataset, train_transform
        from .data import eval_transform as make_eval
        from .runtime import train_workers

        self.kind = "images"
        self.train_list = images.subset(train_idx.tolist())
        self.val_list = val_images
        self.workers = train_workers(device) if cfg.workers is None else cfg.workers
        self.batch_size = cfg.batch_size
        self.device = device
        self.train_ds = ImageDataset(
            self.train_list, train_transform(tcfg, cfg.color_jitter, cfg.crop_scale, cfg.hflip), tcfg.draft_target()
        )
        val_ok = val_images is not None and len(val_images)
        self.val_ds = ImageDataset(val_images, make_eval(tcfg), tcfg.draft_target()) if val_ok else None
        self.drop_last = len(self.train_list) > cfg.batch_size
        self.skipped: set[str] = set()

    @property
    def n_train(self) -> int:
        return len(self.train_list)

    @property
    def n_val(self) -> int:
        return len(self.val_list) if self.val_ds is not None else 0

    def _loader(self, ds: Any, shuffle: bool, generator: Any = None, drop_last: bool = False) -> Any:
        import torch

        from .data import collate

        return torch.utils.data.DataLoader(
            ds,
            **loader_args(ds, self.batch_size, shuffle, generator, drop_last),  # torchrun: this rank's slices
            num_workers=self.workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )

    def _batches(self, ds: Any, loader: Any) -> Any:
        import torch

        for xs, idx, errors in loader:
            for i, e in zip(idx, errors):
                if e and ds.images.paths[i] not in self.skipped:
                    self.skipped.add(ds.images.paths[i])
                    get_reporter().warn(f"{ds.images.paths[i]}: {e} (skipped)")
            if xs is None:
                continue
            y = torch.tensor([ds.images.labels[i] for i, e in zip(idx, errors) if not e], dtype=torch.long)
            yield xs, y

    def train_batches(self, generator: Any) -> Any:
        return self._batches(self.train_ds, self._loader(self.train_ds, True, generator, self.drop_last))

    def val_batches(self) -> Any:
        if self.val_ds is None:
            return iter(())
        return self._batches(self.val_ds, self._loader(self.val_ds, False))


class _MapFeed(_Feed):
    """Batches of cached stage maps (no pixel augmentation: the maps were computed once, centre-cropped)."""

    MAX_PRELOAD_BYTES = 4 << 30

    def __init__(
        self,
        cache: Any,
        cut: str,
        train_rows: np.ndarray,
        val: tuple[Any, np.ndarray] | None,
        label_map: np.ndarray,
        batch_size: int,
    ):
        self.kind = "maps"
        self.cut = cut
        self.batch_size = batch_size
        self.train = self._Rows(cache, cut, train_rows, label_map)
        self.val = self._Rows(val[0], cut, val[1], label_map if val[0] is cache else None) if val else None
        self.drop_last = len(train_rows) > batch_size

    class _Rows:
        def __init__(self, cache: Any, cut: str, rows: np.ndarray, label_map: np.ndarray | None):
            import torch

            self.cache, self.cut, self.rows = cache, cut, np.asarray(rows, dtype=np.int64)
            labels = cache.labels[self.rows]
            self.labels = torch.as_tensor(label_map[labels] if label_map is not None else labels, dtype=torch.long)
            shape = cache.stages[cut]
            nbytes = len(self.rows) * int(np.prod(shape)) * 2
            self.maps = None
            if nbytes <= _MapFeed.MAX_PRELOAD_BYTES:  # float16 in memory: one read, then pure compute
                self.maps = torch.from_numpy(cache.stage(cut, self.rows).astype(np.float16))

        def __len__(self) -> int:
            return len(self.rows)

        def get(self, pos: Any) -> tuple[Any, Any]:
            import torch

            if self.maps is not None:
                return self.maps[pos].float(), self.labels[pos]
            return torch.from_numpy(self.cache.stage(self.cut, self.rows[pos.numpy()])), self.labels[pos]

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_val(self) -> int:
        return len(self.val) if self.val is not None else 0

    def train_batches(self, generator: Any) -> Any:
        import torch

        perm = torch.randperm(self.n_train, generator=generator)
        for b in range(self.steps_per_epoch()):
            yield self.train.get(rank_part(perm[b * self.batch_size : (b + 1) * self.batch_size]))

    def val_batches(self) -> Any:
        import torch

        if self.val is None:
            return
        for lo in range(0, len(self.val), self.batch_size):
            yield self.val.get(rank_part(torch.arange(lo, min(lo + self.batch_size, len(self.val)))))


# ------------------------------------------------------------------------------------------ checkpoints


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    if not is_main():  # under torchrun only rank 0 writes checkpoints
        return
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _rng_state(generator: Any) -> dict[str, Any]:
    import torch

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.as_tensor(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: Any) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A finetune checkpoint, loaded with ``weights_only=True`` (tensors and plain data only: no code runs)."""
    import torch

    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_DIR / LAST_CKPT
    if not p.exists():
        raise RtError(f"{p}: no checkpoint to resume from", "give the --out directory of an `rt finetune` run")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RtError(
            f"{p}: unreadable checkpoint ({type(exc).__name__}: {str(exc)[:200]})",
            "the file is damaged; start again without --resume (with --overwrite)",
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise RtError(f"{p}: not an `rt finetune` checkpoint")
    return ckpt


# ------------------------------------------------------------------------------------------------ setup


@dataclass
class _Setup:
    backbone: Any
    head: Any
    classes: list[str]
    feed: Any
    head_source: str
    per_class: float
    cut: str | None
    rest: Any = None


def _load_start(cfg: FinetuneConfig) -> tuple[Any, Any, list[str] | None, str]:
    """The backbone and head to start from: a head/model directory, a cache's backbone, or --model/--weights."""
    from .backbones import backbone_from_identity, build_backbone
    from .head import build_head_module
    from .modeldir import HEAD_FILE, read_model_dir

    if cfg.head is not None:
        md = read_model_dir(cfg.head)
        for opt, given in (("--model", cfg.model), ("--weights", cfg.weights)):
            if given is not None:
                raise UsageError(
                    f"{opt} {given} was given with the head directory {cfg.head}",
                    f"the backbone comes from the head directory ({md.identity.model}, {md.identity.weights}); "
                    f"drop {opt}, or drop the head directory to start from {opt}",
                )
        if cfg.image_size is not None and cfg.image_size != md.identity.transform.input_size:
            raise UsageError(
                f"--image-size {cfg.image_size} differs from the head's input size {md.identity.transform.input_size}",
                "drop --image-size (the head's transform is used)",
            )
        weights = str(md.path) if md.has_backbone else None
        backbone = backbone_from_identity(md.identity, weights)
        head = build_head_module(md.head_config)
        if md.head_config.get("in_features") != backbone.num_features:
            raise IdentityMismatch(f"{md.path}: the head takes {md.head_config.get('in_features')} features")
        if cfg.fresh_head:
            from .head import HeadModule

            return backbone, HeadModule(backbone.num_features, len(md.classes), cfg.hidden), md.classes, "fresh"
        head_state = md.load_tensors(HEAD_FILE)
        head.load_state_dict(head_state)
        return backbone, head, md.classes, f"fitted head from {md.path}"
    if cfg.cache is not None:
        from .cache import FeatureCache

        with FeatureCache(cfg.cache) as c:
            identity = c.identity
        if cfg.model is not None or cfg.weights is not None:
            raise UsageError(
                "--model/--weights were given with --cache",
                f"the backbone comes from the cache ({identity.model}, {identity.weights}); drop them",
            )
        return backbone_from_identity(identity), None, None, "fresh"
    backbone = build_backbone(cfg.model or "resnet50", cfg.weights or "imagenet", cfg.image_size)
    return backbone, None, None, "fresh"


def _class_check(have: Sequence[str], want: Sequence[str], what: str) -> None:
    extra = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have))
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"not in the head: {', '.join(extra[:10])}")
        if missing:
            parts.append(f"missing from the data: {', '.join(missing[:10])}")
        raise DataError(
            f"{what} has other classes than the head ({'; '.join(parts)})",
            "finetune on data with the head's classes, or start without a head directory (a fresh head "
            "for these classes)",
        )


def _setup(cfg: FinetuneConfig, device: Any) -> _Setup:
    from .head import HeadModule

    backbone, head, classes, head_source = _load_start(cfg)
    if cfg.cache is not None:
        return _setup_cache(cfg, backbone, head, classes, head_source)
    if cfg.data is None:
        raise UsageError("no training data", "pass --data FOLDER (or CSV), or --cache FILE with --cut maps")
    from .data import list_images

    images = list_images(cfg.data)
    if classes is not None:
        _class_check(images.classes, classes, f"--data {cfg.data}")
        images = list_images(cfg.data, classes=classes)
    for note in images.notes:
        get_reporter().warn(note)
    classes = list(images.classes)
    labels = np.asarray(images.labels)
    if (labels < 0).any():
        get_reporter().warn(f"{int((labels < 0).sum())} unlabelled image(s) in {cfg.data} are not used for training")
    if cfg.val is not None:
        val_list = list_images(cfg.val)
        extra = sorted(set(val_list.classes) - set(classes))
        if extra:
            raise DataError(
                f"--val {cfg.val} has classes the model does not: {', '.join(extra)}",
                "give a validation set with the training classes",
            )
        val_list = list_images(cfg.val, classes=classes)
        val_list = val_list.subset([i for i, y in enumerate(val_list.labels) if y >= 0])
        train_idx = np.flatnonzero(labels >= 0)
    else:
        train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.seed)
        val_list = images.subset(val_idx.tolist())
    if len(train_idx) == 0:
        raise DataError(f"--data {cfg.data}: no labelled images to train on", "put images in class folders")
    if head is None:
        head = HeadModule(backbone.num_features, len(classes), cfg.hidden)
    feed = _ImageFeed(images, train_idx, val_list, cfg, backbone.transform, device)
    counts = np.bincount(labels[labels >= 0], minlength=len(classes))
    return _Setup(backbone, head, classes, feed, head_source, float(np.median(counts)), None)


def _setup_cache(cfg: FinetuneConfig, backbone: Any, head: Any, classes: list[str] | None, head_source: str) -> _Setup:
    from .cache import FeatureCache
    from .errors import CacheError
    from .head import HeadModule

    cache = FeatureCache(cfg.cache)  # type: ignore[arg-type]
    cache.check_identity(backbone.identity, f"the head in {cfg.head}" if cfg.head else "this run")
    if not cache.stages:
        raise CacheError(
            f"--cache {cfg.cache} holds no stage maps, only pooled features",
            "re-extract with `rt extract ... --cut layer3` (or train the head alone with `rt fit-head`)",
        )
    if cfg.data is not None:
        get_reporter().warn(f"--data {cfg.data} is not read: training runs on the maps in {cfg.cache}")
    if classes is None:
        classes = list(cache.classes)
    present = [c for i, c in enumerate(cache.classes) if (cache.labels == i).any()]
    _class_check(present, classes, f"--cache {cfg.cache}")
    label_map = np.asarray([classes.index(c) for c in cache.classes] or [0], dtype=np.int64)
    labels = np.where(cache.labels >= 0, label_map[np.maximum(cache.labels, 0)], -1)
    val = None
    if cfg.val is not None:
        vcache = FeatureCache(cfg.val)
        vcache.check_identity(backbone.identity, f"--cache {cfg.cache}")
        extra = sorted(set(vcache.classes) - set(classes))
        if extra:
            raise DataError(f"--val {cfg.val} has classes the model does not: {', '.join(extra)}")
        vmap = np.asarray([classes.index(c) for c in vcache.classes] or [0], dtype=np.int64)
        train_rows = np.flatnonzero(labels >= 0)
        val_rows = vcache.labelled
        val = (vcache, val_rows, vmap)
    else:
        train_rows, val_rows = stratified_split(labels, cfg.val_fraction, cfg.seed)
    if head is None:
        head = HeadModule(backbone.num_features, len(classes), cfg.hidden)
    # the deepest cut in the cache that still lies before every stage that trains
    stages = backbone.stages
    cut = sorted(cache.stages, key=stages.index)[-1] if all(s in stages for s in cache.stages) else None
    if cut is None:
        raise CacheError(
            f"--cache {cfg.cache}: its maps ({', '.join(cache.stages)}) are not stages of {backbone.identity.model}"
        )
    counts = np.bincount(labels[labels >= 0], minlength=len(classes))
    feed = _MapFeed(cache, cut, train_rows, None, label_map, cfg.batch_size)
    if val is not None:
        vcache, vrows, vmap = val
        feed.val = _MapFeed._Rows(vcache, cut, vrows, vmap)
    elif len(val_rows):
        feed.val = _MapFeed._Rows(cache, cut, val_rows, label_map)
    return _Setup(backbone, head, classes, feed, head_source, float(np.median(counts)), cut)


def _resolve_target(cfg: FinetuneConfig, s: _Setup) -> tuple[str, str | None]:
    stages = s.backbone.stages
    choices = unfreeze_choices(stages)
    if cfg.unfreeze not in choices:
        raise UsageError(
            f"--unfreeze {cfg.unfreeze!r} is not a stage of {s.backbone.identity.model}",
            f"use one of: {', '.join(choices)}",
        )
    target, reason = cfg.unfreeze, None
    if target == "auto":
        random_init = s.backbone.identity.weights_id.startswith("random:")
        target, why = auto_unfreeze(s.per_class, stages, random_init)
        reason = f"--unfreeze auto -> {target}: {why} (rule: {AUTO_RULE_TEXT})"
    if s.cut is not None:
        after = stages[stages.index(s.cut) + 1 :]
        allowed = ["head", *reversed(after)]
        if target not in allowed:
            if cfg.unfreeze == "auto":
                clamp = after[0] if after else "head"
                reason = f"{reason}; the cache is cut at {s.cut}, so the deepest it allows is {clamp}"
                target = clamp
            else:
                raise UsageError(
                    f"--unfreeze {target} needs the images: --cache {cfg.cache} holds maps at {s.cut}, and "
                    f"{target} {'includes' if target == 'all' else 'is at or below'} that cut",
                    f"with this cache use --unfreeze {' or '.join(allowed[1:] or ['head'])}; to train deeper, "
                    f"use --data (or extract with an earlier --cut)",
                )
    return target, reason


# ----------------------------------------------------------------------------------------- the training


def finetune(
    cfg: FinetuneConfig,
    resume: str | Path | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Finetune (see the module docstring); with ``resume`` (an output directory) continue its run with
    the configuration saved in its checkpoint. ``on_epoch_end(epoch, row)`` is called after each epoch's
    checkpoint is written (a hook for callers; raising KeyboardInterrupt there stops the run resumably)."""
    import torch

    from . import distributed
    from .runtime import autocast, resolve_device, resolve_precision

    distributed.setup_training(cfg.device)  # torchrun: join the group; ranks > 0 report warnings only
    rep = get_reporter()
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        cfg = FinetuneConfig.from_json(ckpt["config"])
        cfg.out = Path(resume)
        rep.info(f"resuming {cfg.out} after epoch {ckpt['epoch']} of {cfg.epochs}")
    else:  # inputs are recorded absolute, so `--resume` works from any directory
        for key in ("head", "data", "cache", "val"):
            if getattr(cfg, key) is not None:
                setattr(cfg, key, Path(getattr(cfg, key)).expanduser().resolve())
    out = Path(cfg.out)
    ck_dir = out / CHECKPOINT_DIR
    if ckpt is None:
        distributed.on_main(lambda: _check_out(out, cfg.overwrite))
    for name, v, lo in (("--epochs", cfg.epochs, 1), ("--batch-size", cfg.batch_size, 1)):
        if v < lo:
            raise UsageError(f"{name} {v} must be at least {lo}")
    if cfg.monitor not in ("val_loss", "val_acc"):
        raise UsageError(f"--monitor {cfg.monitor!r} is not known", "use val_loss or val_acc")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    s = _setup(cfg, device)
    target, auto_reason = _resolve_target(cfg, s)
    if auto_reason:
        rep.info(auto_reason)

    random_init = s.backbone.identity.weights_id.startswith("random:")
    lr_mult = cfg.lr_mult if cfg.lr_mult is not None else (1.0 if random_init else 0.3)
    fresh = not s.head_source.startswith("fitted")
    probe = cfg.probe_epochs
    if probe is None:
        probe = 1 if (fresh and not random_init and target != "head" and cfg.epochs > 1) else 0
    net, head = s.backbone.net, s.head
    rest = s.backbone.split(s.cut)[1] if s.cut else None
    policy = FreezePolicy(
        s.backbone.stage_groups(), head, target, cfg.schedule, cfg.epochs, cfg.unfreeze_at, cfg.lr, lr_mult, probe
    )
    net.to(device).to(memory_format=torch.channels_last)  # measured faster on CPU too, identical results
    head.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = Classifier(net, head, rest)
    forward = model.maps if s.cut else model.images
    if cfg.sync_bn:
        distributed.convert_sync_batchnorm(policy, net, device)
    train_forward = distributed.TrainForward(forward, rest if s.cut else net, head, device, cfg.batch_size)

    policy.apply(0)  # requires_grad flags before the optimiser sees the parameters
    groups = policy.param_groups(cfg.weight_decay)
    optimizer = _adamw(groups, cfg.lr, device)
    steps = s.feed.steps_per_epoch()
    if steps < 1:
        raise DataError("no training batches", "add images or lower --batch-size")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, policy.lr_lambdas(groups, steps, cfg.lr_schedule, cfg.warmup_epochs)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(cfg.seed)

    state: dict[str, Any] = {"epoch": 0, "best": None, "best_epoch": -1, "bad": 0, "stopped": False, "history": []}
    if ckpt is not None:
        model.load(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"], generator)
        state = json.loads(ckpt["state"])
    else:
        ck_dir.mkdir(parents=True, exist_ok=True)

    rep.info(
        f"finetuning {s.backbone.identity.model} ({s.backbone.identity.weights_id}) with a {s.head_source} head "
        f"on {s.feed.n_train} {'cached ' + s.cut + ' maps' if s.cut else 'images'} ({s.feed.n_val} for validation), "
        f"{len(s.classes)} classes, {device.type} {precision}, {cfg.epochs} epochs x {steps} steps"
    )
    rep.table(f"unfreeze {target} ({cfg.schedule})", ["part", "trains from epoch", "peak lr"], policy.describe())

    t_start = time.perf_counter()
    seconds_before = sum(r.get("seconds", 0.0) for r in state["history"])
    for epoch in range(state["epoch"], cfg.epochs):
        if state["stopped"]:
            break
        policy.apply(epoch)
        newly = policy.unfrozen_at(epoch)
        if newly and epoch > 0:
            state["bad"] = 0  # patience counts from the latest unfreeze
            rep.info(f"epoch {epoch}: unfreezing {', '.join(newly)}")
        t0 = time.perf_counter()
        policy.train_mode(epoch)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # as used by this epoch's first step
        total_loss, correct, seen = 0.0, 0, 0
        with rep.progress(f"epoch {epoch + 1}/{cfg.epochs}", total=steps, unit="step") as bar:
            for x, y in s.feed.train_batches(generator):
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, precision):
                    logits = train_forward(x)
                loss = torch.nn.functional.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss * train_forward.loss_weight(len(y))).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total_loss += float(loss.detach()) * len(y)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
                bar.advance(1)
        total_loss, correct, seen = distributed.all_reduce_sums(total_loss, correct, seen)
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc = _validate(forward, policy, s.feed, device, precision)
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": total_loss / max(1, seen),
            "train_acc": correct / max(1, seen),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lrs,
            "trainable": policy.trainable_at(epoch),
            "unfrozen": newly,
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t0,
        }
        state["history"].append(row)
        _early_stopping(state, row, cfg, policy, epoch, model, ck_dir)
        state["epoch"] = epoch + 1
        rep.info(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}"
            + (f" | val loss {val_loss:.4f} acc {val_acc:.3f}" if val_loss is not None else "")
            + f" | {row['seconds']:.1f}s"
            + (" (best)" if state["best_epoch"] == epoch else "")
        )
        _atomic_torch_save(
            {
                "format": CKPT_FORMAT,
                "version": CKPT_VERSION,
                "config": cfg.to_json(),
                "epoch": epoch + 1,
                "model": model.state(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(generator),
                "state": json.dumps(state),
            },
            ck_dir / LAST_CKPT,
        )
        if on_epoch_end is not None:
            try:
                on_epoch_end(epoch, row)
            except KeyboardInterrupt:
                raise RtError(
                    f"interrupted after epoch {epoch + 1}: checkpoint saved in {ck_dir}",
                    f"continue with `rt finetune --resume {out}`",
                ) from None
        if state["stopped"]:
            rep.info(
                f"early stop: no {cfg.monitor} improvement for {cfg.patience} epochs; best epoch {state['best_epoch'] + 1}"
            )

    seconds = seconds_before + time.perf_counter() - t_start

    def finish() -> FinetuneResult:  # rank 0 only under torchrun; the others get its result
        if s.feed.n_val and (ck_dir / BEST_CKPT).exists():
            model.load(load_checkpoint_file(ck_dir / BEST_CKPT)["model"])
        return _write_outputs(cfg, s, model, policy, target, auto_reason, state, seconds, precision, device)

    return distributed.on_main(finish)


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _check_out(out: Path, overwrite: bool) -> None:
    import shutil

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", "give a directory name")
    if out.exists() and any(out.iterdir()) and not overwrite:
        if (out / "meta.json").exists():
            raise UsageError(f"--out {out} already holds a model", "choose another --out, or pass --overwrite")
        if (out / CHECKPOINT_DIR / LAST_CKPT).exists():
            raise UsageError(
                f"--out {out} holds an unfinished finetune run",
                f"continue it with `rt finetune --resume {out}`, or pass --overwrite to start over",
            )
    if overwrite and out.is_dir():  # the old model stops being one before the new run starts
        (out / "meta.json").unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)


def _validate(
    forward: Callable[[Any], Any], policy: FreezePolicy, feed: Any, device: Any, precision: str
) -> tuple[float | None, float | None]:
    import torch

    from .runtime import autocast

    if not feed.n_val:
        return None, None
    for p in policy.plans:
        for m in p.modules:
            m.eval()
    total, correct, n = 0.0, 0, 0
    with torch.inference_mode():
        for x, y in feed.val_batches():
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            y = y.to(device)
            with autocast(device, precision):
                logits = forward(x)
            total += float(torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    total, correct, n = all_reduce_sums(total, correct, n)  # torchrun: each rank validated a slice
    return total / max(1, n), correct / max(1, n)


def _early_stopping(
    state: dict[str, Any],
    row: dict[str, Any],
    cfg: FinetuneConfig,
    policy: FreezePolicy,
    epoch: int,
    model: Classifier,
    ck_dir: Path,
) -> None:
    value = row[cfg.monitor]
    if value is None:
        state["best_epoch"] = epoch  # no validation: the last epoch is the result
        return
    better = state["best"] is None or (value < state["best"] if cfg.monitor == "val_loss" else value > state["best"])
    if better:
        state["best"], state["best_epoch"], state["bad"] = value, epoch, 0
        _atomic_torch_save({"format": CKPT_FORMAT, "epoch": epoch + 1, "model": model.state()}, ck_dir / BEST_CKPT)
    else:
        state["bad"] += 1
    if cfg.patience and state["bad"] >= cfg.patience and epoch >= policy.last_start and epoch + 1 < cfg.epochs:
        state["stopped"] = True


# ------------------------------------------------------------------------------------------------ output


def _write_outputs(
    cfg: FinetuneConfig,
    s: _Setup,
    model: Classifier,
    policy: FreezePolicy,
    target: str,
    auto_reason: str | None,
    state: dict[str, Any],
    seconds: float,
    precision: str,
    device: Any,
) -> FinetuneResult:
    import torch

    from .backbones import BACKBONE_FILE, BackboneIdentity, save_backbone, sha256_file
    from .modeldir import HEAD_FILE, write_model_dir

    out = Path(cfg.out)
    model.net.cpu().to(memory_format=torch.contiguous_format)
    model.head.cpu()
    ident = s.backbone.identity
    save_backbone(model.net, out / BACKBONE_FILE, ident)
    identity = BackboneIdentity(
        model=ident.model,
        arch=ident.arch,
        weights=str(out),
        weights_id="sha256:" + sha256_file(out / BACKBONE_FILE),
        transform=ident.transform,
        num_features=ident.num_features,
    )
    history = state["history"]
    best_row = history[state["best_epoch"]] if 0 <= state["best_epoch"] < len(history) else history[-1]
    events = [{"epoch": r["epoch"], "stages": r["unfrozen"]} for r in history if r["unfrozen"]]
    report = {
        "kind": "finetune",
        "accuracy": best_row["val_acc"],
        "val_loss": best_row["val_loss"],
        "n_train": s.feed.n_train,
        "n_val": s.feed.n_val,
        "seconds": round(seconds, 2),
        "best_epoch": state["best_epoch"],
        "epochs_run": len(history),
        "stopped_early": state["stopped"],
        "unfreeze": target,
        "unfreeze_auto": auto_reason,
        "schedule": cfg.schedule,
        "plan": [{"part": p.name, "from_epoch": p.start, "lr": p.lr} for p in policy.plans],
        "unfreeze_events": events,
        "cached_stage": s.cut,
        "start": {"head": s.head_source, "backbone": ident.to_dict()},
        "precision": precision,
        "device": device.type,
        "config": json.loads(cfg.to_json()),
        "history": history,
    }
    png = plot_training_curves(
        history, out / CURVES_PNG, f"finetune {ident.model}: unfreeze {target}", state["best_epoch"]
    )
    atomic_write_json(out / REPORT_JSON, report)
    write_model_dir(
        out,
        "finetuned",
        identity,
        s.classes,
        model.head.config,
        {HEAD_FILE: model.head.state_dict()},
        extra_meta={"finetune": {"unfreeze": target, "schedule": cfg.schedule, "best_epoch": state["best_epoch"]}},
        extra_files=[BACKBONE_FILE],
    )
    get_reporter().info(
        f"wrote {out}: best epoch {state['best_epoch'] + 1}"
        + (
            f", val acc {best_row['val_acc']:.3f}, val loss {best_row['val_loss']:.4f}"
            if best_row["val_acc"] is not None
            else ""
        )
        + f"; curves in {png.name}"
    )
    return FinetuneResult(
        out,
        len(history),
        state["best_epoch"],
        {k: best_row[k] for k in ("val_loss", "val_acc", "train_loss", "train_acc")},
        state["stopped"],
        target,
        seconds,
        history,
    )


def plot_training_curves(
    history: Sequence[dict[str, Any]], path: Path, title: str = "finetune", best_epoch: int | None = None
) -> Path:
    """Loss and accuracy per epoch (train and validation), with a dashed line where stages were unfrozen
    (labelled with their names) and a marker on the best epoch. Saved as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] + 1 for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    try:
        for ax, key in zip(axes, ("loss", "acc")):
            ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label=f"train {key}")
            val = [(e, r[f"val_{key}"]) for e, r in zip(epochs, history) if r[f"val_{key}"] is not None]
            if val:
                ax.plot([e for e, _ in val], [v for _, v in val], "s-", label=f"val {key}")
            for r in history:
                if r["unfrozen"]:
                    x = r["epoch"] + 0.5  # the stage trains from this epoch's first step
                    ax.axvline(x, color="grey", linestyle="--", linewidth=1)
                    ax.text(
                        x,
                        0.98,
                        " +" + ",".join(r["unfrozen"]),
                        transform=ax.get_xaxis_transform(),
                        va="top",
                        fontsize=8,
                        color="dimgrey",
                        rotation=90,
                    )
            if best_epoch is not None and 0 <= best_epoch < len(history):
                ax.axvline(best_epoch + 1, color="tab:green", alpha=0.4, linewidth=3, label="best (kept)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_ylabel("accuracy" if key == "acc" else "cross-entropy")
            if key == "acc":
                ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=8, framealpha=0.6)
        fig.suptitle(title + " (dashed: stage unfrozen)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
