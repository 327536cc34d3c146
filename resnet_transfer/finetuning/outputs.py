"""What a finished `rt finetune` run writes: the model directory (backbone + head, for predict / evaluate /
export, and as ``--weights DIR``), report.json and curves.png; and the check that ``--out`` may be written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base import UsageError, atomic_write_json, get_reporter, plot_training_curves
from .config import TRIALS_DIR, Run


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
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable images


CURVES_PNG = "curves.png"
REPORT_JSON = "report.json"


def check_out(out: Path, overwrite: bool, checkpoint_dir: str, last_ckpt: str) -> None:
    """Refuse an ``--out`` that holds a model or an unfinished run (unless ``overwrite``: then the old model
    stops being one before the new run starts)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", "give a directory name")
    if out.exists() and any(out.iterdir()) and not overwrite:
        if (out / "meta.json").exists():
            raise UsageError(f"--out {out} already holds a model", "choose another --out, or pass --overwrite")
        if (out / checkpoint_dir / last_ckpt).exists():
            raise UsageError(
                f"--out {out} holds an unfinished finetune run",
                f"continue it with `rt finetune --resume {out}`, or pass --overwrite to start over",
            )
    if overwrite and out.is_dir():
        (out / "meta.json").unlink(missing_ok=True)
        shutil.rmtree(out / checkpoint_dir, ignore_errors=True)
        shutil.rmtree(out / TRIALS_DIR, ignore_errors=True)  # an earlier run's --unfreeze auto candidates


def write_outputs(run: Run, seconds: float) -> FinetuneResult:
    """Write the model directory (meta.json last), report.json and curves.png of a finished run."""
    import torch

    from ..backbone import BACKBONE_FILE, BackboneIdentity, save_backbone, sha256_file
    from ..head import HEAD_FILE, write_model_dir, write_split

    cfg, state, model = run.cfg, run.state, run.model
    out = Path(cfg.out)
    model.net.cpu().to(memory_format=torch.contiguous_format)
    model.head.cpu()
    ident = run.start.backbone.identity
    save_backbone(model.net, out / BACKBONE_FILE, ident)
    identity = BackboneIdentity(
        model=ident.model,
        arch=ident.arch,
        weights=str(out),
        weights_id="sha256:" + sha256_file(out / BACKBONE_FILE),
        transform=ident.transform,
        num_features=ident.num_features,
    )
    history = state.history
    best_row = _best_row(state)
    report = _report(run, best_row, seconds)
    from .ood_outputs import model_ood  # the out-of-distribution scorers on the final backbone (head/ood.py)

    ood_files, ood_meta, report["ood"] = model_ood(run)
    png = plot_training_curves(
        history, out / CURVES_PNG, f"finetune {ident.model}: unfreeze {run.target}", state.best_epoch
    )
    atomic_write_json(out / REPORT_JSON, report)
    if run.feeding.split is not None:  # a later `rt finetune` from this directory keeps the same split
        sp = run.feeding.split
        write_split(out, sp["seed"], sp["val_fraction"], sp["train"], sp["val"])
    write_model_dir(
        out,
        "finetuned",
        identity,
        run.feeding.classes,
        model.head.config,
        {HEAD_FILE: model.head.state_dict(), **ood_files},
        extra_meta={
            "finetune": {"unfreeze": run.target, "schedule": cfg.schedule, "best_epoch": state.best_epoch},
            **ood_meta,
        },
        extra_files=[BACKBONE_FILE],
    )
    rep = get_reporter()
    kept = state.start is not None and state.best_epoch == -1
    rep.info(
        f"wrote {out}: "
        + ("the start (no epoch beat it on validation: kept)" if kept else f"best epoch {state.best_epoch + 1}")
        + (
            f", val acc {best_row['val_acc']:.3f}, val loss {best_row['val_loss']:.4f}"
            if best_row["val_acc"] is not None
            else ""
        )
        + f"; curves in {png.name}"
    )
    skipped = sorted(state.skipped.items())
    if skipped:
        rep.warn(f"{len(skipped)} image(s) could not be read and were skipped (listed in {out / REPORT_JSON}):")
        for p, reason in skipped[:20]:
            rep.warn(f"  {p}: {reason}")
    best = {k: best_row.get(k) for k in ("val_loss", "val_acc", "val_loss_cal", "train_loss", "train_acc")}
    return FinetuneResult(
        out, len(history), state.best_epoch, best, state.stopped, run.target, seconds, history, skipped
    )


