"""Running under ``torchrun``: process-group set-up, rank helpers, and the sharded `rt extract`.

Nothing here launches processes: ``torchrun`` (PyTorch's own launcher) does, and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` for every worker. :func:`launched` reads those; :func:`init` joins the
process group (gloo on CPUs; gloo for CPU tensors plus NCCL for CUDA tensors on GPUs). A single process
(no torchrun, or ``--nproc-per-node 1``) never touches ``torch.distributed``.

Sharded extraction (:func:`extract_distributed`): rank 0 lists the images once and broadcasts the list,
so every rank sees the same one; the images not yet in ``<out>`` are cut into contiguous blocks in listing
order, one per rank; rank ``r`` of ``W`` writes ``<out>.shard-0000r-of-0000W.h5`` through the ordinary
crash-safe :class:`~resnet_transfer.cache.CacheWriter` (so each shard resumes on its own); after all ranks
report, rank 0 writes ``<out>`` as an HDF5 virtual dataset over the shards (or, with ``merge``, a real
file and deletes the shards), rows in the same order as a single-process run. The final file carries the
same datasets and attributes as a single-process cache and is read by the same ``FeatureCache``.

The VDS/merge writer lives here rather than in ``cache.py`` because it only exists for sharded runs; it
writes the layout documented in docs/cache-format.md and nothing else.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .errors import CacheError, DataError, IdentityMismatch, RtError, UsageError
from .report import Reporter, get_reporter, set_reporter

if TYPE_CHECKING:
    from .extract import ExtractConfig, ExtractResult

T = TypeVar("T")

#: seconds a rank waits for the others (e.g. rank 0 for the slowest shard); override with RT_DIST_TIMEOUT
DEFAULT_TIMEOUT_S = 24 * 3600


# ------------------------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun job (``world_size == 1`` when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """Rank and world size from the variables torchrun sets; a plain process is rank 0 of 1."""
    try:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except (KeyError, ValueError):
        return DistEnv()
    if world < 1 or not 0 <= rank < world:
        return DistEnv()
    return DistEnv(rank, world, local, local_world)


def launched() -> bool:
    """True in a worker of a torchrun job with more than one process."""
    return dist_env().active


def is_main() -> bool:
    """Rank 0 (or a plain process): the one that writes final files, reports and plots."""
    return dist_env().is_main


def init(device: Any = None) -> DistEnv:
    """Join the torchrun process group (once); a no-op for a single process.

    ``device`` (a ``torch.device`` or string) picks the backend: gloo on CPUs; on CUDA, NCCL for CUDA
    tensors and gloo for CPU ones, and this rank's GPU (``LOCAL_RANK``) becomes the current device."""
    import torch
    import torch.distributed as dist

    env = dist_env()
    if not env.active:
        return env
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible here", "use --device cpu or --device auto")
        if env.local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"local rank {env.local_rank} has no GPU ({torch.cuda.device_count()} visible on this node)",
                "give torchrun --nproc-per-node at most the number of GPUs per node",
            )
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        timeout = _dt.timedelta(seconds=float(os.environ.get("RT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout)
    return env


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (identity for a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its RtError, re-raised) to every rank, so a
    user error seen by rank 0 ends all ranks with the same message instead of leaving them waiting."""
    env = dist_env()
    outcome: tuple[bool, Any] = (True, None)
    if env.is_main:
        try:
            outcome = (True, fn())
        except RtError as exc:
            outcome = (False, exc)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


def agree(fn: Callable[[], T]) -> list[T]:
    """Run ``fn`` on every rank, then raise the first rank's RtError on all of them (if any failed)."""
    outcome: tuple[bool, Any]
    try:
        outcome = (True, fn())
    except RtError as exc:
        outcome = (False, exc)
    gathered = all_gather_object(outcome)
    for ok, value in gathered:
        if not ok:
            raise value
    return [value for _, value in gathered]


class RankReporter(Reporter):
    """The reporter of ranks other than 0: silent, except warnings, which go to ``inner`` prefixed with
    the rank (so N ranks do not print N progress bars)."""

    def __init__(self, inner: Reporter, rank: int) -> None:
        super().__init__(verbose=False)
        self.inner = inner
        self.rank = rank

    def warn(self, message: str) -> None:
        super().warn(message)
        self.inner.warn(f"[rank {self.rank}] {message}")


@contextlib.contextmanager
def rank_reporting() -> Iterator[Reporter]:
    """On ranks other than 0, install a :class:`RankReporter` for the duration of the block."""
    env = dist_env()
    rep = get_reporter()
    if env.is_main:
        yield rep
        return
    quiet = RankReporter(rep, env.rank)
    previous = set_reporter(quiet)
    try:
        yield quiet
    finally:
        set_reporter(previous)


def shard_block(n: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous block of ``n`` items: sizes differ by at most one, earlier ranks larger."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_path(out: str | Path, rank: int, world_size: int) -> Path:
    """``<out>.shard-00002-of-00004.h5``: rank 2 of 4's shard cache, next to ``out``."""
    out = Path(out)
    return out.with_name(f"{out.name}.shard-{rank:05d}-of-{world_size:05d}.h5")


def shard_files(out: str | Path) -> list[Path]:
    """Shard caches of ``out`` on disk (any world size), sorted by (world size, rank)."""
    out = Path(out)
    found = []
    for p in out.parent.glob(f"{out.name}.shard-*-of-*.h5"):
        tail = p.name[len(out.name) + len(".shard-") : -len(".h5")]
        try:
            rank, world = (int(x) for x in tail.split("-of-"))
        except ValueError:
            continue
        found.append(((world, rank), p))
    return [p for _, p in sorted(found)]


def _remove_cache(path: Path) -> None:
    path.unlink(missing_ok=True)
    shutil.rmtree(path.with_name(path.name + ".parts"), ignore_errors=True)


# ------------------------------------------------------------------------------------- sharded extract


@dataclass
class _Plan:
    """What rank 0 decided and broadcast: the images still to do (listing order) and the final's rows."""

    todo: Any  # ImageList of the images not in the final cache yet
    classes: list[str]
    base_rows: int
    up_to_date: bool


def extract_distributed(cfg: ExtractConfig) -> ExtractResult:
    """`rt extract` under torchrun: this rank's block into its shard, then rank 0 assembles ``cfg.out``.

    Every rank returns the same :class:`ExtractResult` (the final cache's)."""
    import time

    from .cache import CacheLock
    from .runtime import resolve_device

    out = Path(cfg.out)
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a directory", "give a file name such as features.h5")
    env = init(resolve_device(cfg.device))
    t0 = time.perf_counter()
    lock = CacheLock(out)
    try:
        with rank_reporting() as rep:
            plan = on_main(lambda: _plan(cfg, out, lock))
            if plan.up_to_date:
                rep.info(f"{out}: up to date ({plan.base_rows} rows); nothing to compute")
                return on_main(lambda: _result_of(out, 0, t0, plan.todo.notes))
            block = shard_block(len(plan.todo), env.rank, env.world_size)
            rep.info(
                f"{env.world_size} ranks: {len(plan.todo)} images to do, up to {len(shard_block(len(plan.todo), 0, env.world_size))} "
                f"per rank, into {out.name}.shard-*-of-{env.world_size:05d}.h5"
            )

            def run_block() -> int:
                if not len(block):
                    return 0
                from .extract import extract

                mine = plan.todo.subset(list(block))
                if not env.is_main:
                    mine.notes = []  # rank 0 reports the listing notes once
                shard_cfg = replace(cfg, out=shard_path(out, env.rank, env.world_size), images=mine, overwrite=False)
                return extract(shard_cfg).new_rows

            new_rows = sum(agree(run_block))
            return on_main(lambda: _assemble(cfg, out, plan, env.world_size, new_rows, t0))
    finally:
        lock.release()


def _plan(cfg: ExtractConfig, out: Path, lock: Any) -> _Plan:
    """Rank 0: lock ``out``, honour --overwrite, list the images (class order of an existing final cache
    first), and keep those not in the final cache yet."""
    from .backbones import build_backbone
    from .cache import FeatureCache
    from .data import list_images

    lock.acquire()
    if cfg.overwrite:
        _remove_cache(out)
        for p in shard_files(out):
            _remove_cache(p)
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
            if sorted(base.stages) != sorted(cfg.cut):
                raise IdentityMismatch(
                    f"{out} holds feature maps for [{', '.join(base.stages)}], this run asks for "
                    f"[{', '.join(cfg.cut)}]",
                    "pass the same --cut as before, or --overwrite to rebuild the cache",
                )
            done = set(base.paths) | {p for p, _ in base.skipped}
        todo = images.subset([i for i, p in enumerate(images.paths) if p not in done])
        n_base = base.n if base is not None else 0
        up_to_date = not len(todo) and not (cfg.merge and base is not None and _is_virtual(out))
        return _Plan(todo, list(images.classes), n_base, up_to_date)
    finally:
        if base is not None:
            base.close()


def _is_virtual(path: Path) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        return bool(f["features"].is_virtual)


def _result_of(out: Path, new_rows: int, t0: float, notes: list[str]) -> ExtractResult:
    import time

    from .cache import FeatureCache
    from .extract import ExtractResult

    with FeatureCache(out) as c:
        rows, skipped = c.n, list(c.skipped)
    return ExtractResult(out, rows, new_rows, skipped, time.perf_counter() - t0, 0.0, list(notes))


@dataclass
class _Source:
    path: Path
    cache: Any  # FeatureCache
    label_map: np.ndarray  # source label index -> final label index


def _assemble(cfg: ExtractConfig, out: Path, plan: _Plan, world: int, new_rows: int, t0: float) -> ExtractResult:
    """Rank 0, after every shard is written: the final cache, rows = the final's old rows, then the new
    images in listing order (exactly what one process appends)."""
    import time

    from .cache import FeatureCache

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
    opened: list[_Source] = []
    try:
        ref: Any = None
        for p in current + others:
            c = FeatureCache(p)
            if ref is None:
                ref = c
            if c.identity.differences(ref.identity) or sorted(c.stages) != sorted(ref.stages):
                c.close()
                if p in current:
                    raise CacheError(f"{p} was written with other settings than {current[0]}", "run with --overwrite")
                continue  # a stale shard of an earlier run with other settings: not a source
            opened.append(_Source(p, c, _label_map(c.classes, plan.classes)))
        if base is not None and ref is not None:
            base.check_identity(ref.identity, "the shards")
        where: dict[str, tuple[int, int]] = {}
        for s, src in enumerate(opened):
            for row, p in enumerate(src.cache.paths):
                where.setdefault(p, (s, row))
        skipped: dict[str, str] = {}
        if base is not None:
            skipped.update(base.skipped)
        for src in opened[: len(current)]:
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
            rep.warn(f"{out} holds rows that are in none of the current shards; writing a merged file instead")
            merge = True
        if merge and base is not None:  # the final's own rows come from the final itself
            opened.append(_Source(out, base, _label_map(base.classes, plan.classes)))
            for row, p in enumerate(base.paths):
                where[p] = (len(opened) - 1, row)
        rows = [where[p] for p in order]
        for p in order:
            skipped.pop(p, None)
        if not opened:
            raise DataError(f"--data {cfg.data}: no images to extract", "check the folder or manifest")
        stages = sorted(opened[0].cache.stages)
        _write_final(out, opened, rows, stages, plan.classes, list(skipped.items()), merge)
    finally:
        for src in opened:
            src.cache.close()
        if base is not None:
            base.close()
    if merge:
        for p in shard_files(out):
            _remove_cache(p)
    else:
        used = {src.path for src in opened}
        for p in others:
            if p not in used:
                _remove_cache(p)
    result = _result_of(out, new_rows, t0, plan.todo.notes)
    kind = "merged file" if merge else f"virtual dataset over {len({s for s, _ in rows})} shard file(s)"
    rep.info(f"wrote {out}: {result.rows} rows ({new_rows} new) as a {kind} in {time.perf_counter() - t0:.1f}s")
    if result.skipped:
        rep.warn(f"{len(result.skipped)} file(s) skipped (listed in the cache; `rt info {out} --skipped`)")
    return result


def _label_map(have: list[str], want: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(want)}
    return np.asarray([index.get(c, -1) for c in have], dtype=np.int64)


def _runs(rows: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """``(source, source_start, dest_start, length)`` for the maximal contiguous stretches of ``rows``."""
    runs: list[tuple[int, int, int, int]] = []
    for dest, (s, r) in enumerate(rows):
        if runs:
            s0, r0, d0, n = runs[-1]
            if s == s0 and r == r0 + n:
                runs[-1] = (s0, r0, d0, n + 1)
                continue
        runs.append((s, r, dest, 1))
    return runs


def _write_final(
    out: Path,
    sources: list[_Source],
    rows: list[tuple[int, int]],
    stages: list[str],
    classes: list[str],
    skipped: list[tuple[str, str]],
    merge: bool,
) -> None:
    """Write ``out`` (temp name, fsync, atomic rename): features and stage maps as virtual datasets over
    the sources, or copied (``merge``); labels, paths and skipped always as real datasets."""
    import h5py

    from .cache import FEATURE_CHUNK_ROWS, _str_dtype

    n = len(rows)
    merge = merge or n == 0  # an empty virtual layout is not allowed; an empty real dataset is
    first = sources[rows[0][0]].cache if rows else sources[0].cache
    src0 = first._file()
    dim = int(src0["features"].shape[1])
    fdtype = src0["features"].dtype
    runs = _runs(rows)
    labels = np.empty(n, dtype=np.int64)
    for s, r0, d0, k in runs:
        src = sources[s]
        raw = src.cache.labels[r0 : r0 + k]
        labels[d0 : d0 + k] = np.where(raw >= 0, src.label_map[np.maximum(raw, 0)], -1)
    paths = [sources[s].cache.paths[r] for s, r in rows]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            datasets = [("features", (dim,), fdtype)] + [
                (f"stages/{name}", tuple(src0["stages"][name].shape[1:]), src0["stages"][name].dtype) for name in stages
            ]
            for key, shape, dtype in datasets:
                if merge:
                    chunk_rows = max(1, min(FEATURE_CHUNK_ROWS, n)) if key == "features" else 1
                    ds = f.create_dataset(key, (n, *shape), dtype=dtype, chunks=(chunk_rows, *shape))
                    for s, r0, d0, k in runs:
                        src_ds = sources[s].cache._file()[key]
                        for lo in range(0, k, FEATURE_CHUNK_ROWS):
                            hi = min(k, lo + FEATURE_CHUNK_ROWS)
                            ds[d0 + lo : d0 + hi] = src_ds[r0 + lo : r0 + hi]
                else:
                    layout = h5py.VirtualLayout(shape=(n, *shape), dtype=dtype)
                    for s, r0, d0, k in runs:
                        src_ds = sources[s].cache._file()[key]
                        rel = os.path.relpath(sources[s].path, out.parent)
                        vsrc = h5py.VirtualSource(rel, key, shape=src_ds.shape, dtype=dtype)
                        layout[d0 : d0 + k] = vsrc[r0 : r0 + k]
                    # a missing source reads as NaN, never as plausible zeros (FeatureCache also checks)
                    f.create_virtual_dataset(key, layout, fillvalue=np.nan)
            f.create_dataset("labels", data=labels)
            f.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=_str_dtype())
            f.create_dataset("skipped", data=np.asarray(skipped, dtype=object).reshape(-1, 2), dtype=_str_dtype())
            for k, v in first._file().attrs.items():
                f.attrs[k] = v
            f.attrs["classes"] = json.dumps(classes)
            f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------ distributed finetune
#
# `rt finetune` under torchrun is DistributedDataParallel with these rules (docs/scaling.md):
# * --batch-size is the *global* batch; each rank takes an equal slice of every global batch, drawn from the
#   same permutation a single process would use (the run's checkpointed generator). So a W-process run takes
#   the same optimiser steps as a 1-process one, and a checkpoint resumes with any number of processes.
# * every rank holds the whole model; DDP averages gradients; the loss is weighted so that the average is the
#   global batch mean even when ranks hold different numbers of rows (a short last batch, a skipped image).
# * frozen stages stay plain BatchNorm in eval mode (nothing to sync); with --sync-bn (CUDA only: PyTorch's
#   SyncBatchNorm has no CPU kernel) the BatchNorm layers of the stages that train become SyncBatchNorm.
# * only rank 0 writes checkpoints, reports, plots and the model directory.


def setup_training(device_option: str) -> DistEnv:
    """Join the process group (torchrun only) and keep ranks other than 0 quiet but for warnings."""
    from .runtime import resolve_device

    env = dist_env()
    if not env.active:
        return env
    init(resolve_device(device_option))
    if not env.is_main and not isinstance(get_reporter(), RankReporter):
        set_reporter(RankReporter(get_reporter(), env.rank))
    return env


class DistributedBatchSampler:
    """This rank's slice of each global batch of ``sampler``'s order (``np.array_split`` of the batch into
    ``world_size`` parts). ``sampler`` is the one a single process would use (``RandomSampler`` with the run's
    generator, or ``SequentialSampler``), consumed whole, so the random draws match a 1-process run."""

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool, rank: int, world_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        for b in range(len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [int(i) for i in np.array_split(np.asarray(batch, dtype=np.int64), self.world_size)[self.rank]]


def loader_args(dataset: Any, batch_size: int, shuffle: bool, generator: Any, drop_last: bool) -> dict[str, Any]:
    """DataLoader arguments: the plain ones for a single process; under torchrun a
    :class:`DistributedBatchSampler` over what the plain ones would sample."""
    from torch.utils.data import RandomSampler, SequentialSampler

    env = dist_env()
    if not env.active:
        return {"batch_size": batch_size, "shuffle": shuffle, "generator": generator, "drop_last": drop_last}
    sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return {
        "batch_sampler": DistributedBatchSampler(sampler, batch_size, drop_last, env.rank, env.world_size),
        "generator": generator,
    }


def rank_part(index: Any) -> Any:
    """This rank's slice of one global batch of row indices (a tensor); the whole batch for one process."""
    import torch

    env = dist_env()
    if not env.active:
        return index
    return torch.tensor_split(index, env.world_size)[env.rank]


def all_reduce_sums(*values: float) -> tuple[float, ...]:
    """Sums of ``values`` over all ranks (float64); unchanged for a single process."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tuple(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return tuple(float(v) for v in t.tolist())


class TrainForward:
    """The training forward pass of ``module`` (the finetune ``Classifier``): the module itself for one
    process; under torchrun the module through ``DistributedDataParallel``, rebuilt whenever the set of
    trainable parameters changes (a stage unfrozen), since DDP fixes that set when it is built."""

    def __init__(self, module: Any, device: Any, batch_size: int) -> None:
        self.env = dist_env()
        self.module = module
        self.device = device
        self._module = module if self.env.active else None
        self._ddp: Any = None
        self._key: tuple[bool, ...] | None = None
        if self.env.active and batch_size % self.env.world_size:
            raise UsageError(
                f"--batch-size {batch_size} is the global batch and must be a multiple of the "
                f"{self.env.world_size} processes",
                f"use e.g. --batch-size {batch_size - batch_size % self.env.world_size or self.env.world_size}",
            )

    def __call__(self, x: Any) -> Any:
        if self._module is None:
            return self.module(x)
        key = tuple(p.requires_grad for p in self._module.parameters())
        if key != self._key:
            from torch.nn.parallel import DistributedDataParallel

            self._ddp = None  # the old wrapper's hooks go with it
            ids = None
            if self.device.type == "cuda":
                import torch

                ids = [torch.cuda.current_device()]  # init() made LOCAL_RANK's GPU the current one
            self._ddp = DistributedDataParallel(self._module, device_ids=ids)
            self._key = key
        return self._ddp(x)

    def loss_weight(self, n_local: int) -> float:
        """Factor on this rank's mean loss so that DDP's gradient average is the global batch mean:
        ``world_size * n_local / n_global`` (1.0 for one process)."""
        if self._module is None:
            return 1.0
        (total,) = all_reduce_sums(float(n_local))
        return self.env.world_size * n_local / max(total, 1.0)


def convert_sync_batchnorm(policy: Any, net: Any, device: Any) -> int:
    """Turn the BatchNorm layers of the parts ``policy`` trains into SyncBatchNorm (frozen parts keep plain
    BatchNorm in eval mode). Returns how many were converted. CUDA under torchrun only."""
    env = dist_env()
    if not env.active:
        get_reporter().warn("--sync-bn does nothing in a single process (it syncs BatchNorm across torchrun ranks)")
        return 0
    if device.type != "cuda":
        raise UsageError(
            "--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation",
            "drop --sync-bn on CPUs (each rank then normalises with its own slice of the batch)",
        )
    from torch import nn

    try:
        from timm.layers import convert_sync_batchnorm as convert  # keeps timm's BatchNormAct2d activation
    except ImportError:  # pragma: no cover - older timm
        convert = nn.SyncBatchNorm.convert_sync_batchnorm
    parents = {id(m): (parent, name) for parent in net.modules() for name, m in parent.named_children()}
    count = 0
    for plan in policy.trained:
        for i, m in enumerate(plan.modules):
            before = sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
            new = convert(m)
            count += before
            if new is not m:  # a BatchNorm listed directly (e.g. the stem's bn1): swap it everywhere
                plan.modules[i] = new
                if id(m) in parents:
                    parent, name = parents[id(m)]
                    setattr(parent, name, new)
    return count
