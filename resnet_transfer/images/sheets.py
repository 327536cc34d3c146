"""Image grids (contact sheets): decode the listed images, draw them as labelled thumbnails in one PNG.

Used by `rt evaluate --worst N` (the most confidently wrong images, fastai's ``plot_top_losses``), `rt audit`
(the images its findings name) and `rt suggest`. A cache stores paths relative to the folder it was
extracted from; :func:`image_root` is the one answer to "where are a cache's images" for every tool that
opens them (``--root``, else the absolute folder the cache records, else that folder's recorded place
relative to the cache file, so a data folder moved together with its cache still works, else the cache's
own folder or the working directory when the files are there), and says which folders it looked in.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..base import DataError, RtError, atomic_path

THUMB = 112
CAPTION_LINES = 2
MAX_COLS = 8


SAMPLE = 8  # rows whose files are looked for to tell whether a folder holds a cache's images


@dataclass(frozen=True)
class ImageRoot:
    """Where a cache's relative image paths lead. ``folder`` is None when no folder tried holds the
    images; ``looked_in`` lists every folder tried, in order, with why it was tried; ``found`` says whether
    the images are in ``folder`` (a ``--root`` is used as given, even when they are not)."""

    folder: Path | None
    how: str = ""
    looked_in: tuple[tuple[Path, str], ...] = ()
    found: bool = True
    reader: Any = None  # a sources.Reader when the images are members of an archive, shards or a dataset

    def where(self) -> str:
        """``looked in /a (the folder it was extracted from), /b (...)``."""
        return "looked in " + ", ".join(f"{p} ({why})" for p, why in self.looked_in)

    def missing(self, what: str) -> str:
        """A one-line message: the images of ``what`` (``--pool pool.h5``) were not found, and where."""
        return f"{what}: its images were not found ({self.where()})"

    def require(self, what: str) -> Path:
        """``folder``, or a :class:`DataError` naming ``what`` and the folders looked in."""
        if self.folder is None:
            raise DataError(self.missing(what), ROOT_HINT)
        return self.folder

    def resolve(self, paths: Sequence[str]) -> list[Any]:
        """:func:`resolve` of ``paths`` under ``folder``; members of the source (what :func:`load_image`
        decodes) when the cache was extracted from one."""
        if self.reader is not None:
            return [self.reader.member(p) for p in paths]
        return resolve(paths, self.folder)


ROOT_HINT = "pass --root (the --data folder the cache was extracted from)"


def image_root(cache: Any, root: str | Path | None = None) -> ImageRoot:
    """Where ``cache.paths`` lead (``cache``: a :class:`FeatureCache` or anything with ``paths``, ``attrs``
    and ``path``): ``root`` if given; else the first of these that holds the files of its first rows: the
    absolute folder the cache records (``root``), that folder's recorded place relative to the cache file
    (``root_relative``: the data folder and the cache moved together), the cache's own folder, the working
    directory. The one place that decides it, for every tool that opens a cache's images."""
    attrs = getattr(cache, "attrs", {}) or {}
    from .sources import SOURCE_KINDS

    if attrs.get("source") in SOURCE_KINDS:
        return _source_root(cache, attrs, root)
    sample = [p for p in cache.paths[:SAMPLE] if p]
    relative = [p for p in sample if not Path(p).is_absolute()]
    if sample and not relative:
        return ImageRoot(Path("/"), "absolute paths")
    if root is not None:
        given = Path(root)
        return ImageRoot(given, "--root", ((given, "--root"),), _holds(given, relative))
    here = Path(cache.path).resolve().parent
    tries = [
        (attrs.get("root"), "the folder it was extracted from, as recorded"),
        (_beside(here, attrs.get("root_relative")), "its recorded place next to the cache"),
        (here, "the cache's folder"),
        (Path.cwd(), "the working directory"),
    ]
    looked: list[tuple[Path, str]] = []
    for folder, why in tries:
        if not folder or any(Path(folder) == p for p, _ in looked):
            continue
        looked.append((Path(folder), why))
        if _holds(Path(folder), relative):
            return ImageRoot(Path(folder), why, tuple(looked))
    return ImageRoot(None, "", tuple(looked), False)


def _source_root(cache: Any, attrs: dict[str, Any], root: str | Path | None) -> ImageRoot:
    """:func:`image_root` of a cache extracted from an archive, shards or a dataset: the first of ``root``,
    the recorded source, its recorded place next to the cache, that holds the cache's first members."""
    from .sources import open_source

    kind = str(attrs["source"])
    here = Path(cache.path).resolve().parent
    tries = (
        [(Path(root), "--root")]
        if root is not None
        else [
            (attrs.get("root"), f"the {kind} source it was extracted from, as recorded"),
            (_beside(here, attrs.get("root_relative")), "its recorded place next to the cache"),
        ]
    )
    sample = [p for p in cache.paths[:SAMPLE] if p]
    looked: list[tuple[Path, str]] = []
    for where, why in tries:
        if not where or any(Path(where) == p for p, _ in looked):
            continue
        looked.append((Path(where), why))
        if not Path(where).exists():
            continue
        reader = open_source(kind, where)
        try:
            held = not sample or any(reader.has(p) for p in sample)
        except RtError:
            held = False
        if held:
            return ImageRoot(Path(where), why, tuple(looked), True, reader)
    return ImageRoot(None, "", tuple(looked), False)


def root_attrs(root: str | Path, out: str | Path, record: bool = True) -> dict[str, str]:
    """The attributes `rt extract` writes for :func:`image_root`: ``root``, the absolute data folder ("" when
    not ``record``: ``--no-record-root``), and ``root_relative``, that folder relative to the cache file's
    folder (POSIX, ``.`` when the same; "" on another drive), which names no machine path."""
    folder = Path(root).resolve()
    try:
        rel = Path(os.path.relpath(folder, Path(out).resolve().parent)).as_posix()
    except ValueError:  # another drive (Windows)
        rel = ""
    return {"root": str(folder) if record else "", "root_relative": rel}


def _beside(here: Path, relative: str | None) -> Path | None:
    return Path(os.path.normpath(here / relative)) if relative else None


def _holds(folder: Path, relative: Sequence[str]) -> bool:
    """Whether ``folder`` holds any of the files ``relative`` (a cache without rows: whether it exists)."""
    if not relative:
        return folder.is_dir()
    return any((folder / p).exists() for p in relative)


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
