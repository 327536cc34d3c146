"""The probe as the start of a one-command finetune: `rt finetune --data DIR --model M --weights W` without a
head directory runs what `rt extract` + `rt fit-head` would (in this process, so it pays one start-up) and
starts from the head it fits, as the three-command workflow does. With ``--cache`` (a cache of stage maps: cached-stage
training) the head is fitted on that cache's pooled features, which it already holds.

The features go to ``OUT/start/features.h5`` (a cache like any other: an interrupted run resumes it, a second
run reads only headers) and the head to ``OUT/start/head`` (``--head auto``: the linear probe or fastai's MLP
head, whichever validates better; its split is the finetune's). Skipped, with the fresh head as before, for
``--fresh-head`` (or ``--hidden``: a fresh MLP), random weights (a probe on random features says nothing)
and torchrun jobs (one process would extract while the others wait).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..base import distributed, get_reporter
from .config import FinetuneConfig

START_DIR = "start"


def wants_probe_start(cfg: FinetuneConfig) -> bool:
    """True when the run has images but no head to start from, on pretrained weights, in one process."""
    if cfg.head is not None or (cfg.data is None and cfg.cache is None) or cfg.fresh_head or cfg.hidden:
        return False
    if cfg.cache is not None:
        from ..cache import FeatureCache

        with FeatureCache(cfg.cache) as c:
            random = str(c.identity.weights_id).startswith("random:")
    else:
        random = str(cfg.weights or "imagenet").lower() == "none"
    return not random and not distributed.launched()


def probe_start(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` starting from a probe fitted now under ``OUT/start`` (see the module docstring), or ``cfg``
    unchanged when :func:`wants_probe_start` says no."""
    if not wants_probe_start(cfg):
        return cfg
    start = Path(cfg.out) / START_DIR
    rep = get_reporter()
    rep.info(f"no head directory: fitting the probe to start from (extract + fit-head, in this process) in {start}")
    common = {
        "model": cfg.model or "resnet50",
        "weights": cfg.weights or "imagenet",
        "image_size": cfg.image_size,
        "device": cfg.device,
        "workers": cfg.workers,
        "strict": cfg.strict,
    }
    if cfg.cache is not None:  # cached-stage training: the cache holds the pooled features already
        cache, val_cache = Path(cfg.cache), Path(cfg.val) if cfg.val is not None else None
        _fit(cfg, cache, val_cache, start)
        return replace(cfg, head=start / "head")
    cache = start / "features.h5"
    _extract(cfg, Path(cfg.data), cache, common)  # type: ignore[arg-type]
    val_cache = None
    if cfg.val is not None:
        val_cache = start / "val.h5"
        _extract(cfg, Path(cfg.val), val_cache, common)
    _fit(cfg, cache, val_cache, start)
    return replace(cfg, head=start / "head", model=None, weights=None, image_size=None)


def _extract(cfg: FinetuneConfig, data: Path, out: Path, common: dict[str, Any]) -> None:
    """The cache ``out`` brought up to date with ``data`` (resumed, or only the changed images computed); one
    an earlier run in this --out made with another backbone is replaced under --overwrite."""
    from ..base import IdentityMismatch, UsageError
    from ..cache import ExtractConfig, extract

    try:
        extract(ExtractConfig(data=data, out=out, **common))
    except IdentityMismatch as exc:
        if not cfg.overwrite:
            raise UsageError(
                f"{out} holds the features of another backbone, from an earlier run in --out {cfg.out}",
                "pass --overwrite to replace them, or choose another --out",
            ) from exc
        get_reporter().info(f"{out}: another backbone's features (an earlier run): extracting anew (--overwrite)")
        extract(ExtractConfig(data=data, out=out, overwrite=True, **common))


def _fit(cfg: FinetuneConfig, cache: Path, val_cache: Path | None, start: Path) -> None:
    from ..head import FitHeadConfig, fit_head

    head = FitHeadConfig(
        cache=cache,
        out=start / "head",
        val=val_cache,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        overwrite=True,
        hflip=cfg.hflip,  # --views auto's crops flip as the finetune's
    )
    fit_head(head)
