"""What `rt fit-head` writes besides the fit: the split's content keys, the temperature fitted on the
validation rows, and the head directory (meta.json, head.safetensors, ood.safetensors)."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from ..base import atomic_write_json, get_reporter

CALIBRATION_NOTE = (
    "temperature fitted on the same validation rows it is measured on: the 'after' figures are optimistic"
)


def write_split(out: Path, cfg: Any, split: Any) -> None:
    """split.json: the content keys of the training and validation rows (caches that record keys)."""
    if split.train_keys is None:
        return
    atomic_write_json(
        out / "split.json",
        {
            "seed": cfg.seed,
            "val_fraction": cfg.val_fraction if cfg.val is None else None,
            "val_cache": str(cfg.val) if cfg.val is not None else None,
            "train": split.train_keys,
            "val": split.val_keys or [],
        },
    )


def calibrate(head: Any, split: Any) -> dict[str, Any] | None:
    """Fit the head's temperature on the validation rows (minimum NLL of logits / T) and set it on the
    module; the validation log-loss and ECE before and after, or None without validation rows."""
    from .temperature import calibration_summary, fit_temperature

    if split.X_val is None or split.y_val is None:
        return None
    logits = head.logits(split.X_val)
    t = fit_temperature(logits, split.y_val)
    head.module_.temperature = t
    summary = calibration_summary(logits, split.y_val, t)
    if summary["on_bound"]:
        get_reporter().warn(
            f"the temperature hit its search bound (T={t:.3g}) on {len(split.y_val)} validation rows: "
            "too few or too easy rows to calibrate with; treat the probabilities with care"
        )
    summary["note"] = CALIBRATION_NOTE
    return summary


def write_head_dir(
    out: Path, head: Any, identity: Any, classes: list[str], report: dict[str, Any], ood: Any = None
) -> None:
    """meta.json (identity, classes, the head config with its temperature and features) + head.safetensors
    (+ ood.safetensors and meta.json's "ood": the out-of-distribution scorers, ood_store.py)."""
    from .directory import write_model_dir
    from .ood_store import ood_tensors

    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    ood_files, ood_meta = ood_tensors(ood) if ood is not None else ({}, {})
    write_model_dir(
        out,
        kind="head",
        identity=identity,
        classes=classes,
        head_config=head.module_.config,
        tensors={"head.safetensors": head.module_.state_dict(), **ood_files},
        extra_meta={
            **ood_meta,
            "created": created,
            "fit": {
                "solver": head.solver,
                "l2": head.l2_,
                "cache": report["cache"],
                "validation": report["validation"],
                "features": report["features"],
            },
        },
    )
