"""`rt finetune`: unfreeze the top of the backbone (or all of it) and train it with the head.

The loop you can read, in the manner of nanoGPT's and timm's train.py::

    run = build_run(cfg, checkpoint)              # start point, feed, model, freeze policy, optimiser
    for epoch in range(run.state.epoch, cfg.epochs):
        begin_epoch(run, epoch)                    # unfreeze what is due (freeze.py)
        row = train_one_epoch(run, epoch)          # one pass over the training feed (feeds.py)
        row |= validate(run)                       # loss and accuracy on the validation feed
        track_best(run, row, epoch)                # best epoch, early stopping
        save_checkpoint(run)                       # last.pt: resumes bit for bit
    write_outputs(...)                             # the model directory, report.json, curves.png

Which parts train, from which epoch and at what learning rate is :mod:`~resnet_transfer.freeze`'s job; where
batches come from (images, or cached stage maps at a cut) :mod:`~resnet_transfer.feeds`'; the model is one
:class:`~resnet_transfer.classifier.Classifier`; what a finished run writes is in
:mod:`~resnet_transfer.finetune_outputs`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..base import DataError, Interrupted, UsageError, distributed, get_reporter
from .checkpoints import (
    BEST_CKPT,
    CHECKPOINT_DIR,
    LAST_CKPT,
    TrainState,
    load_checkpoint,
    restore_checkpoint,
    save_best,
    save_checkpoint,
)
from .outputs import FinetuneResult

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
    strict: bool = False  # fail on the first unreadable image (default: skip it, list it in report.json)
    checkpoint_every: int = 1  # write the resume checkpoint every N epochs (and at the last); 0: never
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

    @property
    def feed(self) -> Any:
        return self.feeding.feed

    @property
    def ck_dir(self) -> Path:
        return Path(self.cfg.out) / CHECKPOINT_DIR


# ------------------------------------------------------------------------------------------------- start


@dataclass
class Start:
    """The starting point: a backbone, the head (``None``: a fresh one once the classes are known), the
    head's classes and where the head came from."""

    backbone: Any
    head: Any
    classes: list[str] | None
    head_source: str
    auto_reason: str | None = None  # `--unfreeze auto`: the rule's one-line reason

    @property
    def random_init(self) -> bool:
        return str(self.backbone.identity.weights_id).startswith("random:")


def load_start(cfg: FinetuneConfig) -> Start:
    """The backbone and head to start from: a head/model directory (:func:`modeldir.load_classifier`), a
    cache's backbone, or ``--model``/``--weights``."""
    from ..backbone import backbone_from_identity, build_backbone

    if cfg.head is not None:
        return _start_from_dir(cfg)
    if cfg.cache is not None:
        from ..cache import FeatureCache

        with FeatureCache(cfg.cache) as c:
            identity = c.identity
        if cfg.model is not None or cfg.weights is not None:
            raise UsageError(
                "--model/--weights were given with --cache",
                f"the backbone comes from the cache ({identity.model}, {identity.weights}); drop them",
            )
        return Start(backbone_from_identity(identity), None, None, "fresh")
    return Start(
        build_backbone(cfg.model or "resnet50", cfg.weights or "imagenet", cfg.image_size), None, None, "fresh"
    )


def _start_from_dir(cfg: FinetuneConfig) -> Start:
    from ..head import HeadModule
    from ..models import head_features, load_classifier, read_model_dir

    md = read_model_dir(cfg.head)  # type: ignore[arg-type]
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
    features = head_features(md.head_config)
    clf, md = load_classifier(md.path)
    backbone = clf.backbone
    if features and features != backbone.stages[-1:]:
        raise UsageError(
            f"{md.path}: its head reads the pooled features of {', '.join(features)}; finetune trains the "
            "backbone's final pooled features only (for now)",
            "fit a head on the final features (`rt fit-head` without --features) to finetune from, or finetune "
            "without a head directory",
        )
    if cfg.fresh_head:
        return Start(backbone, HeadModule(backbone.num_features, len(md.classes), cfg.hidden), md.classes, "fresh")
    return Start(backbone, clf.head, md.classes, f"fitted head from {md.path}")


