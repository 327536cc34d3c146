"""Augmented views of the training images for `rt fit-head --views K`.

The probe is the start of every finetune, and fastai trains its head through augmented images. This is the
cached-feature version of that: for each image on the *training* side of the split, ``K`` random-resized
crops (area ``VIEW_CROP_SCALE``-1, flips unless ``--no-hflip``) go once through the cache's own backbone
(rebuilt from its identity, its weights file checked), and the head is fitted on the eval crops the cache
holds plus these views. Validation rows stay eval crops of the validation images only, so no view of a
validation image is trained on and L2 is chosen on held-out images. The head's kind (``--head auto``) is
chosen on the eval crops before the views are added, because cross-validation over rows would put views of
one image on both sides of a fold.

Measured on the transfer suite (docs/transfer.md, "Several augmented views"), the linear probe with 8
views: area 0.35-1 (finetune's crop) +0.021 ± 0.023 test accuracy over 24 task-seeds but a loss on the
digit task; area 0.8-1 +0.018 ± 0.013, no task behind in the mean: hence 0.8. Each view costs one forward,
so ``K`` views cost ``K`` extracts of the training images.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..base import DataError, RtError, UsageError, get_reporter

VIEW_CROP_SCALE = 0.8  # the smallest crop's area fraction (milder than finetune's 0.35: see the module doc)
VIEW_BATCH = 64


DEFAULT_VIEWS: int | str = "auto"  # rt fit-head's --views (docs/transfer.md: the suite with and without)
AUTO_VIEWS = 8  # --views auto: views per training image, at most
AUTO_MAX_IMAGES = 1000  # --views auto adds none above this many training images (the gain shrinks with data)
AUTO_BUDGET_S = 30.0  # --views auto: fewer views per image where 8 would take longer than this (timed first)


def parse_views(views: int | str) -> int | str:
    """``--views``: ``auto`` or a count >= 0 (a :class:`UsageError` otherwise)."""
    text = str(views).strip().lower()
    if text == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise UsageError(f"--views {views!r} is not a number of views", "use --views auto, 0 (none) or e.g. 8")
    return n


def add_views(
    cfg: Any, cache: Any, split: Any, selection: Any, X: np.ndarray | None, budget: float
) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, Any] | None]:
    """`rt fit-head --views K|auto`: the training matrix ``X`` (``None``: not read yet) and labels with
    augmented views of each training image of ``split`` added, and what was done; ``(X, None, report)``
    where no views are added (the report says why). ``cfg``: the :class:`fitting.FitHeadConfig`;
    ``selection``: the feature choice, if one was made; ``budget``: bytes of features the fit may hold."""
    asked = parse_views(cfg.views)
    if not asked:
        return X, None, None
    auto, rows = asked == "auto", split.train_rows
    k = AUTO_VIEWS if auto else int(asked)
    chosen = selection[0].name if selection is not None else "final"
    why = ""
    if chosen != "final":
        why = f"the chosen features are {chosen}, and views are of the final ones"
    elif split.y_val is None:
        why = "no validation rows: L2 would be chosen on a split with views of one image on both sides"
    elif auto and len(rows) > AUTO_MAX_IMAGES:
        why = f"{len(rows)} training images: auto adds views below {AUTO_MAX_IMAGES} (where they pay)"
    elif len(rows) * (1 + k) * cache.dim * 4 * 1.5 > budget:
        why = f"{len(rows)} training images x {1 + k} rows exceed the memory budget (--max-memory-gb)"
        if not auto:
            raise UsageError(f"--views {k}: {why}", "use fewer --views, raise --max-memory-gb, or drop --views")
    report: dict[str, Any] | None = None
    if not why:
        try:
            Xv, yv, report = view_features(
                cache, rows, k, cfg.seed, cfg.hflip, cfg.root, AUTO_BUDGET_S if auto else None
            )
        except RtError as exc:  # images or weights not here: auto fits as before, an explicit K says why
            if not auto:
                raise
            why = exc.message
    if why or report is None or not report["views"]:
        why = why or (report or {}).get("why_not", "")
        (get_reporter().info if auto else get_reporter().warn)(
            f"--views {asked}: {why}; fitting on the eval crops only"
        )
        return X, None, {"views": 0, "asked": asked, "why_not": why}
    X = cache.features(rows) if X is None else X
    report["asked"] = asked
    return np.concatenate([X, Xv]), np.concatenate([cache.labels[rows], yv]), report


def view_features(
    cache: Any, rows: np.ndarray, views: int, seed: int, hflip: bool = True, root: Any = None,
    budget_s: float | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:  # fmt: skip
    """``(X, y, report)``: the final pooled features of ``views`` augmented crops of each image of
    ``cache``'s ``rows`` (row-major: row 0's views first), their labels, and what was done. The crops are
    seeded by ``seed``; the global torch RNG is left as it was. ``budget_s``: time one batch first and take
    fewer views per image where ``views`` would take longer (none, and an empty ``X``, below one)."""
    import torch

    from ..images import train_transform_uint8

    if views < 1:
        raise UsageError(f"--views {views}: give 1 or more views per image, or leave it out")
    t0 = time.perf_counter()
    src = _Source(cache, rows, root)
    timed = None
    if budget_s is not None:
        timed = src.seconds_per_view(views, seed, hflip)
        views = min(views, int(budget_s / max(timed * len(rows), 1e-9)))
        if views < 1:
            why = f"one view of each of {len(rows)} images would take ~{timed * len(rows):.0f} s (> {budget_s:g} s)"
            return np.zeros((0, cache.dim), np.float32), np.zeros(0, np.int64), {"views": 0, "why_not": why}
    out: list[np.ndarray] = []
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        aug = train_transform_uint8(src.tcfg, 0.0, VIEW_CROP_SCALE, hflip)
        crops: list[Any] = []
        with get_reporter().progress("views", total=len(rows) * views, unit="view") as bar:
            for i in range(len(rows)):
                img = src.image(i)
                crops += [aug(img) for _ in range(views)]
                while len(crops) >= VIEW_BATCH or (crops and i == len(rows) - 1):
                    out.append(src.forward(crops[:VIEW_BATCH]))
                    bar.advance(len(crops[:VIEW_BATCH]))
                    crops = crops[VIEW_BATCH:]
    X = np.concatenate(out).astype(np.float32)
    y = np.repeat(np.asarray(cache.labels[rows]), views)
    seconds = time.perf_counter() - t0
    get_reporter().info(f"{views} augmented view(s) of {len(rows)} training image(s): {len(X)} rows in {seconds:.1f} s")
    report = {
        "views": views,
        "images": len(rows),
        "rows": len(X),
        "crop_scale": VIEW_CROP_SCALE,
        "hflip": hflip,
        "seed": seed,
        "precision": src.precision,
        "seconds": round(seconds, 3),
        "timed_ms_per_view": None if timed is None else round(timed * 1000, 3),
        "budget_s": budget_s,
        "images_from": str(src.folder),
        "head_kind_chosen_on": "the eval crops (views added for the final fit)",
    }
    return X, y, report


class _Source:
    """The cache's training images (found as the tools find them) and its backbone, rebuilt."""

    def __init__(self, cache: Any, rows: np.ndarray, root: Any) -> None:
        import torch

        from ..backbone import backbone_from_identity
        from ..base import resolve_device
        from ..images import image_root

        self.paths = [str(cache.paths[int(r)]) for r in rows]
        self.keys = [str(cache.keys[int(r)]) for r in rows]  # content keys: a changed image is noticed
        self.cache_path = cache.path
        where = image_root(cache, root)
        if where.folder is None or not where.found:
            raise DataError(
                where.missing(f"--views ({cache.path})")
                if where.folder is None
                else f"--views: the images of {cache.path} are not in {where.folder} ({where.how})",
                "pass --root (the --data folder the cache was extracted from), or drop --views",
            )
        self.folder, self.files = where.folder, where.resolve(self.paths)
        with torch.random.fork_rng(devices=[]):  # building the backbone seeds torch: the caller's RNG stays
            bb = backbone_from_identity(cache.identity)
        self.device = resolve_device("auto")
        self.net = bb.net.to(self.device).eval().to(memory_format=torch.channels_last)
        self.tcfg = bb.identity.transform
        precision = str(getattr(cache, "precision", "fp32") or "fp32")
        self.precision = precision if precision in ("bf16", "fp16") else "fp32"  # int8 caches: views in fp32

    def image(self, i: int) -> np.ndarray:
        """Training image ``i``, decoded; a :class:`DataError` if it cannot be read or is no longer the
        image the cache holds the eval crop of (its content key differs)."""
        from ..base import file_digest
        from ..images import load_image

        f = self.files[i]
        try:
            key = f.reader.digest(f.name) if hasattr(f, "reader") else file_digest(f)
            img = np.array(load_image(f, draft=self.tcfg.draft_target()), dtype=np.uint8)
        except Exception as exc:
            raise DataError(
                f"--views: {self.paths[i]} in {self.folder}: {exc}", "fix or remove the image, or drop --views"
            ) from exc
        if key != self.keys[i]:  # (a cache written without contents has path keys: no views, said why)
            raise DataError(
                f"--views: {self.paths[i]} in {self.folder} has changed since `rt extract` wrote {self.cache_path}",
                "run the same `rt extract` again (it recomputes only what changed), then fit the head",
            )
        return img

    def forward(self, crops: list[Any]) -> np.ndarray:
        return _forward(self.net, crops, self.tcfg, self.device, self.precision)

    def seconds_per_view(self, views: int, seed: int, hflip: bool) -> float:
        """Decode, crop and forward of one batch of views of the first images, timed (its own RNG)."""
        import torch

        from ..images import train_transform_uint8

        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            aug = train_transform_uint8(self.tcfg, 0.0, VIEW_CROP_SCALE, hflip)
            self.forward([aug(self.image(0))])  # the first call pays one-off set-up: not timed
            t, crops = time.perf_counter(), []
            for i in range(min(len(self.files), -(-VIEW_BATCH // views))):
                img = self.image(i)
                crops += [aug(img) for _ in range(views)]
            self.forward(crops[:VIEW_BATCH])
            return (time.perf_counter() - t) / max(1, len(crops[:VIEW_BATCH]))


def _forward(net: Any, crops: list[Any], tcfg: Any, device: Any, precision: str) -> np.ndarray:
    import torch

    from ..base import autocast
    from ..images import collate, normalize_batch

    x, _, _ = collate([(c, i, "") for i, c in enumerate(crops)])
    x = normalize_batch(x.to(device), tcfg, torch.channels_last)
    with autocast(device, precision):
        return net(x).float().cpu().numpy()
