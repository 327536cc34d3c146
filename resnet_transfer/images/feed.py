"""The image feed of extract, predict and evaluate: decoded, collated, normalised batches in order.

:func:`normalized_batches` is the one feed (decode threads of this process one batch ahead, or DataLoader
worker processes); :func:`iter_batches` the threaded decoder under it; :func:`collate` keeps a batch's
unreadable files as (index, reason) instead of tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from .data import DEFAULT_MAX_PIXELS, ImageDataset, ImageList
from .transforms import TransformConfig, normalize_batch


def collate(batch: list[tuple[Any, int, str]]) -> tuple[Any, list[int], list[str]]:
    """Stack the good items; failed ones keep their index and reason, with no tensor."""
    import torch

    good = [b[0] for b in batch if not b[2]]
    if good and all(x.dim() == 3 and x.permute(1, 2, 0).is_contiguous() for x in good):
        # HWC storage (TrainCropUint8): an (N, C, H, W) batch in channels-last memory, without a transpose
        return torch.stack([x.permute(1, 2, 0) for x in good]).permute(0, 3, 1, 2), *_rest(batch)
    xs = torch.stack(good) if good else None
    return xs, *_rest(batch)


def _rest(batch: list[tuple[Any, int, str]]) -> tuple[list[int], list[str]]:
    return [b[1] for b in batch], [b[2] for b in batch]


STEAL_AFTER_S = 0.02  # iter_batches: how long the caller waits for an item before decoding one itself


def _lower_priority() -> None:
    """Make the calling thread yield to the others (Linux: per-thread nice 19; elsewhere nothing)."""
    import contextlib
    import threading

    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def iter_batches(
    dataset: ImageDataset, batch_size: int, threads: int, prefetch: int = 1
) -> Iterator[tuple[Any, list[int], list[str]]]:
    """Collated batches of ``dataset`` in order, decoded by ``threads`` threads of this process while the
    caller works on the previous batch (``prefetch`` batches ahead). PIL releases the GIL while it decodes
    and resizes, so on a small CPU box this overlaps decoding with the forward pass without the copies
    and start-up of worker processes. ``threads=0`` decodes in the calling thread.

    The decode threads run at the lowest priority, so they fill the gaps the forward pass leaves instead
    of pre-empting one of its OpenMP threads mid-operation (which stalls all of them at the next barrier).
    If the caller waits 20 ms for a batch without an item arriving (on a busy machine low-priority threads
    may get no core), it decodes items no thread has started itself, from the batch's tail. (Stealing at
    once instead measured slower on a quiet machine: 0.80x vs 0.91x of the ceiling.)
    Measured on 2 cores: ResNet-18 extraction 81 vs 76 img/s (docs/performance.md)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FuturesTimeout

    starts = range(0, len(dataset), batch_size)
    if threads <= 0:
        for lo in starts:
            yield collate([dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))])
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="rt-decode", initializer=_lower_priority)
    pending: deque[list[tuple[int, Any]]] = deque()

    def take(batch: list[tuple[int, Any]]) -> tuple[Any, list[int], list[str]]:
        # Wait for the items in order; whenever nothing arrives for 20 ms (the low-priority threads get no
        # core: a busy machine), decode one item no thread has started, from the batch's tail, here.
        stolen: dict[int, Any] = {}
        items = []
        for i, f in batch:
            while i not in stolen:
                try:
                    items.append(f.result(timeout=STEAL_AFTER_S))
                    break
                except FuturesTimeout:
                    for j, g in reversed(batch):
                        if j not in stolen and g.cancel():
                            stolen[j] = dataset[j]
                            break
            else:
                items.append(stolen[i])
        return collate(items)

    try:
        for lo in starts:
            idx = range(lo, min(lo + batch_size, len(dataset)))
            pending.append([(i, pool.submit(dataset.__getitem__, i)) for i in idx])
            if len(pending) > prefetch:
                yield take(pending.popleft())
        while pending:
            yield take(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def normalized_batches(
    images: ImageList,
    transform: TransformConfig,
    batch_size: int,
    device: Any,
    *,
    view: str | None = None,
    workers: int = 0,
    max_pixels: int | None = None,
    early: Any = None,
) -> Iterator[tuple[Any, list[int], list[str]]]:
    """The one image feed of extract, predict and evaluate: ``(x, indices, errors)`` per batch of
    ``images``, in order. ``x`` is the float32 batch of the readable images, normalised with ``transform``'s
    mean/std, channels-last, on ``device`` (None when none of the batch could be read); ``indices`` index
    ``images``; ``errors[j]`` is ``""`` or why ``indices[j]`` was skipped.

    ``view`` ``None`` is the eval view: uint8 crops decoded by threads of this process one batch ahead
    (:func:`iter_batches`) or by ``workers`` DataLoader processes, normalised per batch on the device. ``flip``
    / ``tencrop`` are test-time views (made by torch ops, in this thread): ``x`` then holds each image's views
    one after another (``len(indices ok) * views`` rows; :data:`transforms.VIEWS`), and ``batch_size`` counts
    images.

    ``early``: crops made before the feed started (:func:`early.early_crops`), taken by the decode threads
    of the eval view where they are what ``transform`` and ``max_pixels`` make (else left alone)."""
    import torch

    from ..base import decode_threads
    from .gpu_decode import HostToDevice, gpu_batches, gpu_decode_enabled
    from .transforms import view_transform

    dataset = ImageDataset(
        images, view_transform(transform, view), transform.draft_target(), max_pixels or DEFAULT_MAX_PIXELS
    )
    if workers > 0:
        loader: Any = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=getattr(device, "type", str(device)) == "cuda",
            persistent_workers=False,
        )
    elif view is None and gpu_decode_enabled(device):  # JPEGs decoded on the GPU (gpu_decode.py)
        paths = [dataset.path(i) for i in range(len(dataset))]
        size = (transform.resize_size, transform.input_size)
        loader = gpu_batches(dataset, paths, batch_size, *size, device, decode_threads())
    else:
        if view is None and early is not None and early.fits(transform, max_pixels):
            dataset.early = early
        loader = iter_batches(dataset, batch_size, 0 if view else decode_threads())
    h2d = HostToDevice(device)  # CUDA: pinned copies on a side stream; elsewhere the batch as it is
    try:
        for xs, idx, errors in loader:
            if xs is not None:
                if view:  # (n, views, C, H, W) -> (n * views, C, H, W), already normalised
                    xs = h2d.put(xs.reshape(-1, *xs.shape[2:]))
                    xs = xs.contiguous(memory_format=torch.channels_last)
                else:
                    xs = normalize_batch(h2d.put(xs), transform, torch.channels_last)
            yield xs, idx, errors
    finally:
        if hasattr(loader, "close"):  # stop the decode threads now, not when the generator is collected
            loader.close()
