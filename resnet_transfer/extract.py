"""`rt extract`: run the frozen backbone once over the images and store the activations in a cache.

The loop is plain on purpose: list images -> build backbone -> open the cache writer (lock, resume) ->
forward the images that are not done yet, in batches, committing a chunk every ``chunk_rows`` rows ->
assemble the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, RtError, UsageError
from .report import get_reporter


@dataclass
class ExtractConfig:
    """Everything `rt extract` needs; the CLI fills it from its options."""

    data: Path
    out: Path
    model: str = "resnet50"
    weights: str = "imagenet"
    image_size: int | None = None
    cut: list[str] = field(default_factory=list)
    batch_size: int = 32
    workers: int | None = None  # None: chosen for the device
    device: str = "auto"
    precision: str = "auto"
    compile: str = "auto"  # auto | on | off: the forward compiled by inductor (compiled.compiled_forward)
    dtype: str = "float16"
    overwrite: bool = False
    allow_outside: bool = False
    strict: bool = False
    chunk_rows: int = 256
    record_root: bool = False
    max_pixels: int | None = None
    merge: bool = False  # under torchrun: write the final cache as a real file, not a virtual one over shards
    images: Any = None  # a pre-listed ImageList (distributed.py hands each rank its block); None: list cfg.data


@dataclass
class ExtractResult:
    path: Path
    rows: int
    new_rows: int
    skipped: list[tuple[str, str]]
    seconds: float
    images_per_s: float
    notes: list[str] = field(default_factory=list)


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Extract pooled features (and ``cfg.cut`` stage maps) of the images at ``cfg.data`` into ``cfg.out``.

    Resumable and incremental: rows already in the cache (or in finished chunks of an interrupted run) are
    not recomputed. Raises :class:`RtError` subclasses for anything the user must fix."""
    import torch

    from .backbones import build_backbone
    from .cache import CacheWriter, FeatureCache
    from .compiled import compiled_forward
    from .data import DEFAULT_MAX_PIXELS, ImageDataset, eval_transform_uint8, list_images, normalize_batch
    from .distributed import extract_distributed, launched
    from .runtime import decode_threads, default_workers, resolve_device, resolve_precision

    if cfg.images is None and launched():  # a torchrun worker: this rank's block into its shard
        return extract_distributed(cfg)
    rep = get_reporter()
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} must be at least 1", "use e.g. --batch-size 32")
    if cfg.chunk_rows < 1:
        raise UsageError(f"--chunk-rows {cfg.chunk_rows} must be at least 1")
    out = Path(cfg.out)
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a directory", "give a file name such as features.h5")

    # Class order: an existing cache's first (so incremental adds keep label ids), then new ones sorted.
    known: list[str] | None = None
    if cfg.images is None and out.exists() and not cfg.overwrite:
        try:
            known = FeatureCache(out).classes
        except RtError:
            known = None  # the writer reports what is wrong with it
    images = cfg.images if cfg.images is not None else list_images(cfg.data, allow_outside=cfg.allow_outside)
    if known is not None:
        extra = [c for c in images.classes if c not in known]
        images = list_images(cfg.data, classes=known + extra, allow_outside=cfg.allow_outside)
    for note in images.notes:
        rep.warn(note)

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    backbone = build_backbone(cfg.model, cfg.weights, cfg.image_size)
    for c in cfg.cut:
        backbone.check_stage(c)
    net = backbone.net.to(device).eval().to(memory_format=torch.channels_last)

    stage_shapes = _stage_shapes(net, cfg.cut, backbone.transform.input_size) if cfg.cut else {}
    attrs = {
        "precision": precision,
        "source": images.source,
        "root": str(Path(images.root).resolve()) if cfg.record_root else "",
    }
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    if workers < 0:
        raise UsageError(f"--workers {workers} must be 0 or more")
    t0 = time.perf_counter()
    with CacheWriter(out, backbone.identity, images.classes, stage_shapes, cfg.dtype, cfg.overwrite, attrs) as writer:
        done = writer.done_paths()
        todo = [i for i, p in enumerate(images.paths) if p not in done]
        if not todo and not writer.pending_parts and writer.existing is not None:
            writer.finalize()  # removes the empty work folder; the cache file is not touched
            rep.info(f"{out}: up to date ({writer.existing.n} rows); nothing to compute")
            return ExtractResult(out, writer.existing.n, 0, writer.existing.skipped, 0.0, 0.0, images.notes)
        if len(todo) < len(images) and todo:
            rep.info(f"resuming: {len(images) - len(todo)} of {len(images)} images already done")
        rep.info(
            f"extracting {len(todo)} images with {backbone.identity.model} ({backbone.identity.weights_id}) "
            f"on {device.type}, {precision}, batch {cfg.batch_size}, "
            + (f"{workers} decode workers" if workers else f"{decode_threads()} decode threads")
            + (f", keeping {', '.join(cfg.cut)} maps" if cfg.cut else "")
        )
        dataset = ImageDataset(
            images.subset(todo),
            eval_transform_uint8(backbone.transform),  # normalised per batch, on the device
            draft=backbone.transform.draft_target(),
            max_pixels=cfg.max_pixels or DEFAULT_MAX_PIXELS,
        )
        loader = _loader(dataset, cfg.batch_size, workers, device)
        captured: dict[str, Any] = {}
        hooks = [net.get_submodule(name).register_forward_hook(_capture(captured, name)) for name in cfg.cut]
        fwd = compiled_forward(net, device, precision, cfg.compile, len(todo), backbone.identity.to_json())
        buf = _Buffer()
        t_run = time.perf_counter()
        try:
            with rep.progress("extract", total=len(todo), unit="img") as bar, torch.inference_mode():
                for xs, idx, errors in loader:
                    sub_paths = [dataset.images.paths[i] for i in idx]
                    sub_labels = [dataset.images.labels[i] for i in idx]
                    for p, e in zip(sub_paths, errors):
                        if e:
                            buf.skipped.append((p, e))
                            if cfg.strict:
                                raise DataError(
                                    f"{Path(images.root) / p}: {e}",
                                    "fix or remove the file, or drop --strict",
                                )
                    if xs is not None:
                        xs = xs.to(device, non_blocking=True)
                        xs = normalize_batch(xs, backbone.transform, memory_format=torch.channels_last)
                        feats = fwd(xs)
                        ok = [k for k, e in enumerate(errors) if not e]
                        buf.add(
                            [sub_paths[k] for k in ok],
                            [sub_labels[k] for k in ok],
                            feats.float().cpu().numpy(),
                            {n: captured[n].float().cpu().numpy() for n in cfg.cut},
                        )
                    if buf.rows >= cfg.chunk_rows:
                        buf.flush(writer)
                    bar.advance(len(idx))
                buf.flush(writer, force=True)
        except KeyboardInterrupt:
            buf.flush(writer, force=True)
            raise RtError(
                f"interrupted: finished chunks are saved in {writer.parts_dir}",
                "run the same command again to resume where it stopped",
            ) from None
        finally:
            for h in hooks:
                h.remove()
            if hasattr(loader, "close"):  # stop the decode threads now, not when the generator is collected
                loader.close()
        seconds = time.perf_counter() - t_run
        rows, new = writer.finalize()
        skipped = writer.existing.skipped if writer.existing is not None else []
    total = time.perf_counter() - t0
    rate = len(todo) / seconds if seconds > 0 else 0.0
    rep.info(f"wrote {out}: {rows} rows ({new} new) in {total:.1f}s, {rate:.1f} img/s")
    if skipped:
        rep.warn(f"{len(skipped)} file(s) skipped (listed in the cache; `rt info {out} --skipped`):")
        for p, reason in skipped[:20]:
            rep.warn(f"  {p}: {reason}")
    return ExtractResult(out, rows, new, list(skipped), total, rate, images.notes)


