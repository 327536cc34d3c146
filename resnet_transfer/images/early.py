"""Early crops: the first images of `rt extract` decoded and cropped by a child process while the parent
imports torch and timm and builds the model (~3.5 s of single-threaded set-up on a 2-core host, during which
the other core idles).

The eval transform is known only once the backbone is built, so `rt extract` starts this with the transform
the same model, weights and ``--image-size`` resolved to the last time (``backbone.recalled_transform``) and
the feed takes the crops only if the backbone built has exactly that transform (:meth:`EarlyCrops.fits`);
otherwise they are dropped unread. The child decodes exactly as the feed does (:func:`data.load_image`,
:class:`transforms.ResizeCenterCrop`, :func:`transforms.uint8_chw`), in listing order, into a shared
anonymous map of at most :data:`EARLY_BYTES`. It passes over any image that fails or would take torchvision's
path (the feed decodes that one as always, and reports it as always), and stops at the budget, when the
parent asks (the feed caught up with it) or when the parent is gone. A crop is used only if its file's
stat (size, mtime_ns, inode) is the one the child saw before reading it.

A process, not a thread: the parent's imports hold the GIL, and a decode thread that waits for it at every
PIL call made ~330 crops in those 3.5 s and slowed the set-up by 0.5 s, where the child makes ~1,060 and
leaves the set-up as it was (docs/performance.md, "The early start").
Linux only (fork), only before torch is loaded (a fresh CLI process: forking after torch started its thread
pools is not safe, and the set-up to hide is then short anyway), with at least two usable cores.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading
from typing import Any

import numpy as np

from .data import DEFAULT_MAX_PIXELS, ImageList, load_image
from .transforms import ResizeCenterCrop, TransformConfig, uint8_chw

EARLY_BYTES = 256 << 20  # crops kept at most (224 px: ~1,780 images)
EARLY_IMAGES = 8192  # and at most this many (small crops: the set-up lasts seconds)
_META = 4  # int64s per slot: listing index, size, mtime_ns, inode


def early_worthwhile() -> bool:
    """Whether an early start can help here: Linux (fork), torch not loaded yet, two cores or more."""
    if not sys.platform.startswith("linux") or not hasattr(os, "fork") or "torch" in sys.modules:
        return False
    return len(os.sched_getaffinity(0)) >= 2


def early_crops(
    images: ImageList, transform: TransformConfig, max_pixels: int | None = None, budget: int = EARLY_BYTES
) -> EarlyCrops | None:
    """Start decoding crops of ``images`` for ``transform`` in a child process; None where that cannot help
    (:func:`early_worthwhile`; a source read through its own reader; nothing fits in ``budget``)."""
    slots = min(len(images), EARLY_IMAGES, budget // (3 * transform.input_size**2))
    if images.reader is not None or slots < 1 or not early_worthwhile():
        return None
    try:
        return EarlyCrops(images, transform, max_pixels or DEFAULT_MAX_PIXELS, slots)
    except OSError:  # no fork, pipe or memory: the feed decodes as usual
        return None


class EarlyCrops:
    """Crops decoded by a forked child; :meth:`take` hands one to the feed (at most once), :meth:`close`
    stops the child and frees the memory. Thread-safe (the feed's decode threads call :meth:`take`)."""

    def __init__(self, images: ImageList, transform: TransformConfig, max_pixels: int, slots: int):
        self.root = images.root
        self.transform = transform
        self.max_pixels = int(max_pixels)
        self.used = 0  # crops handed to the feed
        self._paths = list(images.paths)
        self._index = {p: i for i, p in enumerate(self._paths)}
        size = transform.input_size
        meta = slots * _META * 8
        self._map = mmap.mmap(-1, 8 + meta + slots * 3 * size * size)  # [stop flag | meta | pixels]
        self._flag: Any = np.frombuffer(self._map, np.uint8, 1)
        self._meta: Any = np.frombuffer(self._map, np.int64, slots * _META, 8).reshape(slots, _META)
        self._pixels: Any = np.frombuffer(self._map, np.uint8, slots * 3 * size * size, 8 + meta)
        self._pixels = self._pixels.reshape(slots, 3, size, size)
        read, write = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read)
            _child(images, transform, self.max_pixels, self._flag, self._meta, self._pixels, write, parent)
        os.close(write)
        os.set_blocking(read, False)
        self._pid: int | None = pid
        self._pipe: int | None = read
        self._ready: dict[str, tuple[int, tuple[int, ...]]] = {}  # path -> (slot, stat)
        self._reached = -1  # the last listing index the child reported
        self._done = False  # the child closed its end: nothing more will come
        self._lock = threading.Lock()

    def fits(self, transform: TransformConfig, max_pixels: int | None) -> bool:
        """Whether these crops are what the feed makes for ``transform`` and ``max_pixels``."""
        return transform == self.transform and (max_pixels or DEFAULT_MAX_PIXELS) == self.max_pixels

    def take(self, images: ImageList, i: int) -> np.ndarray | None:
        """Image ``i`` of ``images`` (a listing under the same root) as a ``uint8`` (3, H, W) crop, if the child
        made it and the file is unchanged since; else None (decode it as usual). A request the child has not
        reached yet stops it: the feed has caught up."""
        if images.root != self.root or images.reader is not None:
            return None
        path = images.paths[i]
        with self._lock:
            self._drain()
            hit = self._ready.pop(path, None)
            if hit is None:
                if self._index.get(path, -1) > self._reached and self._pipe is not None:
                    self._flag[0] = 1
                return None
            slot, stat = hit
            try:
                fresh = images.stat(i)
            except OSError:
                return None
            if fresh != stat:
                return None
            self.used += 1
            out = self._pixels[slot].copy()
            if self._done and not self._ready:
                self._release()
            return out

    def wait(self) -> int:
        """Wait for the child to finish; the number of crops it made (tests)."""
        with self._lock:
            if self._pipe is not None:
                os.set_blocking(self._pipe, True)
                while not self._done:
                    self._drain()
                os.set_blocking(self._pipe, False)
            return len(self._ready) + self.used

    def close(self) -> None:
        """Stop the child (it finishes the image in hand), drop what was not taken, free the memory."""
        with self._lock:
            self._release()
            pid, self._pid = self._pid, None
        if pid is not None:
            os.waitpid(pid, 0)

    def _drain(self) -> None:
        """Read the slots the child finished since the last call (the pipe orders them after their bytes)."""
        if self._pipe is None or self._done:
            return
        while True:
            try:
                data = os.read(self._pipe, 1 << 16)  # whole 4-byte records: each was one atomic write
            except BlockingIOError:
                return
            if not data:
                self._done = True
                return
            for slot in np.frombuffer(data, "<u4").tolist():
                i, *stat = (int(x) for x in self._meta[slot])
                self._ready[self._paths[i]] = (slot, tuple(stat))
                self._reached = max(self._reached, i)

    def _release(self) -> None:
        if self._pipe is None:
            return
        self._flag[0] = 1
        os.close(self._pipe)  # a child blocked on a full pipe gets EPIPE and exits
        self._pipe = None
        self._ready.clear()
        self._flag = self._meta = self._pixels = None  # the map's views go before the map
        self._map.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit: the child stops on its own (parent gone)
            self.close()


