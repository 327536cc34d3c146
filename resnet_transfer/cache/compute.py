"""The forward loop of an extraction: batches through the frozen backbone into committed chunk files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..base import DataError, Interrupted, get_reporter
from .config import ExtractConfig, RunSetup

# ------------------------------------------------------------------------------------------ forward


def compute(
    cfg: ExtractConfig, setup: RunSetup, todo: Any, keys: list[str], store: Any, early: Any = None
) -> tuple[int, float]:
    """Forward the images of ``todo`` (content ``keys``) through :func:`forward.forward_images`, committing a
    chunk file every ``cfg.chunk_rows`` images (decode failures are recorded as skipped, by key). ``early``:
    crops decoded before the model was ready (:func:`images.early_crops`). Returns (images forwarded,
    seconds)."""
    from ..backbone import forward_images

    rep = get_reporter()
    names = list(dict.fromkeys([*setup.stage_shapes, *setup.pooled_dims]))
    batches = forward_images(
        setup.backbone,
        todo,
        batch_size=cfg.batch_size,
        device=setup.device,
        precision=setup.precision,
        maps=names,
        workers=setup.workers,
        max_pixels=cfg.max_pixels,
        compile=cfg.compile,
        calibration=setup.calibration,
        early=early,
    )
    buf = _Buffer(setup, _ChunkWriter(store))
    t_run = time.perf_counter()
    forwarded = 0
    copies = _ToHost()  # CUDA: features copied back while the next batch runs; CPU: as they are
    try:
        with rep.progress("extract", total=len(todo), unit="img") as bar:
            for b in batches:
                for i, e in b.skipped:
                    buf.skip(todo.paths[i], keys[i], e)
                    if cfg.strict:
                        raise DataError(
                            f"{Path(todo.root) / todo.paths[i]}: {e}", "fix or remove the file, or drop --strict"
                        )
                if b.features is not None:
                    forwarded += len(b.ok)
                    rows = [(todo.paths[i], int(todo.labels[i]), keys[i]) for i in b.ok]
                    maps = {n: b.maps[n] for n in setup.stage_shapes}
                    pooled = {n: b.maps[n].mean(dim=(2, 3)) for n in setup.pooled_dims}
                    for done in copies.put((rows, b.features, maps, pooled)):
                        buf.add(*done)
                if buf.rows >= cfg.chunk_rows:
                    buf.flush()
                bar.advance(len(b.indices))
            for done in copies.drain():
                buf.add(*done)
            buf.flush(force=True)
            buf.writer.wait()
    except KeyboardInterrupt:
        for done in copies.drain():
            buf.add(*done)
        buf.flush(force=True)
        buf.writer.wait()
        raise Interrupted(
            f"interrupted: finished chunks are saved in {store.dir}",
            "run the same command again to resume where it stopped",
        ) from None
    finally:
        batches.close()  # stop the decode threads now, not when the generator is collected
        buf.writer.close()
    return forwarded, time.perf_counter() - t_run


class _ToHost:
    """Device -> host copies of a batch's outputs, one batch behind: on CUDA each batch's tensors are copied
    with ``non_blocking=True`` into pinned memory and read back (numpy) only after the *next* batch was
    queued, so the copy overlaps the next forward; elsewhere the batch comes back at once."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, Any]] = []

    def put(self, item: tuple[Any, Any, dict[str, Any], dict[str, Any]]) -> list[tuple[Any, ...]]:
        rows, feats, maps, pooled = item
        if feats.device.type != "cuda":
            return [(rows, feats.numpy(), _np(maps), _np(pooled))]
        import torch

        def host(t: Any) -> Any:
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return out.copy_(t, non_blocking=True)

        copied = (rows, host(feats), {k: host(v) for k, v in maps.items()}, {k: host(v) for k, v in pooled.items()})
        event = torch.cuda.Event()
        event.record()
        done = self.drain()
        self.pending = [(event, copied)]
        return done

    def drain(self) -> list[tuple[Any, ...]]:
        out = []
        for event, (rows, feats, maps, pooled) in self.pending:
            event.synchronize()
            out.append((rows, feats.numpy(), _np(maps), _np(pooled)))
        self.pending = []
        return out


def _np(d: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.cpu().numpy() for k, v in d.items()}


class _ChunkWriter:
    """Chunk files written by one background thread, at most one chunk behind the loop (a bounded queue of
    one): the forward of the next batches does not wait for HDF5. An error in a write is raised in the loop
    at the next flush (or at the end)."""

    def __init__(self, store: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.store = store
        self.dir = getattr(store, "dir", None)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rt-chunk-writer")
        self._last: Any = None

    def write(self, *args: Any) -> None:
        self.wait()  # the previous chunk is on disk before the next is queued
        self._last = self._pool.submit(self.store.write, *args)

    def wait(self) -> None:
        if self._last is not None:
            last, self._last = self._last, None
            last.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _capture(store: dict[str, Any], name: str) -> Any:
    def hook(_module: Any, _inp: Any, output: Any) -> None:
        store[name] = output

    return hook


def stage_shapes(net: Any, cut: list[str], size: int) -> dict[str, tuple[int, ...]]:
    import torch

    captured: dict[str, Any] = {}
    hooks = [net.get_submodule(n).register_forward_hook(_capture(captured, n)) for n in cut]
    try:
        with torch.inference_mode():
            p = next(net.parameters())
            net(torch.zeros(1, 3, size, size, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return {n: tuple(int(s) for s in captured[n].shape[1:]) for n in cut}


class _Buffer:
    """Rows waiting to be committed as one chunk file."""

    def __init__(self, setup: RunSetup, writer: _ChunkWriter) -> None:
        self.setup = setup
        self.writer = writer
        self.clear()

    def clear(self) -> None:
        self.rows_: list[tuple[str, int, str]] = []
        self.feats: list[np.ndarray] = []
        self.maps: dict[str, list[np.ndarray]] = {n: [] for n in self.setup.stage_shapes}
        self.pooled: dict[str, list[np.ndarray]] = {n: [] for n in self.setup.pooled_dims}
        self.skipped: list[tuple[str, str, str]] = []

    @property
    def rows(self) -> int:
        return len(self.rows_)

    def add(
        self,
        rows: list[tuple[str, int, str]],
        feats: np.ndarray,
        maps: dict[str, np.ndarray],
        pooled: dict[str, np.ndarray],
    ) -> None:
        self.rows_ += rows
        self.feats.append(feats)
        for k, v in maps.items():
            self.maps[k].append(v)
        for k, v in pooled.items():
            self.pooled[k].append(v)

    def skip(self, path: str, key: str, reason: str) -> None:
        self.skipped.append((path, key, reason))

    def flush(self, force: bool = False) -> None:
        from .writer import Row, SkippedFile

        if not self.rows_ and not (force and self.skipped):
            return
        s = self.setup
        dim = s.backbone.identity.num_features
        feats = np.concatenate(self.feats) if self.feats else np.zeros((0, dim), np.float32)
        maps = {
            k: np.concatenate(v) if v else np.zeros((0, *s.stage_shapes[k]), np.float32) for k, v in self.maps.items()
        }
        pooled = {
            k: np.concatenate(v) if v else np.zeros((0, s.pooled_dims[k]), np.float32) for k, v in self.pooled.items()
        }
        rows = [Row(p, lab, k) for p, lab, k in self.rows_]
        skipped = [SkippedFile(p, reason, k) for p, k, reason in self.skipped]
        self.writer.write(rows, feats, maps, pooled, skipped)
        self.clear()
