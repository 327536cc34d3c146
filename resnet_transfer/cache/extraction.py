"""`rt extract`: run the frozen backbone once over the images and store the activations in a cache.

The run is plain on purpose: list the images -> open the cache writer (lock, identity checks) -> plan
(:mod:`resnet_transfer.extract_plan`: content keys, what is stored, what must be computed) -> forward the
images of new content in batches, committing a chunk file every ``chunk_rows`` images -> write the new
index (the rows as they are now) -> say what changed in one line.

Under torchrun (:func:`extract` sees ``RANK``/``WORLD_SIZE``), rank 0 lists, plans and holds the lock; the
images to compute are cut into contiguous blocks, one per rank; every rank writes its chunk files into the
same ``<out>.chunks/`` folder; then rank 0 writes the index. Rows, keys and order are those of a
single-process run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base import RtError, UsageError, get_reporter
from .compute import compute, stage_shapes
from .config import ExtractConfig, ExtractResult, RunSetup


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Bring the cache ``cfg.out`` in line with the images at ``cfg.data``: pooled features (plus ``cfg.cut``
    maps and ``cfg.pool_stages`` pooled features) of every image, keyed by content.

    Incremental and resumable: stored content (in the cache or in finished chunks of an interrupted run) is
    never recomputed; moved or relabelled images only change their row. Under torchrun every rank computes
    a block. Raises :class:`RtError` subclasses for anything the user must fix."""
    from ..base import launched

    _check_options(cfg)
    if launched() and not cfg.dry_run:
        return _extract_sharded(cfg)
    t0 = time.perf_counter()
    images = _listing(cfg)  # first: a wrong --data answers before the backbone (torch, timm) is loaded
    early = _early_start(cfg, images)  # crops decoded on the idle core while torch and timm load
    try:
        setup = _setup(cfg)
        early = _early_check(cfg, setup, early)
        writer = _writer(cfg, setup, images, lock=not cfg.dry_run)
        if cfg.dry_run:
            return _dry_run(cfg, writer, images)
        with writer:
            plan = _plan(writer, images)
            todo, keys = plan.todo()
            _announce(cfg, setup, plan, len(images))
            computed, seconds = compute(cfg, setup, todo, keys, writer.store, early) if len(todo) else (0, 0.0)
            if early is not None and early.used:
                get_reporter().info(f"{early.used} of them decoded while the model was being built (early start)")
            return _finish(cfg, writer, plan, computed, seconds, t0)
    finally:
        if early is not None:
            early.close()


def _check_options(cfg: ExtractConfig) -> None:
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} must be at least 1", "use e.g. --batch-size 32")
    if cfg.chunk_rows < 1:
        raise UsageError(f"--chunk-rows {cfg.chunk_rows} must be at least 1")
    if cfg.workers is not None and cfg.workers < 0:
        raise UsageError(f"--workers {cfg.workers} must be 0 or more")
    out = Path(cfg.out)
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a directory", "give a file name such as features.h5")


def _listing(cfg: ExtractConfig) -> Any:
    """The images, classes in the existing cache's order first (so label ids stay), then new ones sorted."""
    from ..images import extended_class_order, list_images, remap_labels
    from .reader import FeatureCache

    out = Path(cfg.out)
    known: list[str] | None = None
    if out.exists() and not cfg.overwrite:
        try:
            with FeatureCache(out) as c:
                known = c.classes
        except RtError:
            known = None  # the writer reports what is wrong with it
    images = list_images(cfg.data, allow_outside=cfg.allow_outside)
    if known is not None:
        order = extended_class_order(known, images.classes)
        if images.reader is not None:  # an archive or shards: relabel in place rather than read its headers again
            images.labels = [int(y) for y in remap_labels(images.labels, images.classes, order)]
            images.classes = order
        else:
            images = list_images(cfg.data, classes=order, allow_outside=cfg.allow_outside)
    for note in images.notes:
        get_reporter().warn(note)
    return images


