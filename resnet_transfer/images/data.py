"""Finding images (folder or CSV manifest), class order, decoding them robustly (batching: feed.py).

An :class:`ImageList` is the plain description of a dataset: a root, paths relative to it, integer labels
(-1 for unlabelled) and class names. Decoding never raises anything but :class:`ImageDecodeError`, whose
message is the reason a file was skipped.
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..base import DataError, RtError, UsageError
from .reader import IMAGE_EXTENSIONS, is_litter
from .sources import detect, open_source

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own error threshold (2x its warning threshold)


class ImageDecodeError(Exception):
    """An image that cannot be used; ``str(exc)`` is the reason recorded in the cache."""


def path_free(reason: str, path: str | Path | None = None) -> str:
    """``reason`` without the file's name (PIL's ``<_io.BufferedReader name='/a.jpg'>``, or ``path``): a skip
    reason describes the content, the same for the same bytes under any path, in any run."""
    out = re.sub(r"\s*<_io\.\w+ name=(?:'[^']*'|\"[^\"]*\"|\d+)>", "", reason)
    return out if path is None else out.replace(os.fspath(path), "the file")


@dataclass
class ImageList:
    """Images to process: ``paths`` are relative to ``root`` (POSIX separators); ``labels[i]`` indexes
    ``classes`` or is -1 for an unlabelled image."""

    root: Path
    paths: list[str]
    labels: list[int]
    classes: list[str]
    source: str = "folder"
    notes: list[str] = field(default_factory=list)
    reader: Any = None  # a sources.Reader when the images are members of an archive, shards or a dataset

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: Sequence[int]) -> ImageList:
        return ImageList(
            self.root,
            [self.paths[i] for i in keep],
            [self.labels[i] for i in keep],
            list(self.classes),
            self.source,
            list(self.notes),
            self.reader,
        )

    def file(self, i: int) -> Any:
        """What :func:`load_image` decodes for image ``i``: its file's path, or a member of the source."""
        rel = self.paths[i]
        if self.reader is not None:
            return self.reader.member(rel)
        return Path(rel) if os.path.isabs(rel) else self.root / rel

    def stat(self, i: int) -> tuple[int, int, int]:
        """A cheap fingerprint of image ``i``'s bytes (a file's size, mtime_ns, inode; a member's size and its
        archive's mtime_ns and inode): unchanged, its content key is unchanged. Raises OSError."""
        if self.reader is not None:
            try:
                return self.reader.stat(self.paths[i])
            except KeyError:
                raise FileNotFoundError(f"no member {self.paths[i]}") from None
        st = os.stat(self.file(i))
        return int(st.st_size), int(st.st_mtime_ns), int(st.st_ino)

    def digest(self, i: int) -> str:
        """Image ``i``'s content key: the blake2b-128 of its bytes, the same for a file and for a member with
        those bytes (``fsutil.file_digest`` / ``bytes_digest``). Raises OSError."""
        from ..base import file_digest

        if self.reader is None:
            return file_digest(self.file(i))
        try:
            return self.reader.digest(self.paths[i])
        except KeyError:
            raise FileNotFoundError(f"no member {self.paths[i]}") from None
        except (RtError, OSError):
            raise
        except Exception as exc:  # a damaged member (bad CRC, zlib): unreadable, like a file that cannot be read
            raise OSError(f"{type(exc).__name__}: {str(exc)[:120]}") from None

    def counts(self) -> dict[str, int]:
        """Images per class (unlabelled ones under ``"(unlabelled)"``)."""
        out = {c: 0 for c in self.classes}
        for y in self.labels:
            key = self.classes[y] if y >= 0 else "(unlabelled)"
            out[key] = out.get(key, 0) + 1
        return out


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not is_litter(name)


def list_images(
    data: str | Path,
    classes: Sequence[str] | None = None,
    allow_outside: bool = False,
) -> ImageList:
    """Describe the images at ``data``: a folder (one sub-folder per class, nested folders allowed; a
    folder of loose images is unlabelled), a CSV manifest (``path,label``), a single image file, or a source
    read in place (:mod:`sources`): a ``.zip`` / ``.tar`` / ``.tar.gz`` of a class-folder tree, WebDataset
    shards (``train-{000..009}.tar`` or a folder of ``.tar``), a ``save_to_disk`` dataset or Parquet files.

    ``classes`` fixes the class order (e.g. a head's); a folder or label not in it is an error."""
    kind = detect(data)
    if kind is not None:
        return _from_source(data, kind, classes)
    p = Path(data).expanduser()
    if not p.exists():
        raise DataError(f"--data {data}: no such file or folder", "give an image folder or a .csv manifest")
    if p.is_file() and p.suffix.lower() in (".csv", ".tsv", ".txt"):
        return _from_manifest(p, classes, allow_outside)
    if p.is_file():
        if not is_image_name(p.name):
            raise DataError(f"{p}: not an image file or a .csv manifest", "give an image, a folder or a .csv")
        return ImageList(p.parent, [p.name], [-1], list(classes or []), "file")
    return _from_folder(p, classes)


