"""The `rt finetune` checkpoint: ``checkpoints/last.pt`` after every epoch (model, optimiser, scheduler,
scaler, every random generator and the loop's :class:`~resnet_transfer.finetuning.config.TrainState`), so that
``--resume`` continues bit for bit; ``best.pt`` holds the best epoch's weights. Loaded with
``weights_only=True``: tensors and plain data only, no code runs.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from ..base import RtError, atomic_path, distributed
from .config import CHECKPOINT_DIR, Run, TrainState

LAST_CKPT = "last.pt"
BEST_CKPT = "best.pt"
CKPT_FORMAT = "resnet_transfer.finetune-checkpoint"
CKPT_VERSION = 1


def save_best(run: Run, epoch: int, weights: dict[str, Any] | None = None) -> None:
    """``checkpoints/best.pt``: the weights of the best epoch so far (``weights``, else the model's now)."""
    state = weights if weights is not None else run.model.state()
    atomic_torch_save({"format": CKPT_FORMAT, "epoch": epoch + 1, "model": state}, run.ck_dir / BEST_CKPT)


def save_checkpoint(run: Run) -> None:
    """``checkpoints/last.pt``: model, optimiser, scheduler, scaler, every RNG and the loop state (rank 0)."""
    atomic_torch_save(
        {
            "format": CKPT_FORMAT,
            "version": CKPT_VERSION,
            "config": run.cfg.to_json(),
            "epoch": run.state.epoch,
            "model": run.model.state(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": _rng_state(run.generator),
            "state": run.state.to_json(),
        },
        run.ck_dir / LAST_CKPT,
    )


def restore_checkpoint(run: Run, ckpt: dict[str, Any]) -> None:
    """The inverse of :func:`save_checkpoint` on a freshly built run."""
    run.model.load(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"], run.generator)
    run.state = TrainState.from_json(ckpt["state"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A finetune checkpoint (a file, or an output directory's last one), loaded with ``weights_only=True``
    (tensors and plain data only: no code runs)."""
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


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    if not distributed.is_main():  # under torchrun only rank 0 writes checkpoints
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
