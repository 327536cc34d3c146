"""Thumbnails on disk, made on demand: one JPEG per (file, size), reused across sessions.

The folder is ``$RT_THUMB_CACHE``, else ``$XDG_CACHE_HOME/resnet_transfer/thumbs``, else
``~/.cache/resnet_transfer/thumbs`` (``rt review --thumbs DIR`` chooses another). A thumbnail's name is a
digest of the image's real path, size, mtime and the thumbnail size, so an edited image gets a new one; the
folder is a cache: deleting it is always safe. At most :data:`WORKERS` thumbnails are decoded at once, so
the page's own requests are never starved on a small machine; the first page's rows are sent before any
thumbnail exists (the browser asks for each).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

SIZES = {"s": 224, "l": 768}  # grid tiles (sharp on 2x screens at 112 px), the side panel's large view
WORKERS = 2
QUALITY = 82
VERSION = 1  # bump when the way thumbnails are drawn changes


def default_folder() -> Path:
    """Where thumbnails go unless told otherwise (see the module docstring)."""
    env = os.environ.get("RT_THUMB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "resnet_transfer" / "thumbs"


class ThumbnailError(Exception):
    """The image could not be decoded; ``str(exc)`` says why."""


class ThumbCache:
    """JPEG thumbnails of image files in ``folder`` (made on first request, then read from disk)."""

    def __init__(self, folder: str | Path | None = None, workers: int = WORKERS) -> None:
        self.folder = Path(folder) if folder is not None else default_folder()
        self._gate = threading.BoundedSemaphore(max(1, workers))
        self.made = 0  # thumbnails drawn by this process (the rest came from disk)

    def name(self, file: Any, size: int) -> Path:
        if hasattr(file, "reader"):  # a member of an archive, shards or a dataset (images.sources)
            stat = file.reader.stat(file.name)
            text = f"{VERSION}|{os.path.realpath(file.reader.root)}:{file.name}|{stat}|{size}"
        else:
            st = os.stat(file)
            text = f"{VERSION}|{os.path.realpath(file)}|{st.st_size}|{st.st_mtime_ns}|{size}"
        h = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
        return self.folder / h[:2] / f"{h}.jpg"

    def get(self, file: Path, size: int) -> Path:
        """The thumbnail of ``file`` fitting ``size`` x ``size`` (aspect kept), made now if not on disk.
        Raises :class:`ThumbnailError` for a file that cannot be decoded, ``OSError`` for a missing one."""
        out = self.name(file, size)
        if out.is_file():
            return out
        with self._gate:
            if out.is_file():  # another request made it while this one waited
                return out
            data = render(file, size)
            out.parent.mkdir(parents=True, exist_ok=True)
            # a cache file: written whole under a unique temporary name and renamed; no fsync needed (a torn
            # thumbnail after a power cut is not possible, a missing one is made again)
            fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-", suffix=".jpg")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, out)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self.made += 1
        return out


def render(file: Path, size: int) -> bytes:
    """JPEG bytes of ``file`` scaled to fit ``size`` x ``size`` (EXIF orientation, alpha on white, first
    frame: the decoding `rt extract` uses; large JPEGs decoded in draft mode)."""
    import io

    from PIL import Image

    from ...images import ImageDecodeError, load_image

    try:
        img = load_image(file, draft=size)
    except ImageDecodeError as exc:
        raise ThumbnailError(str(exc)) from None
    img.thumbnail((size, size), Image.Resampling.LANCZOS if max(img.size) < 4 * size else Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=QUALITY, optimize=False)
    return buf.getvalue()
