"""The image transforms and their config: what a backbone expects its input to look like.

:class:`TransformConfig` (recorded in every cache, head and model directory, inside the backbone identity);
the fused resize + center crop (:class:`ResizeCenterCrop`); the views: eval (:func:`eval_transform`, and
:func:`eval_transform_uint8` + :func:`normalize_batch` for batches normalised on the device), train
(:func:`train_transform`: random-resized crop, flip, jitter; :func:`train_transform_uint8` likewise, normalised
per batch) and test-time augmentation
(:func:`tta_transform`: flip, ten-crop). torch / torchvision are imported inside the functions that use them,
so reading a config never loads them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..base import DataError


@dataclass(frozen=True)
class TransformConfig:
    """The eval preprocessing: resize the short side to ``resize_size``, center-crop ``input_size``,
    scale to [0, 1], normalise with ``mean``/``std``. ``draft``: JPEGs at least twice ``resize_size`` on
    the short side are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL ``draft``), never below
    ``resize_size`` (identities recorded before the field existed decoded in full: ``False``)."""

    input_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    draft: bool = True

    def draft_target(self) -> int | None:
        """The ``draft=`` for :func:`data.load_image` / ``ImageDataset``: the short side to stay above."""
        return self.resize_size if self.draft else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformConfig:
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            draft=bool(d.get("draft", False)),
        )

    def with_size(self, image_size: int) -> TransformConfig:
        """The same crop ratio at another input size (``--image-size``)."""
        ratio = self.input_size / self.resize_size
        return TransformConfig(image_size, max(image_size, round(image_size / ratio)), *self._rest())

    def _rest(self) -> tuple[str, tuple[float, float, float], tuple[float, float, float], bool]:
        return self.interpolation, self.mean, self.std, self.draft


_INTERP = {"bilinear": 2, "bicubic": 3, "nearest": 0, "lanczos": 1, "box": 4, "hamming": 5}
_SUPPORT = {1: 3.0, 2: 1.0, 3: 2.0, 5: 1.0}  # PIL filter support (lanczos, bilinear, bicubic, hamming)
_FUSED = frozenset(_SUPPORT)  # nearest and box pick pixels on knife edges: keep the two-step path


def interpolation_mode(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    return {
        "bilinear": InterpolationMode.BILINEAR,
        "bicubic": InterpolationMode.BICUBIC,
        "nearest": InterpolationMode.NEAREST,
        "lanczos": InterpolationMode.LANCZOS,
        "box": InterpolationMode.BOX,
        "hamming": InterpolationMode.HAMMING,
    }.get(name.lower(), InterpolationMode.BILINEAR)


class ResizeCenterCrop:
    """``Resize(resize_size)`` then ``CenterCrop(input_size)`` (torchvision's semantics) at about half the
    cost: PIL's ``resize(box=...)`` computes only the pixels the crop keeps, with the same sample positions
    and filter support as resizing the whole image (pixels outside the crop still feed the filter).

    Not bit-identical: PIL rounds to 8 bits between its horizontal and vertical passes and, for a whole
    image, picks the pass order by a cost heuristic (which has changed between Pillow versions); this
    always runs horizontal first. On photos that is at most 2 grey levels, on a few percent of the pixels
    (about a fifth, by 1, for tall images where PIL runs the vertical pass first; tests/test_data.py).
    Inputs that would need padding, and the nearest/box filters, take torchvision's two steps."""

    def __init__(self, resize_size: int, input_size: int, interpolation: str = "bilinear"):
        self.resize_size = int(resize_size)
        self.input_size = int(input_size)
        self.interpolation = interpolation
        self.resample = _INTERP.get(interpolation.lower(), 2)

    def _resized(self, w: int, h: int) -> tuple[int, int]:
        # torchvision's output size: the short side becomes s, the long side int(s * long / short)
        s = self.resize_size
        return (s, int(s * h / w)) if w <= h else (int(s * w / h), s)

    def fused(self, size: tuple[int, int]) -> bool:
        """Whether an image of ``size`` (w, h) takes the fused PIL path (else torchvision's two steps, which
        import torch)."""
        new_w, new_h = self._resized(*size)
        return min(new_w, new_h) >= self.input_size and self.resample in _FUSED

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        c = self.input_size
        new_w, new_h = self._resized(w, h)
        if not self.fused((w, h)):
            from torchvision import transforms as T

            resized = T.Resize(self.resize_size, interpolation=interpolation_mode(self.interpolation))(img)
            return T.CenterCrop(c)(resized)
        top = round((new_h - c) / 2.0)
        left = round((new_w - c) / 2.0)
        sx, sy = w / new_w, h / new_h  # source pixels per output pixel, per axis
        # One pass per call, horizontal first (PIL's usual order for a whole image; given a box it may
        # choose the other): the source rows the vertical filter reaches (plus a margin), resized
        # horizontally to the crop's columns, then vertically to the crop's rows.
        reach = _SUPPORT[self.resample] * max(sy, 1.0) + 2.0
        y0 = max(0, int(top * sy - reach))
        y1 = min(h, int((top + c) * sy + reach) + 1)
        band = img if (y0, y1) == (0, h) else img.crop((0, y0, w, y1))
        rows = band.resize((c, y1 - y0), self.resample, box=(left * sx, 0, (left + c) * sx, y1 - y0))
        return rows.resize((c, c), self.resample, box=(0, top * sy - y0, c, (top + c) * sy - y0))

    def __repr__(self) -> str:
        return f"ResizeCenterCrop({self.resize_size}, {self.input_size}, {self.interpolation})"


def to_uint8_tensor(img: Image.Image) -> Any:
    """An RGB PIL image -> a ``uint8`` (3, H, W) tensor, with numpy only (no torch kernel runs, so
    decode threads never start OpenMP teams of their own)."""
    import torch

    return torch.from_numpy(uint8_chw(img))


def uint8_chw(img: Image.Image) -> np.ndarray:
    """An RGB PIL image -> a contiguous ``uint8`` (3, H, W) array (what :func:`to_uint8_tensor` wraps)."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def eval_transform(cfg: TransformConfig) -> Any:
    """Resize the short side to ``resize_size``, center-crop ``input_size``, tensor, normalise."""
    from torchvision import transforms as T

    return T.Compose(
        [
            ResizeCenterCrop(cfg.resize_size, cfg.input_size, cfg.interpolation),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )


def eval_transform_uint8(cfg: TransformConfig) -> Any:
    """:func:`eval_transform` without the last two steps: a ``uint8`` (3, H, W) tensor. Batches of these
    are normalised at once with :func:`normalize_batch` (on the device): a quarter of the bytes to move,
    and one vectorised op per batch instead of two small float ops per image."""
    from torchvision import transforms as T

    return T.Compose([ResizeCenterCrop(cfg.resize_size, cfg.input_size, cfg.interpolation), to_uint8_tensor])


def normalize_batch(x: Any, cfg: TransformConfig, memory_format: Any = None) -> Any:
    """A ``uint8`` (N, 3, H, W) batch from :func:`eval_transform_uint8` -> the float32 batch
    :func:`eval_transform` would give (``(x / 255 - mean) / std``, equal to within float32 rounding)."""
    import torch

    mean = torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(cfg.std, device=x.device).view(1, 3, 1, 1) * 255.0
    # x * (1/std) + (-mean/std) in the batch's own layout, then one layout change: measured 3x faster
    # than converting to channels_last first and normalising in place (docs/performance.md).
    out = torch.addcmul(-mean / std, x.to(torch.float32), 1.0 / std)
    return out.contiguous(memory_format=memory_format) if memory_format is not None else out


def _train_steps(cfg: TransformConfig, color_jitter: float, scale_min: float, hflip: bool) -> list[Any]:
    from torchvision import transforms as T

    steps: list[Any] = [
        T.RandomResizedCrop(
            cfg.input_size, scale=(scale_min, 1.0), interpolation=interpolation_mode(cfg.interpolation)
        ),
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    return steps


def train_transform(
    cfg: TransformConfig, color_jitter: float = 0.0, scale_min: float = 0.08, hflip: bool = True
) -> Any:
    """The ResNet recipe: random-resized crop and horizontal flip (optionally colour jitter; ``hflip=False``
    for images whose mirror image is another thing, e.g. text and digits)."""
    from torchvision import transforms as T

    steps = _train_steps(cfg, color_jitter, scale_min, hflip)
    return T.Compose([*steps, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


def train_transform_uint8(
    cfg: TransformConfig, color_jitter: float = 0.0, scale_min: float = 0.08, hflip: bool = True
) -> Any:
    """:func:`train_transform`'s augmentation (the same random draws, in the same order) ending in a
    ``uint8`` (3, S, S) tensor, for batches normalised at once with :func:`normalize_batch`. See
    :class:`TrainCropUint8`."""
    return TrainCropUint8(cfg, color_jitter, scale_min, hflip)


class TrainCropUint8:
    """Random-resized crop, flip and optional colour jitter of a decoded image (PIL or ``uint8`` HWC array),
    run on ``uint8`` tensors: torchvision's draws (``RandomResizedCrop.get_params``, the flip's
    ``torch.rand(1)``, ``ColorJitter.get_params``), its antialiased tensor resize (within a few levels of
    PIL's, which :func:`train_transform` uses), and an output whose storage is HWC, so that
    :func:`data.collate` stacks a batch straight into the channels-last layout the model takes. Measured
    (docs/performance.md): 0.3 of the PIL path's per-image cost at 128 px, most of what an epoch adds to the
    bare train step."""

    takes_arrays = True  # data.ImageDataset hands it uint8 HWC arrays (converted once, kept between epochs)

    def __init__(self, cfg: TransformConfig, color_jitter: float, scale_min: float, hflip: bool) -> None:
        from torchvision import transforms as T

        steps = _train_steps(cfg, color_jitter, scale_min, hflip)  # the float transform's steps: one definition
        self.size = int(cfg.input_size)
        self.crop = steps[0]
        self.hflip = any(isinstance(t, T.RandomHorizontalFlip) for t in steps)
        self.jitter = next((t for t in steps if isinstance(t, T.ColorJitter)), None)

    def __call__(self, img: Any) -> Any:
        import torch
        from torchvision.transforms.v2 import functional as F

        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if not arr.flags.writeable:  # PIL's array interface hands out read-only bytes; torch wants its own
            arr = arr.copy()
        x = torch.from_numpy(arr).permute(2, 0, 1)  # (C, H, W) view
        i, j, h, w = self.crop.get_params(x, self.crop.scale, self.crop.ratio)
        x = F.resized_crop(x, i, j, h, w, [self.size, self.size], self.crop.interpolation, antialias=True)
        if self.hflip and torch.rand(1) < 0.5:  # RandomHorizontalFlip's draw
            x = x.flip(-1)
        if self.jitter is not None:
            x = self.jitter(x)
        return x.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # HWC storage: see data.collate

    def __repr__(self) -> str:
        return f"TrainCropUint8(crop={self.crop!r}, hflip={self.hflip}, jitter={self.jitter!r})"


def tta_transform(cfg: TransformConfig, mode: str) -> Any:
    """Test-time augmentation: ``flip`` -> (2, C, H, W) per image; ``tencrop`` -> (10, C, H, W)."""
    import torch
    from torchvision import transforms as T

    norm = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    if mode == "flip":  # the plain eval view (the same crop extract caches) and its mirror image
        center = ResizeCenterCrop(cfg.resize_size, cfg.input_size, cfg.interpolation)

        def flip(img: Image.Image) -> Any:
            c = center(img)
            return torch.stack([norm(c), norm(c.transpose(Image.FLIP_LEFT_RIGHT))])

        return flip
    if mode == "tencrop":
        resize = T.Resize(cfg.resize_size, interpolation=interpolation_mode(cfg.interpolation))
        ten = T.Compose([resize, T.TenCrop(cfg.input_size)])
        return lambda img: torch.stack([norm(c) for c in ten(img)])
    raise DataError(f"--tta {mode!r} is not known", "use --tta flip or --tta tencrop")


VIEWS: dict[str | None, int] = {None: 1, "flip": 2, "tencrop": 10}  # views per image of each --tta mode


def view_transform(cfg: TransformConfig, view: str | None = None) -> Any:
    """The per-image transform of a view: ``None`` -> :func:`eval_transform_uint8` (a uint8 crop, normalised
    per batch later); ``flip`` / ``tencrop`` -> :func:`tta_transform` (normalised float views)."""
    return eval_transform_uint8(cfg) if view is None else tta_transform(cfg, view)