def _from_source(data: str | Path, kind: str, classes: Sequence[str] | None) -> ImageList:
    """The :class:`ImageList` of an archive, shards or a dataset: its members, labelled by class name
    (``classes`` fixes the order, as for a folder), sorted by class then name (a compressed tar: in archive
    order, so that reads only go forward)."""
    reader = open_source(kind, data)
    names, found, notes = reader.listing()
    if not names:
        raise DataError(f"--data {data}: no images found in the {kind} source", "check what it holds")
    order = reader.class_sort(c for c in found if c is not None)
    hint = "fix the labels or train a head on these classes"
    order = class_order(order, order if classes is None else classes, f"{data}: class(es)", hint)
    index = {c: i for i, c in enumerate(order)}
    ys = [index[c] if c is not None else -1 for c in found]
    rows = list(range(len(names)))
    if reader.sorted_rows:
        rows.sort(key=lambda i: (ys[i] < 0, ys[i], names[i]))
    return ImageList(reader.root, [names[i] for i in rows], [ys[i] for i in rows], order, kind, notes, reader)


def _walk_images(folder: Path, root: Path) -> tuple[list[str], list[str]]:
    """Image paths under ``folder`` relative to ``root`` (sorted), and notes on what was passed over."""
    found: list[str] = []
    notes: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not is_litter(d))
        for name in filenames:
            if is_litter(name):
                continue
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            # broken symlinks stay listed: decoding reports them as skipped, with the reason
            found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found), notes


def _from_folder(root: Path, classes: Sequence[str] | None) -> ImageList:
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not is_litter(d.name))
    loose = sorted(f.name for f in root.iterdir() if f.is_file() and is_image_name(f.name))
    notes: list[str] = []
    if not subdirs:
        if not loose:
            raise DataError(f"{root}: no images found", "put images (.jpg .png .webp .bmp ...) in it")
        return ImageList(root, loose, [-1] * len(loose), list(classes or []), "folder", notes)
    per_class: dict[str, list[str]] = {}
    for d in subdirs:
        files, more = _walk_images(root / d, root)
        notes += more
        if not files:
            notes.append(f"{d}/: empty class folder, ignored")
            continue
        per_class[d] = files
    if loose:
        notes.append(f"{len(loose)} images directly in {root} (not in a class folder) are unlabelled")
    class_names = class_order(
        per_class,
        classes,
        f"{root}: class folder(s)",
        "rename or remove those folders, or train a head on these classes",
    )
    if not per_class and not loose:
        raise DataError(f"{root}: no images found in its class folders", "put images in the class folders")
    index = {c: i for i, c in enumerate(class_names)}
    paths, labels = [], []
    for c in sorted(per_class, key=lambda c: index[c]):
        paths += per_class[c]
        labels += [index[c]] * len(per_class[c])
    paths += loose
    labels += [-1] * len(loose)
    return ImageList(root, paths, labels, class_names, "folder", notes)


def _from_manifest(path: Path, classes: Sequence[str] | None, allow_outside: bool) -> ImageList:
    root = path.parent.resolve()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the manifest ({exc})", "save it as UTF-8 CSV") from exc
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] in (["path", "label"], ["path"]):
        rows = rows[1:]
    if not rows:
        raise DataError(f"{path}: the manifest lists no images", "one line per image: path,label")
    paths: list[str] = []
    names: list[str] = []
    for lineno, row in enumerate(rows, start=1):
        if len(row) > 2:
            raise DataError(
                f"{path}, row {lineno}: expected 'path,label', got {len(row)} columns",
                "quote paths that contain commas",
            )
        rel = row[0].strip()
        label = row[1].strip() if len(row) > 1 else ""
        paths.append(_manifest_path(path, root, rel, lineno, allow_outside))
        names.append(label)
    class_names = class_order(
        {n for n in names if n}, classes, f"{path}: label(s)", "fix the labels or train a head on these classes"
    )
    index = {c: i for i, c in enumerate(class_names)}
    labels = [index[n] if n else -1 for n in names]
    return ImageList(Path(root), paths, labels, class_names, "manifest")


