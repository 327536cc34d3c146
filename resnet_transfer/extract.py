"""`rt extract`: run the frozen backbone once over the images and store the activations in a cache.

The loop is plain on purpose: list images -> build backbone -> open the cache writer (lock, resume) ->
forward the images that are not done yet, in batches, committing a chunk every ``chunk_rows`` rows ->
assemble the cache.

Under torchrun (:func:`extract` sees ``RANK``/``WORLD_SIZE``), rank 0 plans (lists the images once and
keeps those not in ``<out>`` yet) and broadcasts the plan; the images to do are cut into contiguous blocks
in listing order, one per rank; rank ``r`` of ``W`` runs the same loop into ``<out>.shard-0000r-of-0000W.h5``
(so each shard resumes on its own); then rank 0 assembles ``<out>`` through
:func:`resnet_transfer.cache_writer.write_assembled` (virtual over the shards, or merged), rows in the same
order as a single-process run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CacheError, DataError, RtError, UsageError
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
    not recomputed. Under torchrun every rank takes a block (see the module's doc). Raises
    :class:`RtError` subclasses for anything the user must fix."""
    from .distributed import launched

    _check_options(cfg)
    if launched():  # a torchrun worker: this rank's block into its shard, then rank 0 assembles
        return _extract_sharded(cfg)
    from .cache import FeatureCache
    from .data import list_images

    out = Path(cfg.out)
    # Class order: an existing cache's first (so incremental adds keep label ids), then new ones sorted.
    known: list[str] | None = None
    if out.exists() and not cfg.overwrite:
        try:
            known = FeatureCache(out).classes
        except RtError:
            known = None  # the writer reports what is wrong with it
    images = list_images(cfg.data, allow_outside=cfg.allow_outside)
    if known is not None:
        extra = [c for c in images.classes if c not in known]
        images = list_images(cfg.data, classes=known + extra, allow_outside=cfg.allow_outside)
    return extract_images(cfg, images, out)


def _check_options(cfg: ExtractConfig) -> None:
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} must be at least 1", "use e.g. --batch-size 32")
    if cfg.chunk_rows < 1:
        raise UsageError(f"--chunk-rows {cfg.chunk_rows} must be at least 1")
    out = Path(cfg.out)
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a directory", "give a file name such as features.h5")


def extract_images(cfg: ExtractConfig, images: Any, out: Path) -> ExtractResult:
    """The extraction loop over a listed ``images`` (an ``ImageList``) into the cache ``out``: the images
    not in ``out`` (or its finished chunks) yet are computed, committed chunk by chunk, then assembled."""
    import torch

    from .backbones import build_backbone
    from .cache_writer import CacheWriter
    from .compiled import compiled_forward
    from .data import DEFAULT_MAX_PIXELS, ImageDataset, eval_transform_uint8, normalize_batch
    from .runtime import decode_threads, default_workers, resolve_device, resolve_precision

    rep = get_reporter()
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


# ------------------------------------------------------------------------------------- sharded (torchrun)


@dataclass
class _Plan:
    """What rank 0 decided and broadcast: the images still to do (listing order) and the final's rows."""

    todo: Any  # ImageList of the images not in the final cache yet
    classes: list[str]
    base_rows: int
    up_to_date: bool


