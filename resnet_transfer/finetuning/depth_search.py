"""`--unfreeze auto` decided by validation where the run can afford it: one deeper candidate, then the better.

The count rule (:data:`freeze.AUTO_RULE`) picks a depth from the labelled images per class; it is cautious by
design (a small task's backbone moves little). After the rule's run has finished in ``OUT`` (a model like any
other, its start and every epoch already candidates), :func:`search_deeper` trains the next deeper part
(``head`` -> the top stage, ``layer4`` -> ``layer3`` ..., the lowest stage -> ``all``) from the same start,
with the same split, seed, epochs, schedule and precision, in ``OUT/trials/<part>``, and keeps whichever of the two
validates better on the run's monitor (``val_loss_cal`` by default; a tie keeps the rule's pick). The loser stays
whole under ``OUT/trials/<part>`` (nothing is lost), the winner is ``OUT``, and report.json's
``unfreeze_search`` says what each candidate validated at and why the winner won.

Where it cannot afford to, the rule decides alone and the report says why:

- fewer than :data:`MIN_VAL_ROWS` validation rows: the depth moved test accuracy by a few points at most on
  the transfer suite (docs/transfer.md), below what fewer images resolve (one image is 2 points at 50; the
  standard error of an accuracy near 0.7 is ~6.5 points), so the second run would buy noise (measured on
  issue 30's task shape, 30 validation images: 1.3-1.5x fastai's wall time with the search, 0.85x without);
- the deeper candidate, estimated at :data:`DEEPER_COST` times the rule's run, would take longer than
  ``max(MIN_BUDGET_S, BUDGET_FACTOR x the rule's run)`` (a long run is not doubled by default: pass a deeper
  ``--unfreeze`` to try it);
- nothing deeper can train (``all`` already; a cache of stage maps cut below the pick).

Under torchrun the loop does not call the search at all (report.json is rank 0's alone): the rule decides.

An interrupted trial resumes with ``rt finetune --resume OUT`` (its own checkpoints are under the trial); a
finished trial is read back, never trained again.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..base import Interrupted, atomic_write_json, get_reporter
from .config import CHECKPOINT_DIR, TRIALS_DIR, FinetuneConfig, monitor_beats
from .outputs import REPORT_JSON, FinetuneResult

MIN_VAL_ROWS = 50
DEEPER_COST = 1.5  # a deeper part's run against the rule's: more backward work per step (measured 1.2-1.9x)
BUDGET_FACTOR = 1.0
MIN_BUDGET_S = 60.0
_MODEL_FILES_KEEP = (CHECKPOINT_DIR, TRIALS_DIR, "start")  # not part of a model directory's files


def deeper_part(target: str, parts: list[str], allowed: list[str] | None = None) -> str | None:
    """The part one step deeper than ``target`` in a run's plan (``parts``: head first, then the stages top
    down), ``all`` below the lowest stage; ``None`` when nothing is deeper or ``allowed`` excludes it."""
    if target == "all" or target not in parts:
        return None
    i = parts.index(target)
    nxt = parts[i + 1] if i + 1 < len(parts) else "all"
    return nxt if allowed is None or nxt in allowed else None


def search_deeper(
    cfg: FinetuneConfig,
    main: FinetuneResult,
    train: Callable[..., FinetuneResult],
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """After the rule's run in ``cfg.out``: try one deeper part where affordable, keep the better (module
    docstring); ``main`` is the rule's result, ``train`` :func:`training.finetune` (passed in: this module is
    the loop's step after it, not a caller of the loop's module). Returns the kept run's result (``out`` is
    ``cfg.out``)."""
    out = Path(cfg.out)
    report = json.loads((out / REPORT_JSON).read_text())
    parts = [p["part"] for p in report.get("plan", [])]
    mine = _summary(report, main.seconds)
    deeper = _deeper(report, parts)
    why_not = _cannot(report, main, deeper)
    rep = get_reporter()
    if why_not is not None:
        report["unfreeze_search"] = {"candidates": {main.unfreeze: mine}, "chosen": main.unfreeze, "why": why_not}
        atomic_write_json(out / REPORT_JSON, report)
        rep.info(f"--unfreeze auto: {main.unfreeze} by the count rule alone ({why_not})")
        return main
    assert deeper is not None
    rep.info(
        f"--unfreeze auto: the rule's {main.unfreeze} validated at {cfg.monitor} {mine[cfg.monitor]:.4f}; "
        f"trying {deeper} from the same start in {out / TRIALS_DIR / deeper} (decided by validation)"
    )
    trial_dir = out / TRIALS_DIR / deeper
    precision = report.get("precision") or cfg.precision  # the rule's run's: both candidates at the same one
    sub = replace(cfg, unfreeze=deeper, out=trial_dir, overwrite=True, precision=precision)
    trial = _trial(sub, trial_dir, out, train, on_epoch_end)
    theirs = _summary(json.loads((trial_dir / REPORT_JSON).read_text()), trial.seconds)
    better = _better(theirs[cfg.monitor], mine[cfg.monitor], cfg.monitor)
    chosen = deeper if better else main.unfreeze
    why = (
        f"{deeper} validated at {cfg.monitor} {theirs[cfg.monitor]:.4f} against the rule's {main.unfreeze} at "
        f"{mine[cfg.monitor]:.4f}: {'better' if better else 'not better'}, so {chosen}"
    )
    if better:
        _swap(out, trial_dir, out / TRIALS_DIR / main.unfreeze)
    final = json.loads((out / REPORT_JSON).read_text())
    final["unfreeze_search"] = {
        "candidates": {main.unfreeze: mine, deeper: theirs},
        "chosen": chosen,
        "why": why,
        "rule": main.unfreeze,
        "loser_in": str(out / TRIALS_DIR / (main.unfreeze if better else deeper)),
    }
    atomic_write_json(out / REPORT_JSON, final)
    rep.info(f"--unfreeze auto: {why}")
    return replace(trial, out=out) if better else main


def _deeper(report: dict[str, Any], parts: list[str]) -> str | None:
    cut = report.get("cached_stage")
    allowed = None
    if cut:  # cached maps: only the parts after the cut can train
        allowed = parts[: parts.index(cut)] if cut in parts else ["head"]
    return deeper_part(str(report.get("unfreeze")), parts, allowed)


def _cannot(report: dict[str, Any], main: FinetuneResult, deeper: str | None) -> str | None:
    """Why the search cannot afford to run (``None``: it can)."""
    n_val = int(report.get("n_val") or 0)
    if deeper is None:
        return f"nothing deeper than {main.unfreeze} can train here"
    if n_val < MIN_VAL_ROWS:
        return f"{n_val} validation images (< {MIN_VAL_ROWS}): too few to choose between depths"
    estimate = DEEPER_COST * main.seconds
    budget = max(MIN_BUDGET_S, BUDGET_FACTOR * main.seconds)
    if estimate > budget:
        return (
            f"{deeper} would take about {estimate:.0f} s (the rule's run took {main.seconds:.0f} s), more than the "
            f"search's budget of {budget:.0f} s; pass --unfreeze {deeper} to try it"
        )
    return None


def _summary(report: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {
        "val_loss": report.get("val_loss"),
        "val_acc": report.get("accuracy"),
        "val_loss_cal": report.get("val_loss_cal"),
        "best_epoch": report.get("best_epoch"),
        "kept_start": report.get("kept_start"),
        "seconds": round(float(seconds), 2),
    }


def _better(theirs: float | None, mine: float | None, monitor: str) -> bool:
    if theirs is None or mine is None:
        return False
    return monitor_beats(monitor, theirs, mine)


def _trial(
    cfg: FinetuneConfig,
    trial_dir: Path,
    out: Path,
    train: Callable[..., FinetuneResult],
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None,
) -> FinetuneResult:
    """The deeper candidate's run: read back when finished, resumed when interrupted, else started."""
    from .checkpoints import LAST_CKPT

    if (trial_dir / REPORT_JSON).exists() and (trial_dir / "meta.json").exists():
        rep = json.loads((trial_dir / REPORT_JSON).read_text())
        get_reporter().info(f"{trial_dir}: finished earlier (read back, not trained again)")
        return FinetuneResult(trial_dir, int(rep.get("epochs_run", 0)), int(rep.get("best_epoch", -1)),
                              {"val_loss": rep.get("val_loss"), "val_acc": rep.get("accuracy"),
                               "val_loss_cal": rep.get("val_loss_cal")},
                              bool(rep.get("stopped_early")), str(rep.get("unfreeze")), float(rep.get("seconds", 0.0)),
                              list(rep.get("history", [])))  # fmt: skip
    resume = trial_dir if (trial_dir / CHECKPOINT_DIR / LAST_CKPT).exists() else None
    try:
        return train(cfg, resume=resume, on_epoch_end=on_epoch_end)
    except Interrupted as exc:
        raise Interrupted(
            f"{exc.message} (the --unfreeze auto search's deeper candidate)",
            f"continue the search with `rt finetune --resume {out}`",
        ) from None


