"""`rt finetune --lr-find`: the learning rate from a range test on this run, as fastai's ``lr_find``.

Before the first epoch, the run's own model, freeze policy (the parts that train at epoch 0 and their
per-stage rates) and training feed take ``STEPS`` steps with the head's rate rising exponentially from
``START`` to ``END`` (each stage at its usual fraction of it), on a separate random stream; the loss is
smoothed (exponential average, bias-corrected) and the test stops once it exceeds four times its minimum.
The suggestion (:func:`suggest`), against the median loss of the first fifth of the steps: where the loss
falls more than 10% below it, its steepest descent (fastai's ``steep``); where it does not, as from a
fitted head, a tenth of the last rate before it rises 10% above it for good; clamped to ``[1e-6, 0.1]``. Then every
weight and BatchNorm statistic is put back, and the run trains with ``--lr`` set to the suggestion.
report.json's ``lr_find`` keeps the curve and the choice; ``lr_find.png`` draws it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..base import get_reporter

STEPS = 100
START, END = 1e-7, 10.0
LO, HI = 1e-6, 0.1


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, str]:
    """The rate to train at, from the smoothed loss against the rate, and a one-line reason.

    The baseline is the median smoothed loss over the first fifth of the steps (rates too small to move
    anything; batch-to-batch noise averaged out). Where the loss falls more than 10% below it (a fresh
    head), the point of steepest descent before the minimum (the most negative slope against log rate;
    fastai's ``steep``). Where it does not (a fitted head starts near its optimum on these rows), a tenth of
    the last rate before the loss rises 10% above the baseline for good: the edge where steps start to
    move the model, with a margin. Clamped to [LO, HI]."""
    if len(lrs) < 5:
        return 1e-3, f"{len(lrs)} step(s) only: the default 1e-3"
    base = float(sorted(losses[: max(3, len(losses) // 5)])[max(3, len(losses) // 5) // 2])
    i = min(range(len(losses)), key=lambda k: losses[k])
    if i >= 2 and losses[i] < 0.9 * base:
        slope = {
            k: (losses[k + 1] - losses[k - 1]) / (math.log(lrs[k + 1]) - math.log(lrs[k - 1])) for k in range(1, i)
        }
        k = min(slope, key=lambda j: slope[j])
        lr, why = lrs[k], f"steepest descent of the loss at lr {lrs[k]:.2e} (from {base:.4f} to {losses[i]:.4f})"
    else:
        edge = len(losses) - 1
        while edge > 0 and losses[edge] > 1.1 * base:
            edge -= 1
        lr = lrs[edge] / 10.0
        why = f"loss level ({base:.4f}) up to lr {lrs[edge]:.2e}, then rising -> a tenth of it"
    lr = min(HI, max(LO, lr))
    return lr, f"{why} over {len(lrs)} steps: lr {lr:.2e}"


def lr_range_test(run: Any, steps: int = STEPS) -> dict[str, Any]:
    """Run the range test on ``run`` (see the module docstring); the run's weights are left as they were.
    Returns ``{"lrs", "losses", "suggestion", "reason", "steps"}``."""
    import torch

    from ..base import autocast
    from .start import adamw

    cfg, policy, device = run.cfg, run.policy, run.device
    saved = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    policy.apply(0)
    policy.train_mode(0)
    groups = policy.param_groups(cfg.weight_decay)
    share = [g["lr"] / cfg.lr for g in groups]  # each part's fraction of the head's rate
    opt = adamw(groups, cfg.lr, device)
    scaler = torch.amp.GradScaler("cuda", enabled=run.precision == "fp16")
    gen = torch.Generator().manual_seed(cfg.seed + 7919)  # not the run's stream: training draws as without it
    lrs: list[float] = []
    losses: list[float] = []
    avg, best, k = 0.0, math.inf, 0
    with get_reporter().progress("lr range test", total=steps, unit="step") as bar:
        while k < steps:
            for x, y in run.feed.train_batches(gen):
                lr = START * (END / START) ** (k / max(1, steps - 1))
                for g, s in zip(opt.param_groups, share):
                    g["lr"] = lr * s
                x = run.feed.to_input(x, device)
                with autocast(device, run.precision):
                    logits = run.model(x)  # eager: the train step's compile decision is not disturbed
                loss = torch.nn.functional.cross_entropy(
                    logits.float(), y.to(device), label_smoothing=cfg.label_smoothing
                )
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                avg = 0.98 * avg + 0.02 * float(loss)
                smooth = avg / (1 - 0.98 ** (k + 1))
                lrs.append(lr)
                losses.append(smooth)
                best = min(best, smooth)
                k += 1
                bar.advance(1)
                if k >= steps or not math.isfinite(smooth) or smooth > 4 * best:
                    k = steps if k < steps else k
                    break
    run.model.load_state_dict(saved)
    opt.zero_grad(set_to_none=True)
    lr, reason = suggest(lrs, losses)
    get_reporter().info(f"--lr-find: {reason}")
    return {"lrs": lrs, "losses": losses, "suggestion": lr, "reason": reason, "steps": len(lrs)}


def plot_lr_find(found: dict[str, Any], path: Path) -> Path:
    """The smoothed loss against the rate (log scale), the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..base import save_png

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(found["lrs"], found["losses"])
    ax.axvline(found["suggestion"], color="tab:red", ls="--", label=f"chosen lr {found['suggestion']:.2e}")
    ax.set(xscale="log", xlabel="head learning rate", ylabel="training loss (smoothed)", title="lr range test")
    ax.legend()
    out = save_png(fig, path)
    plt.close(fig)
    return out


def apply_lr_find(run: Any) -> None:
    """``--lr-find``: run the test, then train at the suggestion (every part's rate scaled by the same
    factor, optimiser and schedule rebuilt); the curve goes into the run's state (report.json) and
    ``lr_find.png``."""
    from ..base import distributed
    from .start import optimizer_and_schedule

    if distributed.launched():  # each rank would test on its own batches and choose its own rate
        get_reporter().warn("--lr-find is not run under torchrun: training at --lr")
        return
    found = lr_range_test(run, steps=STEPS)
    factor = found["suggestion"] / run.cfg.lr
    for plan in run.policy.plans:
        plan.lr *= factor
    run.cfg.lr = found["suggestion"]
    run.optimizer, run.scheduler = optimizer_and_schedule(run.policy, run.cfg, run.device, run.feed.steps_per_epoch())
    run.state.lr_find = {k: found[k] for k in ("suggestion", "reason", "steps", "lrs", "losses")}
    plot_lr_find(found, Path(run.cfg.out) / "lr_find.png")
