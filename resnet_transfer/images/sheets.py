"""Image grids (contact sheets): decode the listed images, draw them as labelled thumbnails in one PNG.

Used by `rt evaluate --worst N` (the most confidently wrong images, fastai's ``plot_top_losses``), `rt audit`
(the images its findings name) and `rt suggest`. A cache stores paths relative to the folder it was
extracted from; :func:`image_root` finds that folder (``--root``, else the root the cache records with
``rt extract --record-root``, else the cache's own folder or the working directory when the files are there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..base import atomic_path

THUMB = 112
CAPTION_LINES = 2
MAX_COLS = 8


def image_root(cache: Any, root: str | Path | None = None) -> Path | None:
    """The folder ``cache.paths`` are relative to: ``root`` if given, else the recorded root, else the
    cache's folder or the working directory if the first path exists under it; ``None`` if none works."""
    if root is not None:
        return Path(root)
    recorded = (getattr(cache, "attrs", {}) or {}).get("root")
    if recorded:
        return Path(recorded)
    first = next((p for p in cache.paths if p), None)
    if first is None:
        return None
    if Path(first).is_absolute():
        return Path("/")
    for guess in (Path(cache.path).parent, Path.cwd()):
        if (guess / first).exists():
            return guess
    return None


def resolve(paths: Sequence[str], root: Path | None) -> list[Path | None]:
    """Absolute paths of ``paths`` under ``root`` (absolute paths stay); ``None`` where not resolvable."""
    out: list[Path | None] = []
    for p in paths:
        q = Path(p)
        if q.is_absolute():
            out.append(q)
        else:
            out.append((root / q).resolve() if root is not None else None)
    return out


def _thumbnail(path: Path | None, size: int) -> Any:
    from PIL import Image

    from .data import load_image

    tile = Image.new("RGB", (size, size), (235, 235, 235))
    if path is None:
        return tile, "not found"
    try:
        img = load_image(path)
    except Exception as exc:  # a sheet is a picture: an unreadable file becomes a grey tile that says so
        return tile, f"unreadable ({type(exc).__name__})"
    from PIL import ImageOps

    img = ImageOps.contain(img, (size, size))  # up or down to fit the tile, aspect kept
    tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return tile, None


def contact_sheet(
    items: Sequence[tuple[Path | None, str]],
    out: str | Path,
    thumb: int = THUMB,
    cols: int | None = None,
    title: str | None = None,
) -> Path:
    """Write a grid PNG of ``(image path, caption)`` items (caption lines split on ``\\n``, at most two
    shown) to ``out``; unreadable or missing images become grey tiles saying so. Returns ``out``."""
    from PIL import Image, ImageDraw, ImageFont

    n = max(1, len(items))
    cols = cols or min(MAX_COLS, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    font = ImageFont.load_default()
    line_h = 12
    cap_h = CAPTION_LINES * line_h + 4
    top = 18 if title else 0
    sheet = Image.new("RGB", (cols * (thumb + 4) + 4, top + rows * (thumb + cap_h + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 3), title[:160], fill=(0, 0, 0), font=font)
    max_chars = max(8, thumb // 6)
    for i, (path, caption) in enumerate(items):
        r, c = divmod(i, cols)
        x, y = 4 + c * (thumb + 4), top + 4 + r * (thumb + cap_h + 4)
        tile, problem = _thumbnail(path, thumb)
        sheet.paste(tile, (x, y))
        lines = ([problem] if problem else []) + caption.split("\n")
        for j, line in enumerate(lines[:CAPTION_LINES]):
            shown = line if len(line) <= max_chars else "~" + line[-(max_chars - 1) :]  # a path's end names it
            draw.text((x, y + thumb + 2 + j * line_h), shown, fill=(0, 0, 0), font=font)
    out = Path(out)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG", optimize=True)
    return out


def most_confidently_wrong(y_true: Any, probs: np.ndarray, n: int) -> np.ndarray:
    """Indices of up to ``n`` misclassified rows, highest probability of the wrong prediction first."""
    p = np.asarray(probs)
    y = np.asarray(y_true)
    pred = p.argmax(1)
    wrong = np.flatnonzero(pred != y)
    order = np.argsort(-p[wrong, pred[wrong]], kind="stable")
    return wrong[order[: max(0, int(n))]]


def plot_top_losses(
    paths: Sequence[Path | None],
    y_true: Any,
    probs: np.ndarray,
    classes: Sequence[str],
    n: int,
    out: str | Path,
    title: str | None = None,
) -> list[dict[str, Any]]:
    """Write the grid of the ``n`` most confidently wrong images (true label, prediction and its
    probability, the true label's probability) to ``out``; returns those rows as plain data."""
    p = np.asarray(probs)
    y = np.asarray(y_true)
    idx = most_confidently_wrong(y, p, n)
    rows, items = [], []
    for i in idx:
        pred = int(p[i].argmax())
        rows.append(
            {
                "path": str(paths[i]) if paths[i] is not None else None,
                "true": classes[int(y[i])],
                "predicted": classes[pred],
                "probability": float(p[i, pred]),
                "probability_of_true": float(p[i, int(y[i])]),
            }
        )
        items.append((paths[i], f"true {classes[int(y[i])]}\npred {classes[pred]} {p[i, pred]:.2f}"))
    contact_sheet(items, out, title=title or f"{len(idx)} most confidently wrong")
    return rows