def _early_start(cfg: ExtractConfig, images: Any) -> Any:
    """Crops of the first images, decoded by a child process while this one loads torch and timm and builds
    the model (:func:`images.early_crops`), for the transform this model spec resolved to last time; None
    when there is none, or when the run may reuse stored content (an existing cache or the chunks of an
    interrupted run, without --overwrite: only the plan, after the backbone is built, knows which images to
    compute) or decodes in workers."""
    from ..backbone import recalled_transform
    from ..images import early_crops
    from .reader import chunk_dir

    stored = Path(cfg.out).exists() or chunk_dir(cfg.out).exists()
    if cfg.dry_run or (cfg.workers or 0) > 0 or (stored and not cfg.overwrite):
        return None
    guess = recalled_transform(cfg.model, cfg.weights, cfg.image_size)
    return early_crops(images, guess, cfg.max_pixels) if guess is not None else None


def _early_check(cfg: ExtractConfig, setup: RunSetup, early: Any) -> Any:
    """Remember the transform this model spec resolved to (the next run's guess); keep the early crops only
    if they are what the feed will make: the same transform, decoded by threads of this process on the CPU."""
    from ..backbone import remember_transform

    transform = setup.backbone.transform
    remember_transform(cfg.model, cfg.weights, cfg.image_size, transform)
    if early is not None and (setup.workers or setup.device.type != "cpu" or not early.fits(transform, cfg.max_pixels)):
        early.close()
        return None
    return early


def _setup(cfg: ExtractConfig) -> RunSetup:
    import torch

    from ..backbone import build_backbone
    from ..base import default_workers, resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    calibration = None
    if cfg.calibration is not None and precision != "int8":
        raise UsageError("--calibration is for --precision int8", "add --precision int8, or drop --calibration")
    if precision == "int8":
        from ..backbone import calibration_images, require_pooled_only, require_torchao

        require_torchao()
        require_pooled_only(bool(cfg.cut or cfg.pool_stages))  # before the backbone is built
        if cfg.calibration is not None:
            calibration, precision = calibration_images(cfg.calibration)
    backbone = build_backbone(cfg.model, cfg.weights, cfg.image_size)
    for c in cfg.cut:
        backbone.check_stage(c)
    for c in cfg.pool_stages:
        backbone.check_stage(c, "--pool-stages")
    net = backbone.net.to(device).eval().to(memory_format=torch.channels_last)
    names = list(dict.fromkeys([*cfg.cut, *cfg.pool_stages]))
    shapes = _cached_shapes(cfg, backbone.identity, names)
    if shapes is None:  # a dry forward pass tells them
        shapes = stage_shapes(net, names, backbone.transform.input_size) if names else {}
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    return RunSetup(
        device,
        precision,
        backbone,
        net,
        {n: shapes[n] for n in cfg.cut},
        {n: int(shapes[n][0]) for n in cfg.pool_stages},
        workers,
        calibration,
    )


def _cached_shapes(cfg: ExtractConfig, identity: Any, names: list[str]) -> dict[str, tuple[int, ...]] | None:
    """The stage shapes an existing cache of the same backbone and stages records (no forward pass needed),
    or None."""
    from .reader import FeatureCache

    if cfg.overwrite or not Path(cfg.out).exists():
        return None
    try:
        with FeatureCache(cfg.out) as c:
            if (
                c.identity.differences(identity)
                or sorted(c.stages) != sorted(cfg.cut)
                or c.pooled_stages != cfg.pool_stages
            ):
                return None  # the writer says what differs
            return {**{k: (v,) for k, v in c.pooled.items()}, **dict(c.stages)}
    except RtError:
        return None


def _writer(cfg: ExtractConfig, setup: RunSetup, images: Any, lock: bool = True) -> Any:
    from ..images import root_attrs
    from .writer import CacheWriter

    attrs = {"precision": setup.precision, "source": images.source, **root_attrs(images.root, cfg.out, cfg.record_root)}
    return CacheWriter(
        cfg.out,
        setup.backbone.identity,
        images.classes,
        setup.stage_shapes,
        cfg.dtype,
        cfg.overwrite,
        attrs,
        pooled_dims=setup.pooled_dims,
        lock=lock,
    )