def _defaults_used(run: Run) -> dict[str, Any]:
    """The training options left at their defaults, with the value each resolved to in this run (the
    ``None`` ones depend on the start: docs/finetune.md)."""
    from dataclasses import fields

    resolved = {
        "lr_mult": run.policy.plans[1].lr / run.policy.plans[0].lr if len(run.policy.plans) > 1 else None,
        "probe_epochs": min((p.start for p in run.policy.plans[1:] if p.start is not None), default=None),
        "bn": "adapt" if run.policy.adapt_bn else "train" if run.policy.train_bn else "frozen",
        "unfreeze": run.target,
    }
    skip = {"out", "head", "data", "cache", "val", "model", "weights", "overwrite", "device", "workers", "seed"}
    out = {}
    for f in fields(run.cfg):
        if f.name in skip or f.name == "precision":
            continue
        value = getattr(run.cfg, f.name)
        if value == f.default:
            out[f.name] = resolved.get(f.name, value)
    return out


def _best_row(state: Any) -> dict[str, Any]:
    """The row of the weights handed back: the best epoch's, or the start's (``best_epoch`` -1) when no
    epoch beat it on validation."""
    if state.start is not None and state.best_epoch == -1:
        return {"epoch": -1, "train_loss": None, "train_acc": None, **state.start}
    history = state.history
    return history[state.best_epoch] if 0 <= state.best_epoch < len(history) else history[-1]


def _head_selection(head_dir: Any) -> dict[str, Any] | None:
    """The starting head's ``head_selection`` (linear probe or MLP, and the scores), from its report.json."""
    try:
        return json.loads((Path(head_dir) / "report.json").read_text()).get("head_selection")
    except (OSError, TypeError, ValueError, AttributeError):
        return None


def _selection(cfg: Any, state: Any, kept: bool) -> str:
    margin = (
        f" by more than {cfg.start_margin:g} standard error(s) of the per-image difference"
        if cfg.start_margin > 0 and state.start_losses is not None
        else ""
    )
    if kept:
        return f"the start: no epoch improved {cfg.monitor} on it{margin}"
    return f"epoch {state.best_epoch + 1}: the best {cfg.monitor}" + (
        f" (the start included; an epoch had to beat it{margin})" if state.start else ""
    )


def _report(run: Run, best_row: dict[str, Any], seconds: float) -> dict[str, Any]:
    cfg, state, feed = run.cfg, run.state, run.feed
    history = state.history
    kept = state.start is not None and state.best_epoch == -1
    return {
        "kind": "finetune",
        "accuracy": best_row["val_acc"],
        "val_loss": best_row["val_loss"],
        "val_loss_cal": best_row.get("val_loss_cal"),  # at the temperature fitted to these logits
        "n_train": feed.n_train,
        "n_val": feed.n_val,
        "seconds": round(seconds, 2),
        "best_epoch": state.best_epoch,
        "start_validation": state.start,  # the starting point, validated before any step: a candidate
        "kept_start": kept,  # no epoch beat the start on validation: the start's weights are handed back
        "lr_find": state.lr_find,  # --lr-find: the range test and the rate it chose (lr_find.py)
        "selection": _selection(cfg, state, kept),
        "epochs_run": len(history),
        "stopped_early": state.stopped,
        "unfreeze": run.target,
        "unfreeze_auto": run.start.auto_reason,
        "schedule": cfg.schedule,
        "bn": "adapt" if run.policy.adapt_bn else "train" if run.policy.train_bn else "frozen",
        "temperature": float(getattr(run.model.head, "temperature", 1.0)),
        "calibration": run.calibration,
        "plan": [{"part": p.name, "from_epoch": p.start, "lr": p.lr} for p in run.policy.plans],
        "unfreeze_events": [{"epoch": r["epoch"], "stages": r["unfrozen"]} for r in history if r["unfrozen"]],
        "cached_stage": run.feeding.cut,
        "start": {
            "head": run.start.head_source,
            "head_selection": _head_selection(cfg.head),  # fit-head --head auto: what validation said
            "backbone": run.start.backbone.identity.to_dict(),
        },
        "precision": run.precision,
        "precision_choice": state.precision_choice,
        "device": run.device.type,
        "config": json.loads(cfg.to_json()),
        "defaults_used": _defaults_used(run),
        "skipped": [{"path": p, "reason": r} for p, r in sorted(state.skipped.items())],
        "history": history,
    }