# ------------------------------------------------------------------------------------------------- build


def build_run(cfg: FinetuneConfig, ckpt: dict[str, Any] | None) -> Run:
    """Everything the loop needs, set up (and, from a checkpoint, restored) in one place."""
    import torch

    from ..base import resolve_device
    from ..head import HeadModule
    from ..models import Classifier
    from .feeds import build_feed
    from .freeze import FreezePolicy, default_lr_mult, default_probe_epochs, resolve_bn, resolve_target

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = resolve_device(cfg.device)
    start = load_start(cfg)
    bb = start.backbone
    feeding = build_feed(cfg, bb, start.classes, device)
    head = start.head or HeadModule(bb.num_features, len(feeding.classes), cfg.hidden)
    target, auto_reason = resolve_target(
        cfg.unfreeze, bb.stages, feeding.per_class, start.random_init,
        cut=feeding.cut, model=bb.identity.model, cache=cfg.cache,
    )  # fmt: skip
    start.auto_reason = auto_reason
    lr_mult = cfg.lr_mult if cfg.lr_mult is not None else default_lr_mult(start.random_init)
    probe = cfg.probe_epochs
    if probe is None:
        probe = default_probe_epochs(start.head_source == "fresh", start.random_init, target, cfg.epochs)
    bn = resolve_bn(cfg.bn, start.random_init)
    policy = FreezePolicy(
        bb.stage_groups(),
        head,
        target,
        cfg.schedule,
        cfg.epochs,
        cfg.unfreeze_at,
        cfg.lr,
        lr_mult,
        probe,
        train_bn=bn == "train",
    )
    bb.net.to(device).to(memory_format=torch.channels_last)  # measured faster on CPU too, identical results
    head.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = Classifier(bb.net, head, bb.split(feeding.cut)[1] if feeding.cut else None, backbone=bb)
    if cfg.sync_bn:
        distributed.convert_sync_batchnorm(policy, bb.net, device)
    train_forward = distributed.TrainForward(model, device, cfg.batch_size)
    steps = feeding.feed.steps_per_epoch()
    if steps < 1:
        raise DataError("no training batches", "add images or lower --batch-size")
    precision, choice = _train_precision(cfg, ckpt, device, model, policy, feeding.feed, cfg.epochs * steps)

    policy.apply(0)  # requires_grad flags before the optimiser sees the parameters
    groups = policy.param_groups(cfg.weight_decay)
    optimizer = _adamw(groups, cfg.lr, device)
    lambdas = policy.lr_lambdas(groups, steps, cfg.lr_schedule, cfg.warmup_epochs)
    run = Run(
        cfg, start, feeding, model, policy, target, optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas),
        torch.amp.GradScaler("cuda", enabled=precision == "fp16"),
        torch.Generator().manual_seed(cfg.seed), train_forward, device, precision,
    )  # fmt: skip
    if ckpt is not None:
        restore_checkpoint(run, ckpt)
        run.feed.skipped.update(run.state.skipped)  # warned about before the interruption
    else:
        run.ck_dir.mkdir(parents=True, exist_ok=True)
    run.state.precision, run.state.precision_choice = precision, choice
    return run


