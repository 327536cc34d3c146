"""The two feeds of `rt finetune`: image files, or cached stage maps; and the data set-up behind them.

:func:`build_feed` reads the training data named in the config (an image folder / manifest, or a cache with
``stages/<cut>`` maps from ``rt extract --cut``), checks its classes against the starting head's, splits it
(or reads ``--val``) and returns a :class:`Feed`: ``train_batches(generator)`` yields augmented batches in
the order the run's generator draws, ``val_batches()`` the validation ones, ``steps_per_epoch()`` how many
optimiser steps an epoch takes. Under torchrun each rank gets its slice of every global batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import stratified_split
from .distributed import loader_args, rank_part
from .errors import DataError, UsageError
from .report import get_reporter


class Feed:
    kind: str
    """What both feeds share: the number of optimiser steps in an epoch (a final partial batch is dropped
    when there is more than one batch)."""

    batch_size: int
    drop_last: bool

    @property
    def n_train(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        n = self.n_train
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class ImageFeed(Feed):
    """Batches from image files: augmented for training, eval transform for validation."""

    def __init__(self, images: Any, train_idx: np.ndarray, val_images: Any, cfg: Any, tcfg: Any, device: Any):
        from .data import ImageDataset, train_transform
        from .data import eval_transform as make_eval
        from .runtime import train_workers

        self.kind = "images"
        self.train_list = images.subset(train_idx.tolist())
        self.val_list = val_images
        self.workers = train_workers(device) if cfg.workers is None else cfg.workers
        self.batch_size = cfg.batch_size
        self.device = device
        self.train_ds = ImageDataset(
            self.train_list, train_transform(tcfg, cfg.color_jitter, cfg.crop_scale, cfg.hflip), tcfg.draft_target()
        )
        val_ok = val_images is not None and len(val_images)
        self.val_ds = ImageDataset(val_images, make_eval(tcfg), tcfg.draft_target()) if val_ok else None
        self.drop_last = len(self.train_list) > cfg.batch_size
        self.skipped: set[str] = set()

    @property
    def n_train(self) -> int:
        return len(self.train_list)

    @property
    def n_val(self) -> int:
        return len(self.val_list) if self.val_ds is not None else 0

    def _loader(self, ds: Any, shuffle: bool, generator: Any = None, drop_last: bool = False) -> Any:
        import torch

        from .data import collate

        return torch.utils.data.DataLoader(
            ds,
            **loader_args(ds, self.batch_size, shuffle, generator, drop_last),  # torchrun: this rank's slices
            num_workers=self.workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )

    def _batches(self, ds: Any, loader: Any) -> Any:
        import torch

        for xs, idx, errors in loader:
            for i, e in zip(idx, errors):
                if e and ds.images.paths[i] not in self.skipped:
                    self.skipped.add(ds.images.paths[i])
                    get_reporter().warn(f"{ds.images.paths[i]}: {e} (skipped)")
            if xs is None:
                continue
            y = torch.tensor([ds.images.labels[i] for i, e in zip(idx, errors) if not e], dtype=torch.long)
            yield xs, y

    def train_batches(self, generator: Any) -> Any:
        return self._batches(self.train_ds, self._loader(self.train_ds, True, generator, self.drop_last))

    def val_batches(self) -> Any:
        if self.val_ds is None:
            return iter(())
        return self._batches(self.val_ds, self._loader(self.val_ds, False))


class MapFeed(Feed):
    """Batches of cached stage maps (no pixel augmentation: the maps were computed once, centre-cropped)."""

    MAX_PRELOAD_BYTES = 4 << 30

    def __init__(
        self,
        cache: Any,
        cut: str,
        train_rows: np.ndarray,
        label_map: np.ndarray,
        batch_size: int,
        val: MapFeed._Rows | None = None,
    ):
        self.kind = "maps"
        self.cut = cut
        self.batch_size = batch_size
        self.train = self._Rows(cache, cut, train_rows, label_map)
        self.val = val
        self.drop_last = len(train_rows) > batch_size

    class _Rows:
        def __init__(self, cache: Any, cut: str, rows: np.ndarray, label_map: np.ndarray | None):
            import torch

            self.cache, self.cut, self.rows = cache, cut, np.asarray(rows, dtype=np.int64)
            labels = cache.labels[self.rows]
            self.labels = torch.as_tensor(label_map[labels] if label_map is not None else labels, dtype=torch.long)
            shape = cache.stages[cut]
            nbytes = len(self.rows) * int(np.prod(shape)) * 2
            self.maps = None
            if nbytes <= MapFeed.MAX_PRELOAD_BYTES:  # float16 in memory: one read, then pure compute
                self.maps = torch.from_numpy(cache.stage(cut, self.rows).astype(np.float16))

        def __len__(self) -> int:
            return len(self.rows)

        def get(self, pos: Any) -> tuple[Any, Any]:
            import torch

            if self.maps is not None:
                return self.maps[pos].float(), self.labels[pos]
            return torch.from_numpy(self.cache.stage(self.cut, self.rows[pos.numpy()])), self.labels[pos]

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_val(self) -> int:
        return len(self.val) if self.val is not None else 0

    def train_batches(self, generator: Any) -> Any:
        import torch

        perm = torch.randperm(self.n_train, generator=generator)
        for b in range(self.steps_per_epoch()):
            yield self.train.get(rank_part(perm[b * self.batch_size : (b + 1) * self.batch_size]))

    def val_batches(self) -> Any:
        import torch

        if self.val is None:
            return
        for lo in range(0, len(self.val), self.batch_size):
            yield self.val.get(rank_part(torch.arange(lo, min(lo + self.batch_size, len(self.val)))))


# ------------------------------------------------------------------------------------------------ set-up


@dataclass
class Feeding:
    """What :func:`build_feed` found: the feed, the class order (the head's, or the data's for a fresh
    head), the median labelled images per class (for ``--unfreeze auto``) and the cut of a map feed."""

    feed: ImageFeed | MapFeed
    classes: list[str]
    per_class: float
    cut: str | None = None


def build_feed(cfg: Any, backbone: Any, classes: list[str] | None, device: Any) -> Feeding:
    """The feed for ``cfg`` (a :class:`~resnet_transfer.finetune.FinetuneConfig`): maps from ``cfg.cache``,
    else images from ``cfg.data``. ``classes``: the starting head's class order (``None``: a fresh head)."""
    if cfg.cache is not None:
        return _map_feed(cfg, backbone, classes)
    if cfg.data is None:
        raise UsageError("no training data", "pass --data FOLDER (or CSV), or --cache FILE with --cut maps")
    return _image_feed(cfg, backbone, classes, device)


