"""The eval transform each model spec (``--model``, ``--weights``, ``--image-size``) resolved to on this host,
kept so that the next `rt extract` of the same spec can start decoding crops (``images.early_crops``) before
torch and timm are loaded. Only a guess: the crops are used only if the backbone built has exactly this
transform, so a stale entry costs nothing but the early start.

The file sits beside the speed records (``<records>-transforms.json``, :func:`speed_records.records_path`):
``{"transforms": {"model|weights|size": TransformConfig dict}}``, the :data:`KEEP` most recent specs, written
atomically; an unreadable or read-only file only costs the early start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..base import RtError, atomic_write_json
from ..images import TransformConfig
from .speed_records import records_path

KEEP = 64


def memo_path() -> Path:
    records = records_path()
    return records.with_name(f"{records.stem}-transforms.json")


def _key(model: str, weights: str, image_size: int | None) -> str:
    return f"{model}|{weights}|{image_size or ''}"


def _load() -> dict[str, Any]:
    try:
        data = json.loads(memo_path().read_text())
        table = data["transforms"]
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def recalled_transform(model: str, weights: str, image_size: int | None) -> TransformConfig | None:
    """The transform this spec resolved to last time on this host, or None."""
    entry = _load().get(_key(model, weights, image_size))
    try:
        return TransformConfig.from_dict(entry) if isinstance(entry, dict) else None
    except (KeyError, TypeError, ValueError):
        return None


def remember_transform(model: str, weights: str, image_size: int | None, transform: TransformConfig) -> None:
    """Keep ``transform`` as what this spec resolves to (a write only when it changed)."""
    table = _load()
    key = _key(model, weights, image_size)
    if table.get(key) == transform.to_dict():
        return
    table.pop(key, None)
    table[key] = transform.to_dict()
    path = memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"transforms": dict(list(table.items())[-KEEP:])})
    except (OSError, RtError):  # read-only or full: later runs only lose the early start
        pass
