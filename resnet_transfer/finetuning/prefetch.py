"""The training feed's decode, overlapped with the train step, with the same batches bit for bit.

With no DataLoader workers (the default on a small CPU box: the step needs every core), the DataLoader
decodes, augments and collates each batch in the main thread *between* steps. :func:`decoded_ahead` keeps
its sampler (the same index order from the run's generator) and its per-item order of augmentation, but
reads and decodes the next batch's files (``images.load_image``: no random draw) in threads while the
current step runs; the random augmentation stays in the calling thread, item by item, so the global RNG
is drawn in exactly the order it was, and a run is as reproducible (and resumable) as before.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


def _lower_priority() -> None:
    import threading

    with contextlib.suppress(AttributeError, OSError):  # yield to the step's threads (Linux: nice 19)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def decoded_ahead(
    dataset: Any, batches: Iterable[list[int]], threads: int
) -> Iterator[tuple[Any, list[int], list[str]]]:
    """``collate``d batches of ``dataset`` (an ``images.ImageDataset``) for the index lists of ``batches``,
    as the DataLoader with no workers gives them, the files of the next batch decoded by ``threads``
    threads while the caller works on the current one."""
    import torch

    from ..images import collate, load_image

    def load(i: int) -> Any:
        if hasattr(dataset, "decoded"):  # kept in memory from an earlier epoch where the budget allows
            return dataset.decoded(i)
        return load_image(dataset.path(i), dataset.max_pixels, dataset.draft)

    def item(i: int, fut: Future[Any]) -> tuple[Any, int, str]:
        shape = getattr(dataset, "_shape", None) or (3, 1, 1)
        try:
            img = fut.result()
        except Exception as exc:  # ImageDecodeError: the reason, as ImageDataset gives it
            return torch.zeros(shape), i, str(exc)
        try:
            x = dataset.transform(img)  # the random augmentation: here, in order
        except Exception as exc:
            return torch.zeros(shape), i, f"transform failed ({type(exc).__name__}: {exc})"
        dataset._shape = tuple(x.shape)
        return x, i, ""

    def ahead(i: int) -> Future[Any]:
        kept = dataset.kept(i) if hasattr(dataset, "kept") else None
        if kept is None:
            return pool.submit(load, i)
        done: Future[Any] = Future()  # kept from an earlier epoch: no thread wakes up during the step
        done.set_result(kept)
        return done

    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="rt-train-decode", initializer=_lower_priority)
    pending: deque[list[tuple[int, Future[Any]]]] = deque()
    try:
        for idx in batches:
            pending.append([(i, ahead(i)) for i in idx])
            if len(pending) > 1:
                yield collate([item(i, f) for i, f in pending.popleft()])
        while pending:
            yield collate([item(i, f) for i, f in pending.popleft()])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