def _child(
    images: ImageList,
    transform: TransformConfig,
    max_pixels: int,
    flag: Any,
    meta: Any,
    pixels: Any,
    write: int,
    parent: int,
) -> None:
    """Decode and crop ``images`` in order into the slots; report each finished slot on the pipe. Exits the
    process (``os._exit``: no atexit handler, no buffer of the parent's is flushed twice)."""
    code = 0
    try:
        os.nice(19)  # the idle core while the parent starts; the forward's threads come first later
        crop = ResizeCenterCrop(transform.resize_size, transform.input_size, transform.interpolation)
        draft = transform.draft_target()
        slot = 0
        for i in range(len(images)):
            if slot >= len(pixels) or flag[0] or os.getppid() != parent:
                break
            try:
                stat = images.stat(i)
                img = load_image(images.file(i), max_pixels, draft)
                if not crop.fused(img.size):  # torchvision's path: left to the feed
                    continue
                out = uint8_chw(crop(img))
            except Exception:  # the feed decodes it again and reports it as always
                continue
            if out.shape != pixels.shape[1:]:
                continue
            pixels[slot] = out
            meta[slot] = (i, *stat)
            os.write(write, slot.to_bytes(4, "little"))
            slot += 1
    except BaseException:  # EPIPE (the parent closed), Ctrl-C: stop quietly
        code = 1
    finally:
        os._exit(code)