def _old_paths(e: Any, images: Any, paths: list[str]) -> list[str]:
    """The existing cache's ``paths`` as this run's listing names the same files (:func:`plan.rebase`). The
    cache's root is whichever of the folder it records and that folder's recorded place next to the cache
    file names more of this listing's files (a manifest beside the image folder: the recorded one; a data
    folder moved together with its cache: the relative one); with neither, the paths as they are (only a root
    that differs costs a pass over the paths). A source read in place keeps its member names."""
    from ..images import SOURCE_KINDS
    from .plan import rebase

    attrs = e.attrs or {}
    if images.reader is not None or attrs.get("source") in SOURCE_KINDS:
        return list(paths)
    listed = set(images.paths)
    roots: list[Any] = [None, attrs.get("root") or None]
    if attrs.get("root_relative"):
        roots.append(Path(e.path).resolve().parent / str(attrs["root_relative"]))
    hits = [sum(p in listed for p in rebase(e.paths, r, images.root if r else None)) for r in roots]
    root = roots[max(range(len(roots)), key=lambda k: (hits[k], -k))]  # ties: the paths as they are
    return rebase(paths, root, images.root if root is not None else None)


def _plan(writer: Any, images: Any) -> Any:
    from .plan import make_plan

    e = writer.existing
    if e is None:
        return make_plan(images, [], {}, set(writer.known()), writer.known_skips())
    stats = e.file_stats()
    here = _old_paths(e, images, list(stats))
    return make_plan(
        images,
        _old_paths(e, images, list(e.paths)),
        dict(zip(here, stats.values())),
        set(writer.known()),
        writer.known_skips(),
    )


def _announce(cfg: ExtractConfig, setup: RunSetup, plan: Any, total: int) -> None:
    from ..backbone import int8_hint
    from ..base import decode_threads

    rep = get_reporter()
    n = len(plan.compute)
    if not n:
        return
    if n < total:
        rep.info(f"{total - n} of {total} images already done (stored by content); {n} to compute")
    ident = setup.backbone.identity
    rep.info(
        f"extracting {n} images with {ident.model} ({ident.weights_id}) on {setup.device.type}, "
        f"{setup.precision}, batch {cfg.batch_size}, "
        + (f"{setup.workers} decode workers" if setup.workers else f"{decode_threads()} decode threads")
        + (f", keeping {', '.join(cfg.cut)} maps" if cfg.cut else "")
        + (f", pooling {', '.join(cfg.pool_stages)}" if cfg.pool_stages else "")
    )
    size = ident.transform.input_size
    hint = (
        None
        if cfg.cut or cfg.pool_stages
        else int8_hint(setup.device, ident.arch, setup.precision, (cfg.batch_size, 3, size, size), n)
    )
    if hint:
        rep.info(hint)


def _changes(writer: Any, rows: list[Any], skipped: list[Any], images: Any) -> tuple[dict[str, int], str]:
    from .plan import change_line, changes, row_names

    e = writer.existing
    old = row_names(_old_paths(e, images, list(e.paths)), e.keys, list(e.labels), e.classes) if e is not None else []
    new = row_names([r.path for r in rows], [r.key for r in rows], [r.label for r in rows], images.classes)
    counts = changes(old, new)
    return counts, change_line(counts, len(skipped))


def _finish(cfg: ExtractConfig, writer: Any, plan: Any, computed: int, seconds: float, t0: float) -> ExtractResult:
    """Write the new index for the plan's rows, say what changed, and describe the result."""
    rep = get_reporter()
    out = Path(cfg.out)
    rows, skipped = plan.result(set(writer.known()), writer.known_skips())
    counts, line = _changes(writer, rows, skipped, plan.images)
    last = {"summary": line, **counts, "skipped": len(skipped), "computed": computed}
    had = writer.existing.n if writer.existing is not None else None
    n, new = writer.finalize(rows, skipped, {"last_run": json.dumps(last)}, merge=cfg.merge)
    skipped_pairs = [(s.path, s.reason) for s in skipped]
    total = time.perf_counter() - t0
    rate = computed / seconds if seconds > 0 else 0.0
    if had == n and not computed and counts["unchanged"] == n:
        rep.info(f"{out}: up to date ({n} rows); nothing to compute")
    else:
        rep.info(line)
        rep.info(f"wrote {out}: {n} rows ({new} new, {computed} computed) in {total:.1f}s, {rate:.1f} img/s")
    rep.skipped(skipped_pairs, f"file(s) skipped (listed in the cache; `rt info {out} --skipped`)")
    return ExtractResult(out, n, new, skipped_pairs, total, rate, list(plan.images.notes), counts, line, computed)