def class_order(
    found: Any, classes: Sequence[str] | None = None, what: str = "class(es)", hint: str | None = None
) -> list[str]:
    """The class order of a dataset: ``classes`` when given (a model's order; anything in ``found`` outside it
    is a :class:`DataError` starting with ``what``), else ``found`` sorted."""
    if classes is None:
        return sorted(found)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{what} {', '.join(unknown[:10])} are not classes of the model ({', '.join(classes)})", hint)
    return list(classes)


def extended_class_order(known: Sequence[str], found: Sequence[str]) -> list[str]:
    """``known`` first (an existing cache's order, so its label ids stay), then the new classes of ``found``
    sorted: the order of an incremental `rt extract`."""
    return list(known) + sorted(set(found) - set(known))


def class_index_map(have: Sequence[str], want: Sequence[str]) -> np.ndarray:
    """``map[i]`` = the index in ``want`` of the class ``have[i]`` (-1 where ``want`` lacks it): translates
    labels in one class order (a cache's) into another (a model's). See :func:`remap_labels`."""
    index = {c: i for i, c in enumerate(want)}
    return np.asarray([index.get(c, -1) for c in have], dtype=np.int64)


def remap_labels(labels: Any, have: Sequence[str], want: Sequence[str]) -> np.ndarray:
    """``labels`` (indices into ``have``, -1 unlabelled) as indices into ``want``; a label whose class
    ``want`` lacks becomes -1 (check with :func:`class_order` first where that is an error)."""
    y = np.asarray(labels, dtype=np.int64)
    table = class_index_map(have, want)
    if not len(table):
        return np.full(y.shape, -1, np.int64)
    return np.where(y >= 0, table[np.clip(y, 0, len(table) - 1)], -1)


def _manifest_path(manifest: Path, root: Path, rel: str, lineno: int, allow_outside: bool) -> str:
    if not rel:
        raise DataError(f"{manifest}, row {lineno}: empty path", "every row needs an image path")
    candidate = Path(rel).expanduser()
    full = (candidate if candidate.is_absolute() else root / candidate).resolve()
    try:
        return full.relative_to(root).as_posix()
    except ValueError:
        if not allow_outside:
            raise DataError(
                f"{manifest}, row {lineno}: {rel!r} is outside the manifest's folder {root}",
                "move the manifest up, or pass --allow-outside to accept paths outside it",
            ) from None
        return full.as_posix()


# ---------------------------------------------------------------------------------------------- decode


