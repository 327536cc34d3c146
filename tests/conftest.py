"""Shared fixtures: a tiny, class-structured image folder generated in a temp dir in about a second.

Classes differ in shape and colour (a learnable signal), images differ in size, position, background noise
and file format, so the tests exercise decoding, resizing and real (if easy) classification.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image, ImageDraw

os.environ.setdefault("RT_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# this host's speed records (resnet_transfer.speed_records): the tests' own, never the user's ~/.cache
_SPEED_DIR = tempfile.mkdtemp(prefix="rt-test-speed-")
atexit.register(shutil.rmtree, _SPEED_DIR, True)
os.environ["RT_SPEED_RECORDS"] = os.path.join(_SPEED_DIR, "speed-records.json")

# Hypothesis profiles. `fixed` is the suite's (pyproject's addopts pass --hypothesis-profile=fixed, so the
# README's `python -m pytest -q` and CI use it): derandomised, no example database, so every clone draws the
# same examples and gives the same verdict. `random` hunts for new failures locally, with RANDOM_SCALE times
# the examples (`python -m pytest -q --hypothesis-profile=random tests/test_cache.py`); its failures are
# saved in .hypothesis/ (never committed, never read by `fixed`) and printed with a reproduce blob. Every
# failing example a random run finds is kept on its test as an @example (docs/CONTRIBUTING.md).
RANDOM_SCALE = 10
settings.register_profile("fixed", derandomize=True, database=None, print_blob=True)
settings.register_profile("random", max_examples=100 * RANDOM_SCALE, derandomize=False, print_blob=True)


def examples(n: int) -> int:
    """``n`` examples under the `fixed` profile, ``RANDOM_SCALE * n`` under `random` (the loaded profile's
    ``max_examples`` over Hypothesis's default of 100). Use as ``@settings(max_examples=examples(25))``."""
    return max(n, n * settings.default.max_examples // 100)


CLASSES = ("circle", "square", "triangle")
COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 60), "triangle": (50, 80, 230)}
FORMATS = (".jpg", ".png", ".webp", ".JPG", ".bmp")


def draw_image(cls: str, rng: np.random.Generator, size: int | None = None) -> Image.Image:
    """One image of class ``cls``: a coloured shape at a random place and scale on a noisy background."""
    w = size or int(rng.integers(48, 96))
    h = size or int(rng.integers(48, 96))
    noise = rng.integers(0, 90, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(noise, "RGB")
    d = ImageDraw.Draw(img)
    s = int(min(w, h) * rng.uniform(0.4, 0.8))
    x0 = int(rng.integers(0, w - s + 1))
    y0 = int(rng.integers(0, h - s + 1))
    jitter = rng.integers(-25, 25, size=3)
    base = COLOURS.get(cls, (200, 200, 60))
    colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(base, jitter))
    if cls == "circle":
        d.ellipse([x0, y0, x0 + s, y0 + s], fill=colour)
    elif cls == "square":
        d.rectangle([x0, y0, x0 + s, y0 + s], fill=colour)
    elif cls == "triangle":
        d.polygon([(x0 + s // 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=colour)
    else:  # any other class name: a cross
        d.rectangle([x0, y0 + s // 3, x0 + s, y0 + 2 * s // 3], fill=colour)
        d.rectangle([x0 + s // 3, y0, x0 + 2 * s // 3, y0 + s], fill=colour)
    return img


def make_image_folder(root: Path, per_class: int = 8, seed: int = 0, classes: tuple[str, ...] = CLASSES) -> Path:
    """Write ``per_class`` images per class under ``root/<class>/`` in mixed formats; returns ``root``."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = FORMATS[i % len(FORMATS)]
            img = draw_image(cls, rng)
            fmt = {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}[ext.lower()]
            img.save(root / cls / f"{cls}_{seed}_{i:03d}{ext}", format=fmt)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 8 images, mixed formats; read-only by convention (copy it before changing it)."""
    return make_image_folder(tmp_path_factory.mktemp("pets"), per_class=8, seed=0)


@pytest.fixture(scope="session")
def test_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out images of the same classes (another seed)."""
    return make_image_folder(tmp_path_factory.mktemp("pets_test"), per_class=6, seed=1)


@pytest.fixture
def fresh_folder(tmp_path: Path) -> Path:
    """A private, writable copy-sized folder (4 per class) for tests that add or break files."""
    return make_image_folder(tmp_path / "data", per_class=4, seed=2)


@pytest.fixture
def quiet_reporter():
    """A reporter that records messages and prints nothing, set for the test and restored after it."""
    from resnet_transfer.base import Reporter, set_reporter

    rep = Reporter(verbose=False)
    previous = set_reporter(rep)
    yield rep
    set_reporter(previous)
