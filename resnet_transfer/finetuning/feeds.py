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
from pathlib import Path
from typing import Any

import numpy as np

from ..base import DataError, UsageError, get_reporter, loader_args, rank_part
from ..images import stratified_split


class Feed:
    kind: str
    input_shape: tuple[int, ...]  # one training input (3, S, S) or a map (C, H, W)
    skipped: dict[str, str]  # unreadable images (path -> reason); always empty for cached maps
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

    def to_input(self, x: Any, device: Any) -> Any:
        """A batch as the feed yields it -> the model's input on ``device`` (channels-last)."""
        import torch

        return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def keep_decoded_bytes() -> int:
    """How much decoded training images the image feed keeps in memory between epochs: a tenth of the RAM,
    at most 2 GiB (``RT_KEEP_DECODED_MB`` overrides; 0 turns it off). Measured: the feed's decode was most of
    what an epoch adds to the bare train step on 2 vCPUs (docs/performance.md)."""
    import os

    given = os.environ.get("RT_KEEP_DECODED_MB")
    if given is not None:
        return max(0, int(float(given) * (1 << 20)))
    from ..base import total_ram_bytes

    return int(min(2 << 30, total_ram_bytes() // 10))


class ImageFeed(Feed):
    """Batches from image files: augmented for training, eval transform for validation."""

    def __init__(self, images: Any, train_idx: np.ndarray, val_images: Any, cfg: Any, tcfg: Any, device: Any):
        from ..base import train_workers
        from ..images import ImageDataset, eval_transform_uint8, train_transform_uint8

        self.kind = "images"
        self.tcfg = tcfg
        self.input_size = int(tcfg.input_size)
        self.train_list = images.subset(train_idx.tolist())
        self.val_list = val_images
        self.workers = train_workers(device) if cfg.workers is None else cfg.workers
        self.batch_size = cfg.batch_size
        self.device = device
        self.train_ds = ImageDataset(
            self.train_list,
            train_transform_uint8(tcfg, cfg.color_jitter, cfg.crop_scale, cfg.hflip),  # normalised per batch
            tcfg.draft_target(),
            keep_decoded=keep_decoded_bytes() if self.workers == 0 else 0,  # decode threads share the memory
        )
        val_ok = val_images is not None and len(val_images)
        self.val_ds = ImageDataset(val_images, eval_transform_uint8(tcfg), tcfg.draft_target()) if val_ok else None
        self.drop_last = len(self.train_list) > cfg.batch_size
        self.strict = bool(getattr(cfg, "strict", False))
        self.root = Path(images.root)
        self.skipped: dict[str, str] = {}  # path (as listed) -> why it could not be read

    @property
    def n_train(self) -> int:
        return len(self.train_list)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One training input: (3, S, S)."""
        return (3, self.input_size, self.input_size)

    @property
    def n_val(self) -> int:
        return len(self.val_list) if self.val_ds is not None else 0

    def to_input(self, x: Any, device: Any) -> Any:
        """A ``uint8`` batch -> normalised float on ``device``, channels-last: one op per batch (a quarter
        of the bytes to copy to a GPU) instead of a float conversion and a normalisation per image."""
        import torch

        from ..images import normalize_batch

        return normalize_batch(x.to(device, non_blocking=True), self.tcfg, torch.channels_last)

    def _loader(self, ds: Any, shuffle: bool, generator: Any = None, drop_last: bool = False) -> Any:
        import torch

        from ..images import collate

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
                if e:
                    self._skip(ds.images.paths[i], e)
            if xs is None:
                continue
            y = torch.tensor([ds.images.labels[i] for i, e in zip(idx, errors) if not e], dtype=torch.long)
            yield xs, y

    def _skip(self, path: str, reason: str) -> None:
        """An unreadable image: with ``--strict`` the run fails; otherwise it is left out, warned about
        once, and listed in report.json."""
        if self.strict:
            raise DataError(f"{self.root / path}: {reason}", "fix or remove the file, or drop --strict")
        if path not in self.skipped:
            self.skipped[path] = reason
            get_reporter().warn(f"{path}: {reason} (skipped)")

    def train_batches(self, generator: Any) -> Any:
        loader = self._loader(self.train_ds, True, generator, self.drop_last)
        if self.workers == 0:  # decode the next batch in threads while this one trains (prefetch.py)
            from ..base import decode_threads
            from .prefetch import decoded_ahead

            return self._batches(self.train_ds, decoded_ahead(self.train_ds, loader.batch_sampler, decode_threads()))
        return self._batches(self.train_ds, loader)

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
        self.skipped = {}
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

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One training input: a map at the cut, (C, H, W)."""
        return tuple(int(d) for d in self.train.cache.stages[self.cut])

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
    split: dict[str, Any] | None = None  # the split used, by content key (split.json); None without keys


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
    from ..images import list_images

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
    keys = _keys(images)
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
        val_keys = _keys(val_list)
    else:
        train_idx, val_idx = split_rows(keys, labels, cfg)
        val_list = images.subset(val_idx.tolist())
        val_keys = [keys[i] for i in val_idx]
    if len(train_idx) == 0:
        raise DataError(f"--data {cfg.data}: no labelled images to train on", "put images in class folders")
    feed = ImageFeed(images, train_idx, val_list, cfg, backbone.transform, device)
    split = _record(cfg, [keys[i] for i in train_idx], val_keys)
    return Feeding(feed, classes, _median_per_class(labels, len(classes)), None, split)


def _label_map(have: Sequence[str], want: Sequence[str]) -> np.ndarray:
    """Index in ``want`` of each class in ``have`` (a cache's class order -> the head's)."""
    return np.asarray([list(want).index(c) for c in have] or [0], dtype=np.int64)


def _map_feed(cfg: Any, backbone: Any, classes: list[str] | None) -> Feeding:
    from ..base import CacheError
    from ..cache import FeatureCache

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
        keys = list(cache.keys) if hasattr(cache, "keys") else None  # content-keyed caches (issue 13)
        train_rows, val_rows = split_rows(keys, labels, cfg)
        if len(val_rows):
            val = MapFeed._Rows(cache, cut, val_rows, label_map)
    feed = MapFeed(cache, cut, train_rows, label_map, cfg.batch_size, val)
    split = None
    if cfg.val is None and keys is not None:
        split = _record(cfg, [keys[i] for i in train_rows], [keys[i] for i in val_rows])
    return Feeding(feed, classes, _median_per_class(labels, len(classes)), cut, split)


# ---------------------------------------------------------------------------------- the recorded split


def split_rows(keys: Sequence[str | None] | None, labels: np.ndarray, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` rows: the starting head's recorded split (``split.json``) where it has one and the
    rows have content keys, else the seeded stratified split of :func:`data.stratified_split`."""
    from ..head import read_split

    record = read_split(cfg.head) if cfg.head is not None else None
    if record is None:
        return stratified_split(labels, cfg.val_fraction, cfg.seed)
    if keys is None:
        get_reporter().warn(
            f"{cfg.head} recorded its train/validation split by content key, but {cfg.cache} has no keys "
            "(an older cache layout): the data are split anew, so validation may include images the head "
            "was trained on; re-extract the cache to keep the head's split"
        )
        return stratified_split(labels, cfg.val_fraction, cfg.seed)
    return keep_recorded_split(keys, labels, record, cfg.val_fraction, cfg.seed)


def keep_recorded_split(
    keys: Sequence[str | None], labels: Sequence[int], record: dict[str, Any], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` row indices that keep a recorded split: a row whose key the head trained on goes to
    train (never to validation), one it validated on to val; only rows the head never saw (added since,
    or skipped then) are split anew, stratified and seeded (``fraction``, ``seed``). Unlabelled rows
    (label < 0) are in neither."""
    y = np.asarray(labels)
    train_keys, val_keys = set(record["train"]), set(record["val"])
    was_train = np.asarray([k is not None and k in train_keys for k in keys], dtype=bool)
    was_val = np.asarray([k is not None and k in val_keys for k in keys], dtype=bool) & ~was_train
    labelled = y >= 0
    new = labelled & ~was_train & ~was_val
    new_tr, new_va = stratified_split(np.where(new, y, -1), fraction, seed)
    train = np.union1d(np.flatnonzero(labelled & was_train), new_tr).astype(np.int64)
    val = np.union1d(np.flatnonzero(labelled & was_val), new_va).astype(np.int64)
    kept = int((labelled & (was_train | was_val)).sum())
    get_reporter().info(
        f"kept the head's recorded split for {kept} image(s) ({int((labelled & was_train).sum())} train, "
        f"{int((labelled & was_val).sum())} val); {int(new.sum())} new one(s) split anew ({len(new_va)} to val)"
    )
    return train, val


def _keys(images: Any) -> list[str | None]:
    """Content keys (:meth:`ImageList.digest`: a file's or a member's bytes) of listed images; ``None`` for
    an image that cannot be read (it is skipped when decoded)."""
    keys: list[str | None] = []
    for i in range(len(images)):
        try:
            keys.append(images.digest(i))
        except OSError:
            keys.append(None)
    return keys


def _record(cfg: Any, train: list[str | None], val: list[str | None]) -> dict[str, Any]:
    return {
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "train": [k for k in train if k is not None],
        "val": [k for k in val if k is not None],
    }
