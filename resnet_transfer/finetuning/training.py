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

The run's configuration and live objects are in ``config.py``, how it starts in ``start.py``; which parts
train, from which epoch and at what learning rate is ``freeze.py``'s job; where batches come from (images, or
cached stage maps at a cut) ``feeds.py``'s; the model is one ``models.Classifier``; what a finished run
writes is in ``outputs.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..base import Interrupted, UsageError, distributed, get_reporter
from .checkpoints import (
    BEST_CKPT,
    LAST_CKPT,
    load_checkpoint,
    save_best,
    save_checkpoint,
)
from .config import CHECKPOINT_DIR, MONITORS, FinetuneConfig, Run, monitor_beats
from .outputs import FinetuneResult
from .start import build_run

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
    total_loss = torch.zeros((), device=device, dtype=torch.float64)  # summed on the device: no sync per step
    correct, seen = torch.zeros((), device=device, dtype=torch.long), 0
    steps = run.feed.steps_per_epoch()
    step_done = getattr(run.train_forward, "step_done", None)  # step.py: times the steps for --compile auto
    with get_reporter().progress(f"epoch {epoch + 1}/{cfg.epochs}", total=steps, unit="step") as bar:
        for x, y in run.feed.train_batches(run.generator):
            x = run.feed.to_input(x, device)
            y = y.to(device, non_blocking=True)
            with autocast(device, run.precision):
                logits = run.train_forward(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            run.optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss * run.train_forward.loss_weight(len(y))).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.scheduler.step()
            if step_done is not None:
                step_done(len(y))
            total_loss += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            bar.advance(1)
    if hasattr(run.train_forward, "finish"):
        run.train_forward.finish()  # this host's speed records (step.py)
    total_loss, correct, seen = distributed.all_reduce_sums(float(total_loss), int(correct), seen)
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
            x = run.feed.to_input(x, run.device)
            with autocast(run.device, run.precision):
                logits = run.model(x)
            yield logits.float(), y.to(run.device)


def validate(run: Run) -> dict[str, float | None]:
    """Loss and accuracy on the validation feed (``None`` without one); every rank validates a slice."""
    import torch

    run.val_losses = None
    if not run.feed.n_val:
        return {"val_loss": None, "val_acc": None, "val_loss_cal": None}
    total, correct, n = 0.0, 0, 0
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    for logits, y in val_logits(run):
        total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
        kept.append((logits.cpu().numpy(), y.cpu().numpy()))
    total, correct, n = distributed.all_reduce_sums(total, correct, n)
    row = {"val_loss": total / max(1, n), "val_acc": correct / max(1, n), "val_loss_cal": None}
    if not distributed.launched():  # each rank holds a slice: the temperature and the paired test need all
        row["val_loss_cal"], run.val_losses = _per_image(run.cfg.monitor, kept)
    return row


def _per_image(monitor: str, batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, np.ndarray]:
    """The calibrated validation loss (at the temperature fitted to these logits: what the delivered model
    has once :func:`recalibrate` ran) and each image's value of ``monitor``, lower is better (the paired
    test of :func:`track_best`)."""
    from ..head import fit_temperature, nll_rows

    z, y = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    cal = nll_rows(z, y, fit_temperature(z, y))
    if monitor == "val_acc":
        return float(cal.mean()), -(z.argmax(1) == y).astype(np.float64)
    return float(cal.mean()), cal if monitor == "val_loss_cal" else nll_rows(z, y)


def recalibrate(run: Run) -> None:
    """Refit the head's temperature for the final weights on the validation images (as `rt fit-head` does
    for a probe): a temperature fitted to the starting head's features says nothing about the finetuned
    ones. Without validation images (or under torchrun, where rank 0 sees a slice) it is reset to 1."""

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