def class_check(have: Sequence[str], want: Sequence[str], what: str) -> None:
    """Refuse data whose classes differ from the head's (both ways), naming a few of each."""
    extra = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have))
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"not in the head: {', '.join(extra[:10])}")
        if missing:
            parts.append(f"missing from the data: {', '.join(missing[:10])}")
        raise DataError(
            f"{what} has other classes than the head ({'; '.join(parts)})",
            "finetune on data with the head's classes, or start without a head directory (a fresh head "
            "for these classes)",
        )


def _median_per_class(labels: np.ndarray, n_classes: int) -> float:
    return float(np.median(np.bincount(labels[labels >= 0], minlength=n_classes)))


def _image_feed(cfg: Any, backbone: Any, classes: list[str] | None, device: Any) -> Feeding:
    from .data import list_images

    rep = get_reporter()
    images = list_images(cfg.data)
    if classes is not None:
        class_check(images.classes, classes, f"--data {cfg.data}")
        images = list_images(cfg.data, classes=classes)
    for note in images.notes:
        rep.warn(note)
    classes = list(images.classes)
    labels = np.asarray(images.labels)
    if (labels < 0).any():
        rep.warn(f"{int((labels < 0).sum())} unlabelled image(s) in {cfg.data} are not used for training")
    if cfg.val is not None:
        val_list = list_images(cfg.val)
        extra = sorted(set(val_list.classes) - set(classes))
        if extra:
            raise DataError(
                f"--val {cfg.val} has classes the model does not: {', '.join(extra)}",
                "give a validation set with the training classes",
            )
        val_list = list_images(cfg.val, classes=classes)
        val_list = val_list.subset([i for i, y in enumerate(val_list.labels) if y >= 0])
        train_idx = np.flatnonzero(labels >= 0)
    else:
        train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.seed)
        val_list = images.subset(val_idx.tolist())
    if len(train_idx) == 0:
        raise DataError(f"--data {cfg.data}: no labelled images to train on", "put images in class folders")
    feed = ImageFeed(images, train_idx, val_list, cfg, backbone.transform, device)
    return Feeding(feed, classes, _median_per_class(labels, len(classes)))


def _label_map(have: Sequence[str], want: Sequence[str]) -> np.ndarray:
    """Index in ``want`` of each class in ``have`` (a cache's class order -> the head's)."""
    return np.asarray([list(want).index(c) for c in have] or [0], dtype=np.int64)


def _map_feed(cfg: Any, backbone: Any, classes: list[str] | None) -> Feeding:
    from .cache import FeatureCache
    from .errors import CacheError

    cache = FeatureCache(cfg.cache)
    cache.check_identity(backbone.identity, f"the head in {cfg.head}" if cfg.head else "this run")
    if not cache.stages:
        raise CacheError(
            f"--cache {cfg.cache} holds no stage maps, only pooled features",
            "re-extract with `rt extract ... --cut layer3` (or train the head alone with `rt fit-head`)",
        )
    if cfg.data is not None:
        get_reporter().warn(f"--data {cfg.data} is not read: training runs on the maps in {cfg.cache}")
    if classes is None:
        classes = list(cache.classes)
    present = [c for i, c in enumerate(cache.classes) if (cache.labels == i).any()]
    class_check(present, classes, f"--cache {cfg.cache}")
    label_map = _label_map(cache.classes, classes)
    labels = np.where(cache.labels >= 0, label_map[np.maximum(cache.labels, 0)], -1)
    # the deepest cut in the cache (every stage that trains lies after it)
    stages = backbone.stages
    if not all(s in stages for s in cache.stages):
        raise CacheError(
            f"--cache {cfg.cache}: its maps ({', '.join(cache.stages)}) are not stages of {backbone.identity.model}"
        )
    cut = sorted(cache.stages, key=stages.index)[-1]
    val = None
    if cfg.val is not None:
        vcache = FeatureCache(cfg.val)
        vcache.check_identity(backbone.identity, f"--cache {cfg.cache}")
        extra = sorted(set(vcache.classes) - set(classes))
        if extra:
            raise DataError(f"--val {cfg.val} has classes the model does not: {', '.join(extra)}")
        train_rows = np.flatnonzero(labels >= 0)
        val = MapFeed._Rows(vcache, cut, vcache.labelled, _label_map(vcache.classes, classes))
    else:
        train_rows, val_rows = stratified_split(labels, cfg.val_fraction, cfg.seed)
        if len(val_rows):
            val = MapFeed._Rows(cache, cut, val_rows, label_map)
    feed = MapFeed(cache, cut, train_rows, label_map, cfg.batch_size, val)
    return Feeding(feed, classes, _median_per_class(labels, len(classes)), cut)