def _train_precision(
    cfg: FinetuneConfig, ckpt: dict[str, Any] | None, device: Any, model: Any, policy: Any, feed: Any, steps: int
) -> tuple[str, dict[str, Any]]:
    """The train step's precision: a resumed run keeps its own; ``--precision auto`` on a CPU with bf16
    times both on this run's shape (precision_probe.py); rank 0 decides for all under torchrun."""
    from ..backbone import choose_train_precision
    from ..base import resolve_precision

    if ckpt is not None:
        saved = TrainState.from_json(ckpt["state"])
        if saved.precision:
            return saved.precision, saved.precision_choice
        return resolve_precision(cfg.precision, device), {"mode": "rule", "reason": "checkpoint of an earlier version"}
    precision, choice = distributed.broadcast_object(
        choose_train_precision(cfg.precision, device, model, policy, feed.input_shape, cfg.batch_size, steps)
    )
    if choice["mode"] == "probe":
        ms = choice["median_ms"]
        get_reporter().info(
            f"--precision auto: a train step of {cfg.batch_size} takes {ms['fp32']:.0f} ms in fp32 and "
            f"{ms['bf16']:.0f} ms in bf16 autocast here (medians of a short probe) -> {precision}"
        )
    return precision, choice


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


# ------------------------------------------------------------------------------------------------- epoch


def begin_epoch(run: Run, epoch: int) -> list[str]:
    """Unfreeze what is due at ``epoch``; returns the stages unfrozen now (patience restarts with them)."""
    run.policy.apply(epoch)
    newly = run.policy.unfrozen_at(epoch)
    if newly and epoch > 0:
        run.state.bad = 0
        get_reporter().info(f"epoch {epoch}: unfreezing {', '.join(newly)}")
    return newly


def train_one_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One pass over the training feed; the row's training figures (loss, accuracy, lrs, seconds)."""
    import torch

    from ..base import autocast

    cfg, device = run.cfg, run.device
    t0 = time.perf_counter()
    run.policy.train_mode(epoch)
    lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}  # as used by this epoch's first step
    total_loss, correct, seen = 0.0, 0, 0
    steps = run.feed.steps_per_epoch()
    with get_reporter().progress(f"epoch {epoch + 1}/{cfg.epochs}", total=steps, unit="step") as bar:
        for x, y in run.feed.train_batches(run.generator):
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast(device, run.precision):
                logits = run.train_forward(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            run.optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss * run.train_forward.loss_weight(len(y))).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.scheduler.step()
            total_loss += float(loss.detach()) * len(y)
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += len(y)
            bar.advance(1)
    total_loss, correct, seen = distributed.all_reduce_sums(total_loss, correct, seen)
    return {
        "epoch": epoch,
        "train_loss": total_loss / max(1, seen),
        "train_acc": correct / max(1, seen),
        "lr": lrs,
        "train_seconds": time.perf_counter() - t0,
    }


def val_logits(run: Run) -> Iterator[tuple[Any, Any]]:
    """``(float32 logits, labels)`` per batch of the validation feed, the model in eval mode, on the device."""
    import torch

    from ..base import autocast

    run.model.eval()
    with torch.inference_mode():
        for x, y in run.feed.val_batches():
            x = x.to(run.device).contiguous(memory_format=torch.channels_last)
            with autocast(run.device, run.precision):
                logits = run.model(x)
            yield logits.float(), y.to(run.device)


def validate(run: Run) -> dict[str, float | None]:
    """Loss and accuracy on the validation feed (``None`` without one); every rank validates a slice."""
    import torch

    if not run.feed.n_val:
        return {"val_loss": None, "val_acc": None}
    total, correct, n = 0.0, 0, 0
    for logits, y in val_logits(run):
        total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    total, correct, n = distributed.all_reduce_sums(total, correct, n)
    return {"val_loss": total / max(1, n), "val_acc": correct / max(1, n)}


def recalibrate(run: Run) -> None:
    """Refit the head's temperature for the final weights on the validation images (as `rt fit-head` does
    for a probe): a temperature fitted to the starting head's features says nothing about the finetuned
    ones. Without validation images (or under torchrun, where rank 0 sees a slice) it is reset to 1."""
    import numpy as np

    from ..head import calibration_summary, fit_temperature

    head = run.model.head
    old = float(getattr(head, "temperature", 1.0))
    if not run.feed.n_val or distributed.launched():
        head.temperature = 1.0
        run.calibration = {"temperature": 1.0, "previous": old, "fitted": False}
        return
    batches = [(z.cpu().numpy(), y.cpu().numpy()) for z, y in val_logits(run)]
    z, yi = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    t = fit_temperature(z, yi)
    head.temperature = t
    run.calibration = {**calibration_summary(z, yi, t), "temperature": t, "previous": old, "fitted": True}
    get_reporter().info(
        f"temperature refitted on {len(yi)} validation images: {t:.3g} (the starting head's was {old:.3g})"
    )