def _dry_run(cfg: ExtractConfig, writer: Any, images: Any) -> ExtractResult:
    """The plan only: what would change, how many images would be computed. Writes nothing."""
    rep = get_reporter()
    writer.inspect()
    try:
        plan = _plan(writer, images)
        todo, keys = plan.todo()
        rows, skipped = plan.result(set(writer.known()) | set(keys), writer.known_skips())
        counts, line = _changes(writer, rows, skipped, images)
    finally:
        writer.close()
    rep.info(f"dry run: {line}")
    rep.info(
        f"dry run: would compute {len(todo)} image(s) and write {cfg.out} with {len(rows)} rows "
        f"({plan.hashed} file(s) read for their key); nothing was computed or written"
    )
    return ExtractResult(
        Path(cfg.out),
        len(rows),
        0,
        [(s.path, s.reason) for s in skipped],
        0.0,
        0.0,
        list(images.notes),
        counts,
        line,
        0,
    )


# ------------------------------------------------------------------------------------- sharded (torchrun)


@dataclass
class _Work:
    """What rank 0 planned and broadcast: the images to compute (listing order) and their keys."""

    todo: Any  # ImageList
    keys: list[str]
    spec: Any  # CacheSpec: every rank's chunk files are made with it


def _extract_sharded(cfg: ExtractConfig) -> ExtractResult:
    """`rt extract` under torchrun: rank 0 plans and holds the lock, every rank computes its block of the new
    content into chunk files, rank 0 writes the index. Every rank returns the same :class:`ExtractResult`."""
    from ..base import agree, init, on_main, rank_reporting, resolve_device, shard_block
    from .writer import ChunkStore

    env = init(resolve_device(cfg.device))
    t0 = time.perf_counter()
    held: dict[str, Any] = {}
    try:
        with rank_reporting() as rep:
            work = on_main(lambda: _main_start(cfg, held))
            block = shard_block(len(work.keys), env.rank, env.world_size)
            if work.keys:
                most = len(shard_block(len(work.keys), 0, env.world_size))
                rep.info(f"{env.world_size} ranks: {len(work.keys)} images to compute, up to {most} per rank")

            def run_block() -> int:
                if not len(block):
                    return 0
                setup = held["setup"] if env.is_main else _setup(cfg)
                store = held["writer"].store if env.is_main else ChunkStore(Path(cfg.out), work.spec)
                mine = work.todo.subset(list(block))
                return compute(cfg, setup, mine, [work.keys[i] for i in block], store)[0]

            computed = sum(agree(run_block))
            return on_main(lambda: _finish(cfg, held["writer"], held["plan"], computed, time.perf_counter() - t0, t0))
    finally:
        if "writer" in held:
            held["writer"].__exit__(None, None, None)


def _main_start(cfg: ExtractConfig, held: dict[str, Any]) -> _Work:
    """Rank 0: build, list, lock and open the cache, plan. Keeps the open writer in ``held``."""
    held["setup"] = setup = _setup(cfg)
    images = _listing(cfg)
    writer = _writer(cfg, setup, images, lock=True)
    writer.__enter__()
    held["writer"] = writer
    held["plan"] = plan = _plan(writer, images)
    _announce(cfg, setup, plan, len(images))
    todo, keys = plan.todo()
    todo.notes = []  # reported once, by rank 0
    return _Work(todo, keys, writer.spec)
