"""Where a run starts (a fitted head directory, a model directory, or a fresh head on a named backbone) and
how its live objects are built: feed, model, freeze policy, optimiser, precision."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base import DataError, UsageError, distributed, get_reporter
from .checkpoints import restore_checkpoint
from .config import FinetuneConfig, Run, TrainState

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
    from ..head import HeadModule, head_features, read_model_dir
    from ..models import load_classifier

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
        train_bn=bn in ("train", "adapt"),
        adapt_bn=bn == "adapt",
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
    train_forward = _train_compile(cfg, train_forward, device, precision, cfg.epochs * steps, bb, choice)

    optimizer, scheduler = optimizer_and_schedule(policy, cfg, device, steps)
    run = Run(
        cfg, start, feeding, model, policy, target, optimizer, scheduler,
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
        choose_train_precision(
            cfg.precision, device, model, policy, feed.input_shape, cfg.batch_size, steps, _arch(model)
        )
    )
    if choice["mode"] in ("probe", "records"):
        ms = choice["median_ms"]
        how = "medians of a short probe" if choice["mode"] == "probe" else "this host's speed records"
        get_reporter().info(
            f"--precision auto: a train step of {cfg.batch_size} takes {ms['fp32']:.0f} ms in fp32 and "
            f"{ms['bf16']:.0f} ms in bf16 autocast here ({how}) -> {precision}"
        )
    return precision, choice


def _arch(model: Any) -> str:
    bb = getattr(model, "backbone", None)
    return str(getattr(getattr(bb, "identity", None), "arch", "") or "")


def _train_compile(
    cfg: FinetuneConfig, inner: Any, device: Any, precision: str, steps: int, bb: Any, choice: dict[str, Any]
) -> Any:
    """The train step's forward, compiled or not as ``--compile`` and this host decide (step.py); how it
    was decided goes into report.json beside the precision (``precision_choice["compile"]``)."""
    from .step import TrainCompile

    arch = str(getattr(bb.identity, "arch", "") or "")
    fwd = TrainCompile(inner, device, precision, getattr(cfg, "compile", "auto"), steps, cfg.batch_size, arch)
    choice["compile"] = fwd.choice
    return fwd


def optimizer_and_schedule(policy: Any, cfg: FinetuneConfig, device: Any, steps_per_epoch: int) -> tuple[Any, Any]:
    """AdamW over the parts that train at epoch 0 (their requires_grad flags set first) at the policy's
    per-part rates, and the per-part warm-up + schedule (``LambdaLR``) over the run."""
    import torch

    policy.apply(0)  # requires_grad flags before the optimiser sees the parameters
    groups = policy.param_groups(cfg.weight_decay)
    optimizer = adamw(groups, cfg.lr, device)
    lambdas = policy.lr_lambdas(groups, steps_per_epoch, cfg.lr_schedule, cfg.warmup_epochs)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def adamw(groups: list[dict[str, Any]], lr: float, device: Any) -> Any:
    """AdamW with the fused kernel where torch has one for the device (one kernel for all parameters:
    measured 2x faster steps for ResNet-50's layer4 on the CPU, docs/performance.md), else the default."""
    import torch

    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, lr=lr)