def _extract_sharded(cfg: ExtractConfig) -> ExtractResult:
    """`rt extract` under torchrun: this rank's block into its shard, then rank 0 assembles ``cfg.out``.

    Every rank returns the same :class:`ExtractResult` (the final cache's)."""
    from .cache_writer import shard_path
    from .distributed import agree, init, on_main, rank_reporting, shard_block
    from .fsutil import FileLock
    from .runtime import resolve_device

    out = Path(cfg.out)
    env = init(resolve_device(cfg.device))
    t0 = time.perf_counter()
    lock = FileLock(out)
    try:
        with rank_reporting() as rep:
            plan = on_main(lambda: _plan(cfg, out, lock))
            if plan.up_to_date:
                rep.info(f"{out}: up to date ({plan.base_rows} rows); nothing to compute")
                return on_main(lambda: _result_of(out, 0, t0, plan.todo.notes))
            block = shard_block(len(plan.todo), env.rank, env.world_size)
            most = len(shard_block(len(plan.todo), 0, env.world_size))
            rep.info(
                f"{env.world_size} ranks: {len(plan.todo)} images to do, up to {most} "
                f"per rank, into {out.name}.shard-*-of-{env.world_size:05d}.h5"
            )

            def run_block() -> int:
                if not len(block):
                    return 0
                mine = plan.todo.subset(list(block))
                if not env.is_main:
                    mine.notes = []  # rank 0 reports the listing notes once
                shard = shard_path(out, env.rank, env.world_size)
                return extract_images(replace(cfg, overwrite=False), mine, shard).new_rows

            new_rows = sum(agree(run_block))
            return on_main(lambda: _assemble(cfg, out, plan, env.world_size, new_rows, t0))
    finally:
        lock.release()


def _plan(cfg: ExtractConfig, out: Path, lock: Any) -> _Plan:
    """Rank 0: lock ``out``, honour --overwrite, list the images (class order of an existing final cache
    first), and keep those not in the final cache yet."""
    from .backbones import build_backbone
    from .cache import FeatureCache
    from .cache_writer import check_same_stages, remove_cache, shard_files
    from .data import list_images

    lock.acquire()
    if cfg.overwrite:
        remove_cache(out)
        for p in shard_files(out):
            remove_cache(p)
    base: FeatureCache | None = FeatureCache(out) if out.exists() else None
    try:
        known = base.classes if base is not None else None
        images = list_images(cfg.data, allow_outside=cfg.allow_outside)
        if known is not None:
            extra = [c for c in images.classes if c not in known]
            images = list_images(cfg.data, classes=known + extra, allow_outside=cfg.allow_outside)
        done: set[str] = set()
        if base is not None:
            # the shards are checked by their writers; the final cache is checked here, before any work
            base.check_identity(build_backbone(cfg.model, cfg.weights, cfg.image_size).identity, "this run")
            check_same_stages(out, list(base.stages), list(cfg.cut))
            done = set(base.paths) | {p for p, _ in base.skipped}
        todo = images.subset([i for i, p in enumerate(images.paths) if p not in done])
        n_base = base.n if base is not None else 0
        up_to_date = not len(todo) and not (cfg.merge and base is not None and base.is_virtual)
        return _Plan(todo, list(images.classes), n_base, up_to_date)
    finally:
        if base is not None:
            base.close()


def _result_of(out: Path, new_rows: int, t0: float, notes: list[str]) -> ExtractResult:
    from .cache import FeatureCache

    with FeatureCache(out) as c:
        rows, skipped = c.n, list(c.skipped)
    return ExtractResult(out, rows, new_rows, skipped, time.perf_counter() - t0, 0.0, list(notes))