def validate_start(run: Run) -> None:
    """Validate the starting point (the fitted head on the untouched backbone) before any step: it is a
    candidate like every epoch (``best_epoch`` -1), so a run in which no epoch beats it hands it back. A
    fresh (random) head is no starting point worth keeping: it is not validated."""
    if not run.feed.n_val or run.start.head_source == "fresh":
        return
    row = validate(run)
    run.state.start = dict(row)
    run.state.start_losses = None if run.val_losses is None else [float(v) for v in run.val_losses]
    track_best(run, {**row, "epoch": -1}, -1)
    run.state.bad = 0
    get_reporter().info(
        f"start (before any step): val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}"
        + (f" calibrated loss {row['val_loss_cal']:.4f}" if row.get("val_loss_cal") is not None else "")
        + " (a candidate like any epoch)"
    )


def start_kept(state: Any) -> bool:
    """Whether the run hands back its starting point (validated, and no epoch beat it)."""
    return state.start is not None and state.best_epoch == -1


def track_best(run: Run, row: dict[str, Any], epoch: int) -> None:
    """Keep the best epoch's weights in best.pt (an epoch held back by ``start_margin`` is not kept); stop
    early after ``patience`` epochs in which the monitor did not improve on the best value seen, held-back
    epochs included (never before the last stage has been unfrozen)."""
    cfg, state = run.cfg, run.state
    value = row.get(cfg.monitor)
    if value is None and cfg.monitor == "val_loss_cal":
        value = row["val_loss"]  # under torchrun (each rank a slice of validation): the raw loss
    if value is None:
        state.best_epoch = epoch  # no validation: the last epoch is the result
        return

    seen = state.best_seen if state.best_seen is not None else state.best
    improved = seen is None or monitor_beats(cfg.monitor, value, seen)  # progress, for early stopping
    better = state.best is None or monitor_beats(cfg.monitor, value, state.best)  # than the candidate kept
    paired = vs_start(run) if epoch >= 0 else None
    if paired is not None:
        row["vs_start"] = paired
        paired["held_back"] = better and not paired["clear"]  # better than the best so far, not clearly the start
        better = better and paired["clear"]
    if better:
        state.best, state.best_epoch = value, epoch
        run.best_state = run.model.state()  # a copy, on the CPU
        run.best_saved = False
    state.best_seen = value if improved else seen
    state.bad = 0 if improved else state.bad + 1
    if epoch < 0:
        return
    if cfg.patience and state.bad >= cfg.patience and epoch >= run.policy.last_start and epoch + 1 < cfg.epochs:
        state.stopped = True


def vs_start(run: Run) -> dict[str, Any] | None:
    """The latest validation against the start's, image by image: the mean gain in the monitor (> 0:
    better), its standard error, and whether the gain is more than ``start_margin`` standard errors (the
    same images, so the image-to-image spread cancels). On a few dozen validation images a better mean is
    often noise, and handing back a finetune no better than the probe it started from is the mistake the
    start candidate exists to prevent. ``None`` when there is no start or no per-image values (torchrun)."""
    start, now = run.state.start_losses, run.val_losses
    if start is None or now is None or len(start) != len(now) or len(now) < 2:
        return None
    d = np.asarray(start, dtype=np.float64) - np.asarray(now, dtype=np.float64)
    gain, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
    return {"gain": gain, "se": se, "clear": gain > float(run.cfg.start_margin) * se}


# -------------------------------------------------------------------------------------------------- loop


