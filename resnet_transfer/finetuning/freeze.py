"""The freeze policy of `rt finetune`: which parts train, from which epoch, at what learning rate.

Lightning's ``BaseFinetuning`` / fastai's ``fine_tune`` idea as one small object. The head trains at ``lr``,
the top stage at ``lr * lr_mult``, the next at ``lr * lr_mult**2`` ...; a frozen part has
``requires_grad=False`` and stays in eval mode (its BatchNorm running statistics do not drift) while the
rest trains. :func:`lr_factor` is the learning-rate shape per part (cosine with warm-up, one-cycle or
constant), counted from the step that part is unfrozen, so a stage unfrozen late gets its own warm-up.
:func:`resolve_target` turns ``--unfreeze`` (incl. ``auto``, :data:`AUTO_RULE`) into the part to train.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..base import UsageError

BN_MODES = ("auto", "frozen", "train", "adapt")


def resolve_bn(mode: str, random_init: bool) -> str:
    """``--bn`` -> ``frozen`` or ``train``. Frozen statistics keep the fitted head's features the same
    when its backbone starts to train (with batch statistics of a small batch they are not, and the head
    the run starts from no longer fits: measured in docs/finetune.md); a random-init backbone has no
    statistics worth keeping. ``adapt``: batch statistics in every stage, the frozen ones too (their running
    statistics move to the target's; their weights stay), as fastai's ``train_bn``."""
    m = str(mode).lower()
    if m not in BN_MODES:
        raise UsageError(f"--bn {mode!r} is not known", "use auto, frozen, train or adapt")
    if m == "auto":
        return "train" if random_init else "frozen"
    return m


# `--unfreeze auto`: labelled images per class (median over classes) -> how many stages from the top train.
# Below the first threshold only the head trains; at or above the last one everything does.
AUTO_RULE: tuple[tuple[int, int], ...] = ((50, 0), (200, 1), (500, 2), (1000, 3))
AUTO_RULE_TEXT = (
    "median labelled images per class: < 50 -> head only; 50-199 -> top stage (layer4); 200-499 -> top two "
    "(layer3); 500-999 -> top three (layer2); >= 1000 -> all; a randomly initialised backbone (--weights none) "
    "-> all"
)


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
        train_bn: bool = True,
        adapt_bn: bool = False,
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
        self.train_bn = train_bn
        self.adapt_bn = adapt_bn  # frozen parts' BatchNorm layers use (and track) batch statistics too
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
        BatchNorm layers normalise with, and do not update, their running statistics). With ``train_bn``
        False the BatchNorm layers of the training parts stay in eval mode too: their scale and shift still
        learn, their statistics stay the pretrained ones (``--bn frozen``). With ``adapt_bn`` the BatchNorm
        layers of the frozen parts run in training mode as well (``--bn adapt``)."""
        from torch.nn.modules.batchnorm import _BatchNorm

        for p in self.plans:
            on = p.start is not None and p.start <= epoch
            for m in p.modules:
                m.train(on)
                if (on and not self.train_bn) or (not on and self.adapt_bn):
                    for sub in m.modules():
                        if isinstance(sub, _BatchNorm):
                            sub.train(not on)

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


def default_lr_mult(random_init: bool) -> float:
    """``--lr-mult`` when not given: 0.3 per stage down for pretrained weights, 1.0 from scratch."""
    return 1.0 if random_init else 0.3


def default_probe_epochs(fresh_head: bool, random_init: bool, target: str, epochs: int) -> int:
    """``--probe-epochs`` when not given: one head-only epoch before a pretrained backbone moves under a
    fresh (random) head; none otherwise."""
    return 1 if (fresh_head and not random_init and target != "head" and epochs > 1) else 0


def resolve_target(
    unfreeze: str,
    stages: Sequence[str],
    per_class: float,
    random_init: bool,
    *,
    cut: str | None = None,
    model: str = "this model",
    cache: Any = None,
) -> tuple[str, str | None]:
    """``--unfreeze`` -> (the part to train, the ``auto`` rule's one-line reason or ``None``). With cached
    maps at ``cut``, only stages after the cut can train (``auto`` is clamped; an explicit deeper choice is
    refused with the options that work)."""
    stages = list(stages)
    choices = unfreeze_choices(stages)
    if unfreeze not in choices:
        raise UsageError(f"--unfreeze {unfreeze!r} is not a stage of {model}", f"use one of: {', '.join(choices)}")
    target, reason = unfreeze, None
    if target == "auto":
        target, why = auto_unfreeze(per_class, stages, random_init)
        reason = f"--unfreeze auto -> {target}: {why} (rule: {AUTO_RULE_TEXT})"
    if cut is None:
        return target, reason
    after = stages[stages.index(cut) + 1 :]
    allowed = ["head", *reversed(after)]
    if target in allowed:
        return target, reason
    if unfreeze == "auto":
        clamp = after[0] if after else "head"
        return clamp, f"{reason}; the cache is cut at {cut}, so the deepest it allows is {clamp}"
    raise UsageError(
        f"--unfreeze {target} needs the images: --cache {cache} holds maps at {cut}, and "
        f"{target} {'includes' if target == 'all' else 'is at or below'} that cut",
        f"with this cache use --unfreeze {' or '.join(allowed[1:] or ['head'])}; to train deeper, "
        f"use --data (or extract with an earlier --cut)",
    )
