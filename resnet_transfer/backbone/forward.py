"""The batched forward over images, written once: a backbone and an image list in, batches of pooled
features (and, if asked, stage maps) out, with the files that could not be read.

`rt predict` / `rt evaluate` run it and put the head on top; `rt extract` stores what it yields. One call::

    for b in forward_images(backbone, images, batch_size=32, device=dev, precision="bf16"):
        b.features        # (len(b.ok), D) float32 on dev; (len(b.ok), views, D) with a TTA view
        b.maps["layer3"]  # (len(b.ok), C, H, W) float32, for each name in ``maps``
        b.skipped         # [(index into images, reason), ...]

Inference mode, channels-last input, autocast at ``precision`` (as extract always ran); the input batches
come from :func:`data.normalized_batches` (decode threads one batch ahead, or worker processes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..images import VIEWS


@dataclass
class ForwardBatch:
    """One batch: ``indices`` (into the image list, readable or not), ``ok`` (those with features, in order),
    ``features`` and ``maps`` of the ``ok`` images (None / empty when none was readable), ``skipped``."""

    indices: list[int]
    ok: list[int]
    features: Any = None
    maps: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[int, str]] = field(default_factory=list)


def forward_images(
    backbone: Any,
    images: Any,
    *,
    batch_size: int = 32,
    device: Any = "cpu",
    precision: str = "fp32",
    view: str | None = None,
    maps: Sequence[str] = (),
    pooled: Callable[[Any], Any] | None = None,
    workers: int = 0,
    max_pixels: int | None = None,
    compile: str = "off",
    calibration: Sequence[str] | None = None,
    early: Any = None,
) -> Iterator[ForwardBatch]:
    """Run ``backbone`` (a :class:`backbones.Backbone`) over ``images`` (an :class:`data.ImageList`) in its
    eval transform, ``batch_size`` images per forward pass.

    ``view``: ``None`` (the eval crop), ``flip`` or ``tencrop`` (features per view). ``maps``: stage names whose
    outputs to return too (forward hooks). ``pooled``: the function from a normalised batch to the features
    (default ``backbone.net``; e.g. a classifier's ``pooled`` for a head on several stages). ``workers`` > 0
    decodes in DataLoader processes instead of threads. ``device`` is a ``torch.device``, or a name.
    ``compile``: ``auto`` | ``on`` | ``off``, the backbone's forward compiled by inductor
    (:func:`compiled.compiled_forward`; a custom ``pooled`` stays eager). ``precision`` ``int8`` (or
    ``int8@<digest>``) runs :class:`quantized.Int8Forward`, calibrated on the image paths ``calibration``
    (default: its fixed photo crops). ``early``: crops decoded before the model was ready
    (:func:`images.early_crops`), for the feed to take."""
    import torch

    from ..base import autocast, precision_kind
    from ..images import normalized_batches
    from .compiled import compiled_forward

    int8 = precision_kind(precision) == "int8"
    if int8:
        from .quantized import Int8Forward, require_pooled_only

        require_pooled_only(pooled is not None or bool(maps))
    dev = torch.device(device) if isinstance(device, str) else device
    net = backbone.net.to(dev).eval().to(memory_format=torch.channels_last)
    fn = pooled or net
    views = VIEWS[view]
    captured: dict[str, Any] = {}
    hooks = [net.get_submodule(name).register_forward_hook(_capture(captured, name)) for name in maps]
    per_batch = max(1, batch_size // views)
    if int8:  # the quantized graph (quantized.py)
        fn = Int8Forward(net, backbone.transform, dev, calibration, model=backbone.identity.arch)
    elif pooled is None:  # autocast inside; compiled when ``compile`` says so and it repays
        ident = backbone.identity
        fn = compiled_forward(net, dev, precision, compile, len(images) * views, ident.to_json(), ident.arch)
    batches = normalized_batches(
        images, backbone.transform, per_batch, dev, view=view, workers=workers, max_pixels=max_pixels, early=early
    )
    try:
        with torch.inference_mode():
            for xs, idx, errors in batches:
                out = ForwardBatch(list(idx), [i for i, e in zip(idx, errors) if not e])
                out.skipped = [(i, e) for i, e in zip(idx, errors) if e]
                if xs is not None:
                    with autocast(dev, precision):
                        feats = fn(xs)
                    feats = feats.float()
                    out.features = feats.reshape(len(out.ok), views, -1) if view else feats
                    out.maps = {n: captured[n].float() for n in maps}
                yield out
    finally:
        for h in hooks:
            h.remove()
        batches.close()
        if hasattr(fn, "finish"):  # record the speeds measured on this host (speed_records)
            fn.finish()


def _capture(store: dict[str, Any], name: str) -> Any:
    def hook(_module: Any, _inp: Any, output: Any) -> None:
        store[name] = output

    return hook
