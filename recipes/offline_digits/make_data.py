"""Build the offline_digits image folders: real handwritten digits drawn onto crops of real photographs.

Everything comes from data that ships inside installed packages (no downloads): scikit-learn's handwritten
digits (``load_digits``: 1,797 8x8 scans, about 180 per class) and the sample photographs of scikit-learn
(``load_sample_images``) and scikit-image (``skimage.data``). Each image is a random crop of a photograph
with one digit drawn on it at a random size, place, angle, stroke width and colour, so that, as in a user's
photos, the object varies in size, place and colour on a cluttered background.

Source and target are kept apart: different digit classes (source 0-6, target 7/8/9), therefore different
digit scans, and different photographs behind them. Within the target, the test scans are never used for
training. Each scan is drawn several times (another size, place, angle, colour and photo crop each time):
a drawing is an image, as several photos of one cat are several images.

Layout written under ``--out``::

    source/train/<0..6>/*.png      the source task (many images per class)
    source/test/<0..6>/*.png       held-out source images (checks the source model)
    target/train/<7|8|9>/*.png     the target's training pool: every training scan drawn target_renders
                                   times (the k-image subsets are drawn from it by seed: `rt curve`, sweep.py)
    target/test/<7|8|9>/*.png      the fixed target test set (held-out scans, drawn target_test_renders times)
    manifest.json                  the settings and the counts

Usage: ``python recipes/offline_digits/make_data.py --out runs/offline_digits/data``
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SOURCE_PHOTOS = (
    "sklearn:china",
    "skimage:astronaut",
    "skimage:coffee",
    "skimage:rocket",
    "skimage:hubble_deep_field",
    "skimage:immunohistochemistry",
    "skimage:camera",
    "skimage:brick",
    "skimage:grass",
    "skimage:coins",
)
TARGET_PHOTOS = (
    "sklearn:flower",
    "skimage:chelsea",
    "skimage:retina",
    "skimage:gravel",
    "skimage:moon",
    "skimage:page",
    "skimage:cell",
)


@dataclass
class DigitsConfig:
    """What make_data draws. Defaults are the recipe's settings (see the README for how they were chosen)."""

    out: Path = Path("runs/offline_digits/data")
    size: int = 32
    seed: int = 0
    source_classes: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    target_classes: tuple[int, ...] = (7, 8, 9)
    source_renders: int = 8  # drawings of each source digit scan (different size/place/colour/background)
    source_test_per_class: int = 20  # source scans held out for source/test (drawn once)
    target_test_per_class: int = 60  # target scans held out for target/test
    target_renders: int = 4  # drawings of each target training scan (target/train)
    target_test_renders: int = 3  # drawings of each target test scan (target/test)
    max_train_scans: int | None = None  # cap on training scans per class (small versions for tests)
    digit_frac: tuple[float, float] = (0.5, 0.85)  # digit height as a fraction of the image
    rotate_deg: float = 10.0
    source_plain_frac: float = 0.0  # share of source images on a blurred (uncluttered) background
    min_contrast: float = 0.6  # minimum colour distance (0..sqrt(3)) between digit and the background under it
    source_photos: tuple[str, ...] = SOURCE_PHOTOS
    target_photos: tuple[str, ...] = TARGET_PHOTOS
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def load_photo(name: str) -> np.ndarray:
    """A shipped photograph as an RGB uint8 array (``sklearn:china`` or ``skimage:astronaut``)."""
    lib, key = name.split(":", 1)
    if lib == "sklearn":
        from sklearn.datasets import load_sample_image

        arr = np.asarray(load_sample_image(f"{key}.jpg"))
    else:
        import skimage.data

        arr = np.asarray(getattr(skimage.data, key)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def _background(rng: np.random.Generator, photos: Sequence[np.ndarray], size: int, blur: float = 0.0) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.15, 0.6) * min(h, w))
    side = max(side, size // 2)
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    if blur > 0:
        crop = crop.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(crop, dtype=np.float32) / 255.0


def _digit_mask(rng: np.random.Generator, digit: np.ndarray, cfg: DigitsConfig) -> Image.Image:
    """The 8x8 scan as a soft alpha mask, upsampled, maybe thickened, rotated; tight-cropped."""
    a = Image.fromarray((np.clip(digit / 16.0, 0, 1) * 255).astype(np.uint8))
    a = a.resize((64, 64), Image.BICUBIC)
    if rng.random() < 0.5:
        a = a.filter(ImageFilter.MaxFilter(int(rng.choice([3, 5]))))
    a = a.rotate(float(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)), resample=Image.BILINEAR, expand=True)
    box = a.getbbox()
    return a.crop(box) if box else a