def _loader(dataset: Any, batch_size: int, workers: int, device: Any) -> Any:
    """Batches of ``(uint8 images, indices, errors)``: decoded by worker processes when ``workers`` > 0,
    else by threads of this process, one batch ahead of the forward pass."""
    import torch

    from .data import collate, iter_batches
    from .runtime import decode_threads

    if workers == 0:
        return iter_batches(dataset, batch_size, decode_threads())
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def _capture(store: dict[str, Any], name: str) -> Any:
    def hook(_module: Any, _inp: Any, output: Any) -> None:
        store[name] = output

    return hook


def _stage_shapes(net: Any, cut: list[str], size: int) -> dict[str, tuple[int, ...]]:
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
    """Rows waiting to be committed as one chunk."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.paths: list[str] = []
        self.labels: list[int] = []
        self.feats: list[np.ndarray] = []
        self.maps: dict[str, list[np.ndarray]] = {}
        self.skipped: list[tuple[str, str]] = []

    @property
    def rows(self) -> int:
        return len(self.paths)

    def add(self, paths: list[str], labels: list[int], feats: np.ndarray, maps: dict[str, np.ndarray]) -> None:
        self.paths += paths
        self.labels += labels
        self.feats.append(feats)
        for k, v in maps.items():
            self.maps.setdefault(k, []).append(v)

    def flush(self, writer: Any, force: bool = False) -> None:
        if not self.paths and not (force and self.skipped):
            return
        dim = writer.identity.num_features
        feats = np.concatenate(self.feats) if self.feats else np.zeros((0, dim), np.float32)
        maps = {
            k: np.concatenate(v) if v else np.zeros((0, *writer.stage_shapes[k]), np.float32)
            for k, v in self.maps.items()
        }
        for k, shape in writer.stage_shapes.items():
            maps.setdefault(k, np.zeros((0, *shape), np.float32))
        writer.write_part(self.paths, self.labels, feats, maps, self.skipped)
        self.clear()
