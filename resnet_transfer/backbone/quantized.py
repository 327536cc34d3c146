"""The int8 forward for x86 CPUs: post-training static quantization (PT2E with torchao's
``X86InductorQuantizer``: int8 weights per channel, int8 activations per tensor), compiled by inductor.

``--precision int8`` in ``rt extract`` / ``rt predict`` runs the backbone through :class:`Int8Forward` in
place of the bf16 forward. The quantized network is a fixed function of the backbone and a calibration set,
never of the run's own images, so a row's features depend on its image only and an incremental
``rt extract`` adds rows that match the old ones. The default set is :data:`CALIBRATION_CROPS` crops, always
the same, of the photographs scikit-learn ships (natural photos: right for ImageNet-style backbones; the
cache records precision ``int8``). ``rt extract --calibration DIR`` calibrates on up to 64 of the user's own
images instead (right for a backbone trained on another domain; the cache records ``int8@<digest>`` of
those images' bytes, and a later run must give the same set). Rows of two precisions never mix.

The graph is exported once with a dynamic batch size (calibration runs all crops in one pass), then
compiled for the run's batch shape; a shorter last batch is padded to that shape, which costs less than a
recompile and keeps every row on the same kernels. Measured speed and accuracy: docs/performance.md
(``python -m benchmarks int8``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..base import UsageError, get_reporter
from .compiled import frozen_call
from .speed_records import StepTimer

SCHEME = "pt2e-x86-v1"  # the quantizer and calibration recipe: in the digest of a --calibration set, and logged
CALIBRATION_CROPS = 64


def require_torchao() -> None:
    """Raise a :class:`UsageError` saying how to install torchao when it is missing."""
    try:
        import torchao  # noqa: F401
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: F401
    except ImportError as e:
        raise UsageError(
            f"--precision int8 needs torchao's PT2E quantizer ({e})",
            "pip install 'resnet_transfer[int8]' (torchao >= 0.18), or use --precision bf16",
        ) from None


def calibration_batch(transform: Any, n: int = CALIBRATION_CROPS, seed: int = 0) -> torch.Tensor:
    """``n`` crops of scikit-learn's sample photographs at fixed places and scales, through ``transform``'s
    eval pipeline (resize, center crop, normalise), channels-last float32: the same tensor on every run
    (``seed`` 0 is the calibration set; another seed gives other crops, e.g. held-out ones to compare on)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from ..images import eval_transform_uint8, normalize_batch

    photos = [np.asarray(p, dtype=np.uint8) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    to_uint8 = eval_transform_uint8(transform)
    crops = []
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        s = int(min(h, w) * rng.uniform(0.25, 1.0))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        crops.append(to_uint8(Image.fromarray(p[y : y + s, x : x + s])))
    return normalize_batch(torch.stack(crops), transform, torch.channels_last)


def require_pooled_only(stages: bool) -> None:
    """Refuse int8 for a run that needs stage outputs (``--cut`` maps, ``--pool-stages``, a head on several
    stages): the quantized graph returns the pooled features only."""
    if stages:
        raise UsageError(
            "--precision int8 computes the backbone's pooled features only",
            "drop --cut / --pool-stages (or use a head on the final features), or use --precision bf16",
        )


def calibration_images(source: str | Path, n: int = CALIBRATION_CROPS) -> tuple[list[Any], str]:
    """``n`` images of a folder or CSV manifest (evenly spaced in path order: the same on every run) for
    :func:`calibration_from_images`, and the precision name a cache records for them: ``int8@<digest>``,
    where the digest covers the images' bytes and :data:`SCHEME` (rows quantized with another calibration
    set are other rows)."""
    import hashlib

    from ..base import DataError
    from ..images import list_images

    images = list_images(source)
    if not len(images):
        raise DataError(f"{source}: no images to calibrate on", "give --calibration a folder or manifest of images")
    rel = sorted(range(len(images)), key=lambda i: images.paths[i])  # by path: not where the folder is
    step = max(1, len(rel) // n)
    picked = rel[::step][:n]
    chosen = [images.file(i) for i in picked]  # files, or members of an archive / shards / a dataset
    h = hashlib.blake2b(digest_size=6)
    h.update(SCHEME.encode())
    for i in picked:
        h.update(images.digest(i).encode())
    return chosen, f"int8@{h.hexdigest()}"


def calibration_from_images(paths: Sequence[str], transform: Any) -> torch.Tensor:
    """The images at ``paths`` through ``transform``'s eval pipeline, channels-last float32 (unreadable
    ones are left out; at least one must read)."""
    from ..base import DataError
    from ..images import ImageDecodeError, eval_transform_uint8, load_image, normalize_batch

    to_uint8 = eval_transform_uint8(transform)
    crops = []
    for p in paths:
        try:
            crops.append(to_uint8(load_image(p, draft=transform.draft_target())))
        except ImageDecodeError:
            continue
    if not crops:
        raise DataError(f"none of the {len(paths)} calibration images could be read", "check --calibration")
    return normalize_batch(torch.stack(crops), transform, torch.channels_last)


def quantize_int8(net: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """``net`` (eval mode) exported with a dynamic batch size, observed on ``calibration``, converted to
    int8 (quantize/dequantize nodes around int8 weights: inductor fuses them into int8 kernels)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    example = calibration[:2]
    with torch.no_grad():
        exported = torch.export.export(net, (example,), dynamic_shapes=({0: batch},)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        prepared(calibration)
        return convert_pt2e(prepared)


class Int8Forward:
    """Callable ``fwd(x) -> float32 features`` running the int8 network compiled for the first batch's shape.

    Built on the first call (quantize, then compile on that batch); ``quantize_s`` / ``compile_s`` say what
    that cost. Batches up to that size are padded to it; larger ones are split."""

    def __init__(
        self,
        net: nn.Module,
        transform: Any,
        device: Any,
        calibration: Sequence[str] | None = None,
        model: str = "",
    ) -> None:
        if getattr(device, "type", str(device)) != "cpu":
            raise UsageError("--precision int8 is for x86 CPUs", "use --precision fp16 (or bf16) on the GPU")
        require_torchao()
        self.net = net
        self.transform = transform
        self.device = torch.device("cpu")
        self.model = model or "unnamed"  # the architecture name, for this host's speed records
        self.calibration = list(calibration) if calibration else None  # image paths; None: the fixed photo crops
        self.quantize_s: float | None = None
        self.compile_s: float | None = None
        self._fn: Any = None
        self._batch = 0
        self._shape: tuple[int, ...] = ()
        self._timer = StepTimer()  # the batches after the compiling one
        self._finished = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._fn is None:
            return self._build(x)
        n = int(x.shape[0])
        if n > self._batch:
            return torch.cat([self(part) for part in x.split(self._batch)])
        if n < self._batch:
            pad = x[-1:].expand(self._batch - n, *x.shape[1:])
            return self._fn(torch.cat([x, pad]).contiguous(memory_format=torch.channels_last))[:n].float()
        t = time.perf_counter()
        out = self._fn(x).float()
        self._timer.add(time.perf_counter() - t, n)
        return out

    def finish(self) -> None:
        """Record this run's int8 speed and setup time on this host (:mod:`speed_records`), once."""
        if self._finished or self._fn is None:
            return
        self._finished = True
        from .speed_records import record, work_id

        setup = (self.quantize_s or 0.0) + (self.compile_s or 0.0)
        record(self.device, work_id(self.model, "int8", self._shape), int8_s=self._timer.per_image, int8_setup_s=setup)

    def _build(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize (outside inference mode: export needs ordinary tensors), compile for ``x``'s shape,
        and return ``x``'s features."""
        rep = get_reporter()
        t = time.perf_counter()
        with torch.inference_mode(False):
            if self.calibration:
                calib = calibration_from_images(self.calibration, self.transform)
                what = f"{len(calib)} calibration images"
            else:
                calib = calibration_batch(self.transform)
                what = f"{CALIBRATION_CROPS} fixed calibration crops"
            qnet = quantize_int8(self.net, calib)
        self.quantize_s = time.perf_counter() - t
        self._batch = int(x.shape[0])
        self._shape = tuple(int(v) for v in x.shape)
        self._fn = frozen_call(torch.compile(qnet, dynamic=False))
        t = time.perf_counter()
        out = self._fn(x).float()  # the compile happens here
        self.compile_s = time.perf_counter() - t
        rep.info(
            f"int8: quantized in {self.quantize_s:.1f}s ({what}, {SCHEME}), "
            f"compiled in {self.compile_s:.1f}s for batches of {self._batch}"
        )
        return out


INT8_HINT_SPEEDUP = 1.5  # the hint's bar (issue 25): int8 at least this much faster than the run's own forward
PROBE_POINTS = 0.5  # ... and its linear probe at most this many points below bf16's, measured on this host


def int8_hint(device: Any, model: str, precision: str, shape: tuple[int, ...], n_images: int) -> str | None:
    """The hint line of a bf16/fp32 CPU run when this host measured ``--precision int8`` at least
    :data:`INT8_HINT_SPEEDUP` times faster than the fastest forward it measured at ``precision`` (eager or
    compiled) for ``model`` and ``shape``, ``n_images`` repay int8's quantise + compile time, and this host's
    probe check (:func:`speed_records.record_probe`) found int8 within :data:`PROBE_POINTS` of bf16; else None."""
    if device.type != "cpu" or precision.split("@", 1)[0] == "int8" or n_images <= 0:
        return None
    from .speed_records import read, read_probe, work_id

    own = read(device, work_id(model, precision, shape))
    q = read(device, work_id(model, "int8", shape))
    known = [v for v in (own.get("eager_s"), own.get("compiled_s")) if v]
    if not known or "int8_s" not in q:
        return None
    best, setup = min(known), q.get("int8_setup_s", 0.0)
    saved = n_images * (best - q["int8_s"]) - setup
    if best / q["int8_s"] < INT8_HINT_SPEEDUP or saved <= 0:
        return None
    probe = read_probe(device, SCHEME)
    if probe is None or probe["drop_points"] > PROBE_POINTS:
        return None
    return (
        f"hint: --precision int8 ran {best / q['int8_s']:.1f}x the fastest {precision} forward measured on this host "
        f"({1 / q['int8_s']:.0f} vs {1 / best:.0f} img/s; {setup:.0f} s to quantise and compile): about {saved:.0f} s "
        f"less for these {n_images} images. Its linear probe ({probe['model']}, measured here) was "
        f"{probe['drop_points']:.2f} points from bf16's; int8 rows go in a cache of their own (--out)"
    )