def draw(
    rng: np.random.Generator,
    digit: np.ndarray,
    photos: Sequence[np.ndarray],
    cfg: DigitsConfig,
    plain_frac: float = 0.0,
) -> Image.Image:
    """One image: a random photo crop (blurred with probability ``plain_frac``) with ``digit`` drawn at a
    random size, place, angle and colour."""
    s = cfg.size
    plain = plain_frac > 0 and rng.random() < plain_frac
    bg = _background(rng, photos, s, blur=s / 8 if plain else 0.0)
    mask = _digit_mask(rng, digit, cfg)
    dh = max(6, int(rng.uniform(*cfg.digit_frac) * s))
    dw = max(4, round(dh * mask.width / max(1, mask.height)))
    dw = min(dw, int(0.85 * s))
    alpha = np.asarray(mask.resize((dw, dh), Image.BILINEAR), dtype=np.float32) / 255.0
    alpha = np.clip(alpha * 1.3, 0, 1)
    margin = max(1, s // 16)  # keep clear of the border the eval center-crop trims
    y = int(rng.integers(margin, max(margin + 1, s - dh - margin + 1)))
    x = int(rng.integers(margin, max(margin + 1, s - dw - margin + 1)))
    under = bg[y : y + dh, x : x + dw].reshape(-1, 3).mean(0)
    colour = rng.random(3).astype(np.float32)
    for _ in range(20):
        if np.linalg.norm(colour - under) >= cfg.min_contrast:
            break
        colour = rng.random(3).astype(np.float32)
    region = bg[y : y + dh, x : x + dw]
    bg[y : y + dh, x : x + dw] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
    return Image.fromarray((np.clip(bg, 0, 1) * 255).round().astype(np.uint8))


def _write(img: Image.Image, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / name, format="PNG", optimize=False, compress_level=1)


def make_data(cfg: DigitsConfig) -> DigitsConfig:
    """Write the source and target folders under ``cfg.out`` (replacing them); returns ``cfg`` with counts.

    Deterministic: the same config writes byte-identical images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    rng = np.random.default_rng(cfg.seed)
    src_photos = [load_photo(n) for n in cfg.source_photos]
    tgt_photos = [load_photo(n) for n in cfg.target_photos]
    out = Path(cfg.out)
    for part in ("source", "target"):
        if (out / part).exists():
            shutil.rmtree(out / part)
    counts: dict[str, dict[str, int]] = {}

    def put(split: str, cls: int, idx: int, render: int, photos: Sequence[np.ndarray], plain: float = 0.0) -> None:
        img = draw(rng, images[idx], photos, cfg, plain)
        _write(img, out / split / str(cls), f"d{idx:04d}_{render}.png")
        counts.setdefault(split, {}).setdefault(str(cls), 0)
        counts[split][str(cls)] += 1

    for cls in cfg.source_classes:
        idx = rng.permutation(np.flatnonzero(labels == cls))
        test, train = idx[: cfg.source_test_per_class], idx[cfg.source_test_per_class :][: cfg.max_train_scans]
        for i in test:
            put("source/test", cls, int(i), 0, src_photos)
        for r in range(cfg.source_renders):
            for i in train:
                put("source/train", cls, int(i), r, src_photos, cfg.source_plain_frac)

    for cls in cfg.target_classes:
        idx = rng.permutation(np.flatnonzero(labels == cls))
        test, train = idx[: cfg.target_test_per_class], idx[cfg.target_test_per_class :][: cfg.max_train_scans]
        for r in range(cfg.target_test_renders):
            for i in test:
                put("target/test", cls, int(i), r, tgt_photos)
        for r in range(cfg.target_renders):
            for i in train:
                put("target/train", cls, int(i), r, tgt_photos)

    cfg.counts = counts
    manifest = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    manifest["out"] = str(cfg.out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DigitsConfig.out, help="where to write (source/ and target/)")
    p.add_argument("--size", type=int, default=DigitsConfig.size, help="image side in pixels")
    p.add_argument("--seed", type=int, default=DigitsConfig.seed)
    p.add_argument(
        "--source-renders", type=int, default=DigitsConfig.source_renders, help="drawings per source digit scan"
    )
    p.add_argument(
        "--target-renders", type=int, default=DigitsConfig.target_renders, help="drawings per target training scan"
    )
    p.add_argument("--target-test", type=int, default=DigitsConfig.target_test_per_class, help="test scans per class")
    p.add_argument(
        "--target-test-renders", type=int, default=DigitsConfig.target_test_renders, help="drawings per test scan"
    )
    p.add_argument("--max-train-scans", type=int, default=None, help="use at most this many training scans per class")
    a = p.parse_args(argv)
    cfg = make_data(
        DigitsConfig(
            out=a.out,
            size=a.size,
            seed=a.seed,
            source_renders=a.source_renders,
            target_renders=a.target_renders,
            target_test_per_class=a.target_test,
            target_test_renders=a.target_test_renders,
            max_train_scans=a.max_train_scans,
        )
    )
    for split, per_class in cfg.counts.items():
        print(f"{split}: {sum(per_class.values())} images ({', '.join(f'{k}: {v}' for k, v in per_class.items())})")
    print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
