"""Minibatch AdamW for the head, with early stopping: :func:`fit_adamw`, fed by :class:`ArraySource` (in
memory) or :class:`ChunkSource` (streamed blocks, e.g. ``FeatureCache.iter_chunks``); :func:`fit_onecycle`
(a fixed one-cycle schedule, fastai's way of training a head: no validation needed); and
:func:`stream_statistics` (the standardisation of a stream, one pass)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ..base import get_reporter


class BatchSource:
    """Minibatches ``(x, y, w)`` (features, output indices, row weights) for one epoch."""

    def batches(self, epoch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        raise NotImplementedError  # pragma: no cover - interface


class ArraySource(BatchSource):
    """Shuffled minibatches of ``rows`` of in-memory arrays."""

    def __init__(self, X: np.ndarray, y: np.ndarray, w: np.ndarray, batch_size: int, rows: np.ndarray) -> None:
        self.X = torch.from_numpy(X)
        self.y = torch.from_numpy(y)
        self.w = torch.from_numpy(np.asarray(w, dtype=np.float32))
        self.rows = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        self.bs = int(batch_size)

    def batches(self, epoch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = self.rows[torch.randperm(len(self.rows), generator=g)]
        for i in range(0, len(perm), self.bs):
            idx = perm[i : i + self.bs]
            yield self.X[idx], self.y[idx], self.w[idx]


class ChunkSource(BatchSource):
    """Minibatches cut from streamed blocks (e.g. whole HDF5 chunks read in shuffled order); ``encode``
    turns a block's labels into output indices."""

    def __init__(
        self,
        chunks: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]],
        encode: Callable[[np.ndarray], np.ndarray],
        per_class: np.ndarray,
        batch_size: int,
    ) -> None:
        self.chunks = chunks
        self.encode = encode
        self.per_class = per_class.astype(np.float32)
        self.bs = int(batch_size)

    def batches(self, epoch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng(seed * 100_003 + epoch)
        for xb, yb in self.chunks(epoch):
            xb = np.ascontiguousarray(xb, dtype=np.float32)
            yi = self.encode(np.asarray(yb))
            perm = rng.permutation(len(xb))
            for i in range(0, len(perm), self.bs):
                idx = perm[i : i + self.bs]
                yield torch.from_numpy(xb[idx]), torch.from_numpy(yi[idx]), torch.from_numpy(self.per_class[yi[idx]])


def fit_adamw(
    module: nn.Module,
    source: BatchSource,
    val: tuple[np.ndarray, np.ndarray] | None,
    *,
    lr: float,
    weight_decay: float,
    epochs: int,
    patience: int,
    label_smoothing: float = 0.0,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """Minibatch AdamW with early stopping on the validation loss (the best epoch's weights are kept).
    Returns ``(history, epochs run)``; without ``val`` it runs ``epochs`` epochs."""
    opt = torch.optim.AdamW(list(module.parameters()), lr=float(lr), weight_decay=float(weight_decay))
    Xv_t = torch.from_numpy(val[0]) if val is not None else None
    yv_t = torch.from_numpy(np.asarray(val[1], np.int64)) if val is not None else None
    best_loss, best_state, bad = math.inf, None, 0
    history: list[dict[str, Any]] = []
    epoch = 0
    for epoch in range(int(epochs)):
        module.train()
        total, count = 0.0, 0
        for xb, yb, wb in source.batches(epoch, seed):
            per = nn.functional.cross_entropy(module(xb), yb, reduction="none", label_smoothing=label_smoothing)
            loss = (per * wb).sum() / wb.sum().clamp_min(1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(xb)
            count += len(xb)
        module.eval()
        entry: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / max(count, 1)}
        if Xv_t is not None and yv_t is not None:
            with torch.no_grad():
                lv = module(Xv_t)
                entry["val_loss"] = float(nn.functional.cross_entropy(lv, yv_t))
                entry["val_accuracy"] = float((lv.argmax(1) == yv_t).float().mean())
            if entry["val_loss"] < best_loss - 1e-4:
                best_loss, bad = entry["val_loss"], 0
                best_state = {k: v.clone() for k, v in module.state_dict().items()}
            else:
                bad += 1
        history.append(entry)
        if bad >= int(patience):
            get_reporter().info(f"early stop after epoch {epoch + 1} (best val loss {best_loss:.4f})")
            break
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return history, epoch + 1


ONECYCLE_MAX_STEPS = 2000  # above this many steps, the batch grows instead (large caches)


def onecycle_batch(n: int, batch_size: int, epochs: int) -> int:
    """The minibatch size one-cycle uses for ``n`` rows: ``batch_size``, at most half the rows (so an epoch
    has two steps; fastai drops a partial last batch), grown so ``epochs`` take at most
    ``ONECYCLE_MAX_STEPS`` steps."""
    bs = min(int(batch_size), max(2, n // 2))
    return max(bs, math.ceil(n * int(epochs) / ONECYCLE_MAX_STEPS))


def onecycle_at(step: int, total: int, peak: float, pct: float = 0.25) -> tuple[float, float]:
    """``(lr, beta1)`` at ``step`` of a one-cycle schedule of ``total`` steps (torch's ``OneCycleLR``
    defaults, as fastai's ``fit_one_cycle``): the lr rises from ``peak / 25`` to ``peak`` over the first
    ``pct`` of the steps and falls to ``peak / 25e4`` (cosine halves), beta1 moving 0.95 -> 0.85 -> 0.95."""
    up = max(1.0, pct * total - 1)
    lo, end = peak / 25.0, peak / 25.0 / 1e4

    def cos(a: float, b: float, f: float) -> float:
        return b + (a - b) / 2.0 * (math.cos(math.pi * f) + 1)

    if step <= up:
        f = step / up
        return cos(lo, peak, f), cos(0.95, 0.85, f)
    f = (step - up) / max(1.0, total - 1 - up)
    return cos(peak, end, f), cos(0.85, 0.95, f)


class OneCycleAdamW:
    """AdamW (decoupled weight decay, bias-corrected moments, beta2 0.99) under :func:`onecycle_at`, in plain
    tensor operations: ``torch.optim``'s constructor imports ``torch._dynamo`` (about 1 s), most of what a
    small `rt fit-head` would otherwise spend. Matches ``torch.optim.AdamW`` + ``OneCycleLR`` (tested)."""

    def __init__(self, params: Iterable[torch.Tensor], peak: float, total: int, weight_decay: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.peak, self.total, self.wd, self.t = float(peak), int(total), float(weight_decay), 0

    @torch.no_grad()
    def step(self) -> None:
        lr, b1 = onecycle_at(self.t, self.total, self.peak)
        self.t += 1
        c1, c2 = 1 - b1**self.t, 1 - 0.99**self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            p.mul_(1 - lr * self.wd)
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(0.99).addcmul_(p.grad, p.grad, value=0.01)
            p.addcdiv_(m, (v.sqrt() / math.sqrt(c2)).add_(1e-8), value=-lr / c1)


def fit_onecycle(
    module: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    *,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    label_smoothing: float = 0.0,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """:class:`OneCycleAdamW` peaking at ``lr`` for ``epochs`` passes over ``X`` in shuffled minibatches, the
    partial last one dropped (a BatchNorm head needs more than one row). Returns ``(history, steps)``."""
    n = len(X)
    bs = onecycle_batch(n, batch_size, epochs)
    per_epoch = max(1, n // bs)
    steps = int(epochs) * per_epoch
    opt = OneCycleAdamW(module.parameters(), lr, steps, weight_decay)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(np.asarray(y, np.int64))
    wt = torch.from_numpy(np.asarray(w, np.float32))
    g = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    module.train()
    for epoch in range(int(epochs)):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(per_epoch):
            idx = perm[i * bs : (i + 1) * bs]
            per = nn.functional.cross_entropy(
                module(Xt[idx]), yt[idx], reduction="none", label_smoothing=label_smoothing
            )
            loss = (per * wt[idx]).sum() / wt[idx].sum().clamp_min(1e-12)
            module.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        history.append({"epoch": epoch + 1, "train_loss": total / per_epoch})
    module.eval()
    return history, steps


def stream_statistics(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over checked ``(X block, output indices)``: ``(n, mean, std, class counts)`` in float64."""
    n, s1, s2, counts = 0, None, None, np.zeros(k)
    for xb, yb in chunks:
        x64 = xb.astype(np.float64)
        s1 = x64.sum(0) if s1 is None else s1 + x64.sum(0)
        s2 = (x64**2).sum(0) if s2 is None else s2 + (x64**2).sum(0)
        counts += np.bincount(yb, minlength=k)
        n += len(xb)
    if not n or s1 is None or s2 is None:
        return 0, np.zeros(0), np.zeros(0), counts
    mean = s1 / n
    return n, mean, np.sqrt(np.maximum(s2 / n - mean**2, 0.0)), counts