def finetune(
    cfg: FinetuneConfig,
    resume: str | Path | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Finetune (see the module docstring); with ``resume`` (an output directory) continue its run with
    the configuration saved in its checkpoint. ``on_epoch_end(epoch, row)`` is called after each epoch's
    checkpoint is written (a hook for callers; raising KeyboardInterrupt there stops the run resumably)."""
    from .lr_find import apply_lr_find
    from .outputs import check_out, write_outputs
    from .probe_start import probe_start

    distributed.setup_training(cfg.device)  # torchrun: join the group; ranks > 0 report warnings only
    cfg, ckpt = _config(cfg, resume)
    if ckpt is None:
        distributed.on_main(lambda: check_out(Path(cfg.out), cfg.overwrite, CHECKPOINT_DIR, LAST_CKPT))
        cfg = probe_start(cfg)  # no head directory: the probe the two-command workflow would start from
    run = build_run(cfg, ckpt)
    if ckpt is None and cfg.lr_find:
        apply_lr_find(run)  # a resumed run keeps the rate its checkpoint's config holds
    _announce(run)
    if ckpt is None:
        validate_start(run)
    t_start = time.perf_counter()
    seconds_before = sum(r.get("seconds", 0.0) for r in run.state.history)
    saved = run.state.epoch if ckpt is not None else 0  # the epochs the last checkpoint on disk holds
    t_saved = time.perf_counter()
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
        if checkpoint_due(cfg, epoch, run.state.stopped, time.perf_counter() - t_saved):
            _save(run)
            saved, t_saved = epoch + 1, time.perf_counter()
        if on_epoch_end is not None:
            try:
                on_epoch_end(epoch, row)
            except KeyboardInterrupt:
                if cfg.checkpoint_every == "auto" and saved != epoch + 1:  # between epochs: save it now
                    _save(run)
                    saved = epoch + 1
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

    result = distributed.on_main(finish)
    if cfg.unfreeze == "auto" and not distributed.launched():  # decided by validation where affordable
        from .depth_search import search_deeper

        result = search_deeper(cfg, result, finetune, on_epoch_end)
    return result


# --checkpoint-every auto: write once this much training would otherwise be lost to an interruption
CHECKPOINT_AUTO_S = 60.0


def checkpoint_due(cfg: FinetuneConfig, epoch: int, stopped: bool, unsaved_s: float = 0.0) -> bool:
    """Whether the resume checkpoint is written after ``epoch`` (0-based): after the last one (or an early
    stop), and before that every ``checkpoint_every`` epochs, or with ``auto`` once ``unsaved_s`` seconds of
    training since the last write reach :data:`CHECKPOINT_AUTO_S` (a checkpoint costs ~3x the model's size
    on disk; short epochs are cheaper to redo); never with ``checkpoint_every`` 0."""
    n = cfg.checkpoint_every
    if n == "auto":
        return unsaved_s >= CHECKPOINT_AUTO_S or epoch + 1 >= cfg.epochs or stopped
    return int(n) > 0 and ((epoch + 1) % int(n) == 0 or epoch + 1 >= cfg.epochs or stopped)


def _save(run: Run) -> None:
    if not run.best_saved and run.best_state is not None:
        save_best(run, run.state.best_epoch, run.best_state)
        run.best_saved = True
    save_checkpoint(run)


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
    if cfg.checkpoint_every != "auto":
        try:
            cfg.checkpoint_every = int(cfg.checkpoint_every)
        except ValueError:
            raise UsageError(
                f"--checkpoint-every {cfg.checkpoint_every!r} is not auto or a number of epochs", "e.g. auto, 1 or 0"
            ) from None
    checks = (
        ("--epochs", cfg.epochs, 1),
        ("--batch-size", cfg.batch_size, 1),
        ("--checkpoint-every", 0 if cfg.checkpoint_every == "auto" else cfg.checkpoint_every, 0),
        ("--start-margin", cfg.start_margin, 0),
    )
    for name, v, lo in checks:
        if v < lo:
            raise UsageError(f"{name} {v} must be at least {lo}")
    if cfg.monitor not in MONITORS:
        raise UsageError(f"--monitor {cfg.monitor!r} is not known", f"use one of {', '.join(MONITORS)}")
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


def _paired_note(row: dict[str, Any], margin: float) -> str:
    p = row.get("vs_start")
    if not p or not p.get("held_back"):
        return ""
    return f" (held back: vs the start {p['gain']:+.4f} ± {p['se']:.4f} per image, within {margin:g} SE)"


def _report_epoch(run: Run, row: dict[str, Any], epoch: int) -> None:
    rep, cfg, state = get_reporter(), run.cfg, run.state
    rep.info(
        f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}"
        + (f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}" if row["val_loss"] is not None else "")
        + (f" calibrated loss {row['val_loss_cal']:.4f}" if row.get("val_loss_cal") is not None else "")
        + f" | {row['seconds']:.1f}s"
        + (" (best)" if state.best_epoch == epoch else "")
        + _paired_note(row, cfg.start_margin)
    )
    if state.stopped:
        rep.info(
            f"early stop: no {cfg.monitor} improvement for {cfg.patience} epochs; best: "
            + ("the start" if state.best_epoch < 0 else f"epoch {state.best_epoch + 1}")
        )