def _open_member(member: Any) -> io.BytesIO:
    try:
        data = member.read()
    except ImageDecodeError:
        raise
    except KeyError:
        raise ImageDecodeError("no such member") from None
    except Exception as exc:  # zlib, tarfile, zipfile, arrow: a member that cannot be read is skipped, with why
        raise ImageDecodeError(f"cannot read the member ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    return io.BytesIO(data)


def load_image(path: Any, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """Decode ``path`` (a file, or a :class:`sources.Member` of an archive or dataset) to an RGB image: EXIF
    orientation applied, first frame of animations, alpha composited on white, 16-bit and float images
    scaled to 8 bits, CMYK/grayscale converted.

    ``draft`` lets the JPEG decoder downscale by a power of two while staying >= ``draft`` pixels on the
    short side (much faster for large photos). Raises :class:`ImageDecodeError` with the reason."""
    member = hasattr(path, "reader")
    p = path if member else Path(path)
    try:
        if not member and p.is_symlink() and not p.exists():
            raise ImageDecodeError("broken symlink")
        if not member and p.stat().st_size == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        with _open_member(p) if member else open(p, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(f)
            if img.width * img.height > max_pixels:
                raise ImageDecodeError(
                    f"too large ({img.width}x{img.height} px > {max_pixels} px; raise --max-pixels to allow)"
                )
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))
            img.seek(0)
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except ImageDecodeError:
        raise
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression-bomb limit: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        where = None if member else p
        raise ImageDecodeError(
            f"not a readable image ({type(exc).__name__}: {path_free(str(exc), where)[:120]})"
        ) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        scale = 255.0 / (65535.0 if hi > 255 else max(hi, 1.0) if img.mode == "F" else 255.0)
        arr8 = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class ImageDataset:
    """A map-style dataset over an :class:`ImageList`. Items are ``(tensor, index, error)``; a file that
    cannot be decoded gives a zero tensor and the reason in ``error`` (so one bad file never stops a run).

    ``keep_decoded`` (bytes, 0 = off): keep decoded images in memory up to that many pixel bytes, so the
    epochs after the first skip reading and decoding them and pay only the (random) transform; the images
    kept are exactly what decoding gives, so the batches are the same with or without it.

    ``early``: an :class:`early.EarlyCrops` whose crops are what ``transform`` makes (the feed checks): an
    image it holds is taken from it instead of decoded."""

    def __init__(
        self,
        images: ImageList,
        transform: Any,
        draft: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        keep_decoded: int = 0,
        early: Any = None,
    ):
        self.images = images
        self.transform = transform
        self.draft = draft
        self.max_pixels = max_pixels
        self._shape: tuple[int, ...] | None = None
        self.keep_decoded = int(keep_decoded)
        self._decoded: dict[int, Image.Image | np.ndarray] = {}  # index -> decoded image (decode threads share it)
        self._kept = 0
        self.early = early

    def __len__(self) -> int:
        return len(self.images)

    def path(self, i: int) -> Any:
        """Image ``i``'s file, or its member of the source (:meth:`ImageList.file`)."""
        return self.images.file(i)

    def kept(self, i: int) -> Image.Image | np.ndarray | None:
        """Image ``i`` as kept in memory from an earlier epoch, or ``None`` (not kept: decode it)."""
        return self._decoded.get(i)

    def decoded(self, i: int) -> Image.Image | np.ndarray:
        """Image ``i`` decoded: kept in memory from an earlier epoch, or read now (and kept while the
        ``keep_decoded`` budget allows). Raises :class:`ImageDecodeError` as :func:`load_image` does. A
        transform that ``takes_arrays`` (``TrainCropUint8``) gets a ``uint8`` HWC array: converted here,
        once, in the decode thread that calls this, not per epoch in the training loop."""
        img = self._decoded.get(i)
        if img is None:
            img = load_image(self.path(i), self.max_pixels, self.draft)
            if getattr(self.transform, "takes_arrays", False):
                img = np.array(img, dtype=np.uint8)
            size = img.nbytes if isinstance(img, np.ndarray) else img.width * img.height * len(img.getbands())
            if self._kept + size <= self.keep_decoded:
                self._decoded[i] = img
                self._kept += size  # decode threads may race here: the budget is approximate by an image
        return img

    def __getitem__(self, i: int) -> tuple[Any, int, str]:
        import torch

        crop = self.early.take(self.images, i) if self.early is not None else None
        if crop is not None:
            x = torch.from_numpy(crop)
            self._shape = tuple(x.shape)
            return x, i, ""
        try:
            img = self.decoded(i)
            x = self.transform(img)
            self._shape = tuple(x.shape)
            return x, i, ""
        except ImageDecodeError as exc:
            return torch.zeros(self._shape or (3, 1, 1)), i, str(exc)
        except Exception as exc:
            return torch.zeros(self._shape or (3, 1, 1)), i, f"transform failed ({type(exc).__name__}: {exc})"


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error to report, not grey pixels


def stratified_split(labels: Sequence[int], fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, val)``, sorted: about ``fraction`` of every class goes to ``val`` (fixed ``seed``).

    The one split of the package (fit-head, finetune and the head estimator use it). A class with two or more
    rows puts at least one in ``val`` and keeps at least one in ``train``; a class with one row stays in
    ``train``. ``fraction == 0`` means no validation rows. Rows with label < 0 (unlabelled) are in neither."""
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"validation fraction {fraction} must be in [0, 1)", "use e.g. --val-fraction 0.2")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    if fraction > 0:
        for c in np.unique(y[y >= 0]):
            rows = np.flatnonzero(y == c)
            if len(rows) < 2:
                continue
            k = min(len(rows) - 1, max(1, round(fraction * len(rows))))
            val.append(rng.permutation(rows)[:k])
    va = np.sort(np.concatenate(val)).astype(np.int64) if val else np.zeros(0, np.int64)
    tr = np.setdiff1d(np.flatnonzero(y >= 0), va).astype(np.int64)
    return tr, va