def _assemble(cfg: ExtractConfig, out: Path, plan: _Plan, world: int, new_rows: int, t0: float) -> ExtractResult:
    """Rank 0, after every shard is written: the final cache, rows = the final's old rows, then the new
    images in listing order (exactly what one process appends)."""
    from .cache import FeatureCache
    from .cache_writer import remove_cache, shard_files, shard_path, write_assembled
    from .distributed import shard_block

    rep = get_reporter()
    current = [shard_path(out, r, world) for r in range(world) if len(shard_block(len(plan.todo), r, world))]
    missing = [p for p in current if not p.exists()]
    if missing:
        raise CacheError(
            f"shard {missing[0]} is not visible to rank 0 ({len(missing)} of {len(current)} missing)",
            "put --out on a file system every node shares, or copy all shard files next to --out on one "
            "machine and run the same command there with the same number of processes (nothing is recomputed)",
        )
    others = [p for p in shard_files(out) if p not in current]
    base = FeatureCache(out) if out.exists() else None
    opened: list[Any] = []
    try:
        opened = _open_sources(current, others, plan.classes)
        if base is not None and opened:
            base.check_identity(opened[0].cache.identity, "the shards")
        rows, skipped, merge = _final_rows(cfg, out, plan, base, opened, len(current))
        if not opened:
            raise DataError(f"--data {cfg.data}: no images to extract", "check the folder or manifest")
        stages = sorted(opened[0].cache.stages)
        write_assembled(out, opened, rows, stages, plan.classes, skipped, merge)
    finally:
        for src in opened:
            src.cache.close()
        if base is not None:
            base.close()
    if merge:
        for p in shard_files(out):
            remove_cache(p)
    else:
        used = {src.path for src in opened}
        for p in others:
            if p not in used:
                remove_cache(p)
    result = _result_of(out, new_rows, t0, plan.todo.notes)
    kind = "merged file" if merge else f"virtual dataset over {len({s for s, _ in rows})} shard file(s)"
    rep.info(f"wrote {out}: {result.rows} rows ({new_rows} new) as a {kind} in {time.perf_counter() - t0:.1f}s")
    if result.skipped:
        rep.warn(f"{len(result.skipped)} file(s) skipped (listed in the cache; `rt info {out} --skipped`)")
    return result


def _open_sources(current: list[Path], others: list[Path], classes: list[str]) -> list[Any]:
    """The shard caches to take rows from: this run's, then older ones written with the same settings."""
    from .cache import FeatureCache
    from .cache_writer import Source, label_map

    opened: list[Any] = []
    ref: Any = None
    try:
        for p in current + others:
            c = FeatureCache(p)
            if ref is None:
                ref = c
            if c.identity.differences(ref.identity) or sorted(c.stages) != sorted(ref.stages):
                c.close()
                if p in current:
                    raise CacheError(f"{p} was written with other settings than {current[0]}", "run with --overwrite")
                continue  # a stale shard of an earlier run with other settings: not a source
            opened.append(Source(p, c, label_map(c.classes, classes)))
    except BaseException:
        for src in opened:
            src.cache.close()
        raise
    return opened


def _final_rows(
    cfg: ExtractConfig, out: Path, plan: _Plan, base: Any, opened: list[Any], n_current: int
) -> tuple[list[tuple[int, int]], list[tuple[str, str]], bool]:
    """Rows of the final cache as (source, row) pairs: the final's old rows, then the new images in
    listing order; the skipped files; and whether the file must be merged (sources append to ``opened``)."""
    from .cache_writer import Source, label_map

    where: dict[str, tuple[int, int]] = {}
    for s, src in enumerate(opened):
        for row, p in enumerate(src.cache.paths):
            where.setdefault(p, (s, row))
    skipped: dict[str, str] = {}
    if base is not None:
        skipped.update(base.skipped)
    for src in opened[:n_current]:
        for p, reason in src.cache.skipped:
            skipped.setdefault(p, reason)
    new_paths = [p for p in plan.todo.paths if p in where]
    lost = [p for p in plan.todo.paths if p not in where and p not in skipped]
    if lost:
        raise CacheError(
            f"{len(lost)} image(s) are in no shard (first: {lost[0]})",
            "run the same command again: the shards resume and the final cache is rebuilt",
        )
    order = list(base.paths if base is not None else []) + new_paths
    merge = cfg.merge
    if not merge and base is not None and any(p not in where for p in base.paths):
        get_reporter().warn(f"{out} holds rows that are in none of the current shards; writing a merged file instead")
        merge = True
    if merge and base is not None:  # the final's own rows come from the final itself
        opened.append(Source(out, base, label_map(base.classes, plan.classes)))
        for row, p in enumerate(base.paths):
            where[p] = (len(opened) - 1, row)
    for p in order:
        skipped.pop(p, None)
    return [where[p] for p in order], list(skipped.items()), merge