def _swap(out: Path, winner: Path, loser_to: Path) -> None:
    """``out``'s model files move to ``loser_to``; ``winner``'s are copied into ``out`` (meta.json last in both,
    so neither directory is ever a half-written model); each meta.json names its own directory as weights."""
    loser_to.mkdir(parents=True, exist_ok=True)
    (loser_to / "meta.json").unlink(missing_ok=True)
    names = [p.name for p in out.iterdir() if p.name not in _MODEL_FILES_KEEP and p.name != "meta.json"]
    meta = out / "meta.json"
    if meta.exists():
        meta.replace(loser_to / ".meta.json.pending")
    for name in names:
        dest = loser_to / name
        if dest.is_dir():
            shutil.rmtree(dest)
        (out / name).replace(dest)
    for p in winner.iterdir():
        if p.is_file() and p.name not in _MODEL_FILES_KEEP and p.name != "meta.json":
            shutil.copy2(p, out / p.name)
    _place_meta(winner / "meta.json", out / "meta.json", out, copy=True)
    if (loser_to / ".meta.json.pending").exists():
        _place_meta(loser_to / ".meta.json.pending", loser_to / "meta.json", loser_to, copy=False)


def _place_meta(src: Path, dest: Path, weights_dir: Path, copy: bool) -> None:
    meta = json.loads(src.read_text())
    meta.setdefault("identity", {})["weights"] = str(weights_dir)
    atomic_write_json(dest, meta)
    if not copy:
        src.unlink()
