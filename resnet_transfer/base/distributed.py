"""Running under ``torchrun``: process-group set-up, rank helpers, the batch sampler and the DDP wrap.

Nothing here launches processes: ``torchrun`` (PyTorch's own launcher) does, and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` for every worker. :func:`launched` reads those; :func:`init` joins the
process group (gloo on CPUs; gloo for CPU tensors plus NCCL for CUDA tensors on GPUs). A single process
(no torchrun, or ``--nproc-per-node 1``) never touches ``torch.distributed``.

These are primitives only: this module imports nothing of the package above errors, report and runtime.
The sharded `rt extract` built on them lives in :mod:`resnet_transfer.extract`.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from .errors import RtError, UsageError
from .report import Reporter, get_reporter, set_reporter

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
        atexit.register(_leave)
    return env


def _leave() -> None:
    """Leave the process group before the interpreter exits: left to the destructors, gloo's threads are
    torn down still running, and a rank that finished early (e.g. `rt extract` with nothing to compute)
    aborted with "terminate called without an active exception" in 3 of 6 runs of a test."""
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


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