def track_best(run: Run, row: dict[str, Any], epoch: int) -> None:
    """Keep the best epoch's weights in best.pt; stop early after ``patience`` epochs without improvement
    (never before the last stage has been unfrozen)."""
    cfg, state = run.cfg, run.state
    value = row[cfg.monitor]
    if value is None:
        state.best_epoch = epoch  # no validation: the last epoch is the result
        return
    better = state.best is None or (value < state.best if cfg.monitor == "val_loss" else value > state.best)
    if better:
        state.best, state.best_epoch, state.bad = value, epoch, 0
        run.best_state = run.model.state()  # a copy, on the CPU
        run.best_saved = False
    else:
        state.bad += 1
    if cfg.patience and state.bad >= cfg.patience and epoch >= run.policy.last_start and epoch + 1 < cfg.epochs:
        state.stopped = True


# -------------------------------------------------------------------------------------------------- loop


def finetune(
    cfg: FinetuneConfig,
    resume: str | Path | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Finetune (see the module docstring); with ``resume`` (an output directory) continue its run with
    the configuration saved in its checkpoint. ``on_epoch_end(epoch, row)`` is called after each epoch's
    checkpoint is written (a hook for callers; raising KeyboardInterrupt there stops the run resumably)."""
    from .outputs import check_out, write_outputs

    distributed.setup_training(cfg.device)  # torchrun: join the group; ranks > 0 report warnings only
    cfg, ckpt = _config(cfg, resume)
    if ckpt is None:
        distributed.on_main(lambda: check_out(Path(cfg.out), cfg.overwrite, CHECKPOINT_DIR, LAST_CKPT))
    run = build_run(cfg, ckpt)
    _announce(run)
    t_start = time.perf_counter()
    seconds_before = sum(r.get("seconds", 0.0) for r in run.state.history)
    saved = run.state.epoch if ckpt is not None else 0  # the epochs the last checkpoint on disk holds
    for epoch in range(run.state.epoch, cfg.epochs):
        if run.state.stopped:
            break
        t0 = time.perf_counter()
        newly = begin_epoch(run, epoch)
        row = {**train_one_epoch(run, epoch), **validate(run)}
        row.update(trainable=run.policy.trainable_at(epoch), unfrozen=newly, seconds=time.perf_counter() - t0)
        run.state.history.append(row)
        track_best(run, row, epoch)
        run.state.epoch = epoch + 1
        run.state.skipped.update(run.feed.skipped)
        _report_epoch(run, row, epoch)
        if checkpoint_due(cfg, epoch, run.state.stopped):
            if not run.best_saved and run.best_state is not None:
                save_best(run, run.state.best_epoch, run.best_state)
                run.best_saved = True
            save_checkpoint(run)
            saved = epoch + 1
        if on_epoch_end is not None:
            try:
                on_epoch_end(epoch, row)
            except KeyboardInterrupt:
                raise _interrupted(cfg, run, epoch, saved) from None
    seconds = seconds_before + time.perf_counter() - t_start
    for part in distributed.all_gather_object(run.feed.skipped):  # torchrun: each rank read its own images
        run.state.skipped.update(part)

    def finish() -> FinetuneResult:  # rank 0 only under torchrun; the others get its result
        if run.feed.n_val and run.best_state is not None:
            run.model.load(run.best_state)
        elif run.feed.n_val and (run.ck_dir / BEST_CKPT).exists():  # resumed, no better epoch since
            run.model.load(load_checkpoint(run.ck_dir / BEST_CKPT)["model"])
        recalibrate(run)
        return write_outputs(run, seconds)

    return distributed.on_main(finish)


def checkpoint_due(cfg: FinetuneConfig, epoch: int, stopped: bool) -> bool:
    """Whether the resume checkpoint is written after ``epoch`` (0-based): every ``checkpoint_every``
    epochs and after the last one (or an early stop); never with ``checkpoint_every`` 0."""
    n = cfg.checkpoint_every
    return n > 0 and ((epoch + 1) % n == 0 or epoch + 1 >= cfg.epochs or stopped)


def _interrupted(cfg: FinetuneConfig, run: Run, epoch: int, saved: int) -> Interrupted:
    if saved == epoch + 1:
        return Interrupted(
            f"interrupted after epoch {epoch + 1}: checkpoint saved in {run.ck_dir}",
            f"continue with `rt finetune --resume {cfg.out}`",
        )
    if saved:
        return Interrupted(
            f"interrupted after epoch {epoch + 1}: the last checkpoint (epoch {saved}) is in {run.ck_dir}",
            f"continue from epoch {saved} with `rt finetune --resume {cfg.out}`",
        )
    return Interrupted(
        f"interrupted after epoch {epoch + 1}: no checkpoint was written (--checkpoint-every {cfg.checkpoint_every})",
        "run it again (with --overwrite)",
    )


def _config(cfg: FinetuneConfig, resume: str | Path | None) -> tuple[FinetuneConfig, dict[str, Any] | None]:
    """The run's configuration (a resumed run's comes from its checkpoint) with inputs made absolute, so
    ``--resume`` works from any directory; checked."""
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        cfg = FinetuneConfig.from_json(ckpt["config"])
        cfg.out = Path(resume)
        get_reporter().info(f"resuming {cfg.out} after epoch {ckpt['epoch']} of {cfg.epochs}")
    else:
        for key in ("head", "data", "cache", "val"):
            if getattr(cfg, key) is not None:
                setattr(cfg, key, Path(getattr(cfg, key)).expanduser().resolve())
    checks = (
        ("--epochs", cfg.epochs, 1),
        ("--batch-size", cfg.batch_size, 1),
        ("--checkpoint-every", cfg.checkpoint_every, 0),
    )
    for name, v, lo in checks:
        if v < lo:
            raise UsageError(f"{name} {v} must be at least {lo}")
    if cfg.monitor not in ("val_loss", "val_acc"):
        raise UsageError(f"--monitor {cfg.monitor!r} is not known", "use val_loss or val_acc")
    return cfg, ckpt


def _announce(run: Run) -> None:
    rep, s, f = get_reporter(), run.start, run.feeding
    if s.auto_reason:
        rep.info(s.auto_reason)
    ident = s.backbone.identity
    rep.info(
        f"finetuning {ident.model} ({ident.weights_id}) with a {s.head_source} head "
        f"on {f.feed.n_train} {'cached ' + f.cut + ' maps' if f.cut else 'images'} ({f.feed.n_val} for validation), "
        f"{len(f.classes)} classes, {run.device.type} {run.precision}, {run.cfg.epochs} epochs x "
        f"{f.feed.steps_per_epoch()} steps, BatchNorm {'batch statistics' if run.policy.train_bn else 'frozen statistics'}"
    )
    rep.table(
        f"unfreeze {run.target} ({run.cfg.schedule})", ["part", "trains from epoch", "peak lr"], run.policy.describe()
    )


def _report_epoch(run: Run, row: dict[str, Any], epoch: int) -> None:
    rep, cfg, state = get_reporter(), run.cfg, run.state
    rep.info(
        f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}"
        + (f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}" if row["val_loss"] is not None else "")
        + f" | {row['seconds']:.1f}s"
        + (" (best)" if state.best_epoch == epoch else "")
    )
    if state.stopped:
        rep.info(
            f"early stop: no {cfg.monitor} improvement for {cfg.patience} epochs; best epoch {state.best_epoch + 1}"
        )
