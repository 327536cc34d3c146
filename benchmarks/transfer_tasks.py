"""The transfer suite's tasks and its table: small image-classification tasks the project draws itself
(digits on photos, shapes on photos, texture patches on photos, and scenes: which photograph a crop comes
from), the source task the suite's backbone is
trained on, and the summary with 95% t-intervals over seeds.

Every image is a crop of a photograph shipped inside scikit-learn / scikit-image with something drawn on it
(recipes/offline_digits/make_data.py's generator: its photo crops and digit drawing are reused). The source
task (digits 0-6 on the source photographs) and the targets (digits 7-9, shapes, textures on other
photographs) share no classes and no photographs. Each target has a fixed test set; each seed draws its own
training images (the labelled subset a user might have), so seeds vary the data as well as the run.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "plus", "ring", "hexagon", "star", "halfdisc")
TEXTURES = ("hstripes", "vstripes", "checker", "dots")
SCENES = ("flower", "chelsea", "gravel", "moon", "cell")  # target photographs (none of the source's)


@dataclass(frozen=True)
class TaskSpec:
    """One target task: ``domain`` (digits | shapes | textures | scenes), its ``classes``, labelled training images
    per class (``per_class``, drawn per seed), image side ``size`` and fixed test images per class."""

    name: str
    domain: str
    classes: tuple[str, ...]
    per_class: int
    size: int
    test_per_class: int = 40


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("digits3-k10-32px", "digits", ("7", "8", "9"), 10, 32),
    TaskSpec("digits3-k50-64px", "digits", ("7", "8", "9"), 50, 64),
    TaskSpec("shapes5-k20-64px", "shapes", SHAPES[:5], 20, 64),
    TaskSpec("shapes10-k12-96px", "shapes", SHAPES, 12, 96, 20),
    TaskSpec("textures4-k40-48px", "textures", TEXTURES, 40, 48),
    TaskSpec("textures2-k200-32px", "textures", TEXTURES[:2], 200, 32, 100),
    TaskSpec("shapes3-k100-128px", "shapes", ("circle", "triangle", "star"), 100, 128, 30),
    TaskSpec("scenes5-k16-48px", "scenes", SCENES, 16, 48),
)
QUICK = ("digits3-k10-32px", "shapes5-k20-64px")


@lru_cache(maxsize=1)
def digits_module() -> Any:
    """recipes/offline_digits/make_data.py as a module (its photo crops and digit drawing are reused)."""
    path = ROOT / "recipes" / "offline_digits" / "make_data.py"
    spec = importlib.util.spec_from_file_location("offline_digits_make_data", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@lru_cache(maxsize=2)
def photos(kind: str) -> tuple[np.ndarray, ...]:
    md = digits_module()
    return tuple(md.load_photo(n) for n in (md.SOURCE_PHOTOS if kind == "source" else md.TARGET_PHOTOS))


@lru_cache(maxsize=1)
def _digit_scans() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def _colour_against(rng: np.random.Generator, under: np.ndarray, min_dist: float = 0.6) -> np.ndarray:
    colour = rng.random(3)
    for _ in range(20):
        if np.linalg.norm(colour - under) >= min_dist:
            break
        colour = rng.random(3)
    return colour


def _polygon(name: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    sides = {"triangle": 3, "square": 4, "diamond": 4, "hexagon": 6}[name]
    off = angle + (math.pi / 4 if name == "square" else 0.0) + (-math.pi / 2 if name == "triangle" else 0.0)
    return [
        (cx + r * math.cos(off + 2 * math.pi * i / sides), cy + r * math.sin(off + 2 * math.pi * i / sides))
        for i in range(sides)
    ]


def _shape_mask(name: str, s: int, rng: np.random.Generator) -> Image.Image:
    """An L-mode mask with one shape at a random size, place and (small) angle."""
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    r = rng.uniform(0.14, 0.34) * s
    cx, cy = rng.uniform(r + 1, s - r - 1, size=2)
    a = rng.uniform(-0.25, 0.25)
    w = max(1, round(r / 3))
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=w)
    elif name == "halfdisc":
        d.pieslice([cx - r, cy - r, cx + r, cy + r], 180, 360, fill=255)
    elif name in ("cross", "plus"):
        base = a + (math.pi / 4 if name == "cross" else 0.0)
        for k in range(2):
            t = base + k * math.pi / 2
            d.line(
                [(cx - r * math.cos(t), cy - r * math.sin(t)), (cx + r * math.cos(t), cy + r * math.sin(t))],
                fill=255,
                width=w,
            )
    elif name == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            t = a - math.pi / 2 + math.pi * i / 5
            pts.append((cx + rr * math.cos(t), cy + rr * math.sin(t)))
        d.polygon(pts, fill=255)
    else:
        d.polygon(_polygon(name, cx, cy, r, a), fill=255)
    return m


def _texture_mask(name: str, s: int, rng: np.random.Generator) -> Image.Image:
    """A patch (a random rectangle covering a third to two thirds of the side) of a periodic pattern."""
    period = rng.uniform(0.12, 0.25) * s
    phase = rng.uniform(0, period)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    if name == "hstripes":
        on = ((yy + phase) % period) < period / 2
    elif name == "vstripes":
        on = ((xx + phase) % period) < period / 2
    elif name == "checker":
        on = (((xx + phase) // (period / 2) + (yy + phase) // (period / 2)) % 2) == 0
    else:  # dots
        cy, cx = (yy + phase) % period - period / 2, (xx + phase) % period - period / 2
        on = cx**2 + cy**2 < (period / 3.2) ** 2
    side = rng.uniform(0.4, 0.8, size=2) * s
    x0, y0 = rng.uniform(0, s - side[0]), rng.uniform(0, s - side[1])
    box = (xx >= x0) & (xx < x0 + side[0]) & (yy >= y0) & (yy < y0 + side[1])
    return Image.fromarray(((on & box) * 255).astype(np.uint8))


@lru_cache(maxsize=8)
def _scene(name: str) -> np.ndarray:
    md = digits_module()
    return md.load_photo(next(n for n in md.TARGET_PHOTOS if n.endswith(":" + name)))


def _scene_crop(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A crop of photograph ``name`` (15-50% of its short side, anywhere), its colour, brightness and contrast
    jittered, mirrored half the time: a new view of the same scene."""
    from PIL import ImageEnhance

    photo = _scene(name)
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.15, 0.5) * min(h, w))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    img = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    for enhance in (ImageEnhance.Color, ImageEnhance.Brightness, ImageEnhance.Contrast):
        img = enhance(img).enhance(rng.uniform(0.5, 1.5))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def draw_image(spec: TaskSpec, label: str, rng: np.random.Generator, scan: np.ndarray | None = None) -> Image.Image:
    """One image of class ``label``: a target-photo crop with the class's digit / shape / texture drawn on it,
    or (scenes) a crop of the class's photograph."""
    md = digits_module()
    if spec.domain == "scenes":
        return _scene_crop(label, spec.size, rng)
    if spec.domain == "digits":
        assert scan is not None
        return md.draw(rng, scan, photos("target"), md.DigitsConfig(size=spec.size))
    bg = md._background(rng, photos("target"), spec.size)
    mask = (_shape_mask if spec.domain == "shapes" else _texture_mask)(label, spec.size, rng)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0 * rng.uniform(0.5, 1.0)  # faint to solid
    for _ in range(int(rng.integers(1, 4))):  # clutter: random strokes in random colours over the photo
        clutter = Image.new("L", (spec.size, spec.size), 0)
        pts = [tuple(rng.uniform(0, spec.size, 2)) for _ in range(3)]
        ImageDraw.Draw(clutter).line(pts, fill=255, width=max(1, spec.size // 24))
        ca = np.asarray(clutter, dtype=np.float32)[..., None] / 255.0 * rng.uniform(0.3, 0.8)
        bg = bg * (1 - ca) + rng.random(3)[None, None, :] * ca
    under = (bg * alpha).sum((0, 1)) / max(1.0, float(alpha.sum()))
    colour = _colour_against(rng, under)
    out = bg * (1 - alpha) + colour[None, None, :] * alpha
    return Image.fromarray((np.clip(out, 0, 1) * 255).round().astype(np.uint8))


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", compress_level=1)


def _digit_split(spec: TaskSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per digit class: (test scans, training scans), fixed per task (the test scans never train)."""
    _, labels = _digit_scans()
    rng = np.random.default_rng(1234)
    out = {}
    for c in spec.classes:
        idx = rng.permutation(np.flatnonzero(labels == int(c)))
        out[c] = (idx[: spec.test_per_class], idx[spec.test_per_class :])
    return out


def write_task(spec: TaskSpec, root: Path, seed: int) -> tuple[Path, Path]:
    """``(train_dir, test_dir)`` under ``root``: the fixed test set (written once) and seed ``seed``'s
    training images (``per_class`` per class); reused when already written."""
    test, train = root / "test", root / f"seed{seed}" / "train"
    images, _ = _digit_scans()
    split = _digit_split(spec) if spec.domain == "digits" else {}
    if not (root / "test.done").exists():
        rng = np.random.default_rng(10_000)
        for c in spec.classes:
            for i in range(spec.test_per_class):
                scan = images[split[c][0][i % len(split[c][0])]] if split else None
                _save(draw_image(spec, c, rng, scan), test / c / f"{i:04d}.png")
        (root / "test.done").write_text("ok\n")
    done = root / f"seed{seed}" / "train.done"
    if not done.exists():
        rng = np.random.default_rng(seed)
        for c in spec.classes:
            pool = rng.permutation(split[c][1]) if split else None
            for i in range(spec.per_class):
                scan = images[pool[i % len(pool)]] if pool is not None else None
                _save(draw_image(spec, c, rng, scan), train / c / f"{i:04d}.png")
        done.write_text("ok\n")
    return train, test


def write_source(root: Path, size: int = 32, scans_per_class: int = 120, renders: int = 2) -> Path:
    """The source task: digits 0-6 on the source photographs (none of the targets' classes or photos)."""
    md = digits_module()
    done = root / "source.done"
    if done.exists():
        return root / "train"
    images, labels = _digit_scans()
    rng = np.random.default_rng(7)
    cfg = md.DigitsConfig(size=size)
    for c in range(7):
        idx = rng.permutation(np.flatnonzero(labels == c))[:scans_per_class]
        for r in range(renders):
            for i in idx:
                _save(md.draw(rng, images[i], photos("source"), cfg), root / "train" / str(c) / f"d{i:04d}_{r}.png")
    done.write_text("ok\n")
    return root / "train"


# -------------------------------------------------------------------------------------------------- table


def t_interval(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for fewer than 2 values)."""
    from scipy import stats

    a = np.asarray([x for x in xs if x is not None and not math.isnan(x)], dtype=float)
    if len(a) == 0:
        return float("nan"), float("nan")
    if len(a) < 2:
        return float(a.mean()), 0.0
    half = float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
    return float(a.mean()), half


def fmt_ci(xs: Sequence[float], digits: int = 3) -> str:
    m, h = t_interval(xs)
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {h:.{digits}f}"


ARMS = (("rt_probe", "rt probe (fit-head)"), ("rt_finetune", "rt finetune"), ("fastai", "fastai fine_tune"))


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table: per task, test accuracy of each arm (mean ± 95% t-half-width over seeds), the
    wins of rt finetune over fastai and over its probe, and wall seconds (rt's pipeline / fastai's training)."""
    tasks: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        tasks.setdefault(r["task"], []).append(r)
    one = any(r.get("rt1_seconds") is not None for r in rows)  # `--one-command` rows: two more columns
    head = "| task | seeds | " + " | ".join(label for _, label in ARMS)
    head += " | ft − fastai | ft − probe | rt pipeline s | fastai train s | unfreeze auto |"
    head += " rt 1-command ft | rt 1-command s |" if one else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, rs in tasks.items():
        acc = {k: [r[k] for r in rs] for k, _ in ARMS}
        d_fa = [r["rt_finetune"] - r["fastai"] for r in rs if r.get("fastai") is not None]
        d_pr = [r["rt_finetune"] - r["rt_probe"] for r in rs]
        picks = sorted({str(r.get("unfreeze")) for r in rs})
        lines.append(
            f"| {name} | {len(rs)} | "
            + " | ".join(fmt_ci(acc[k]) for k, _ in ARMS)
            + f" | {fmt_ci(d_fa)} | {fmt_ci(d_pr)} | {fmt_ci([r['rt_seconds'] for r in rs], 1)}"
            + f" | {fmt_ci([r.get('fastai_seconds') for r in rs], 1)} | {', '.join(picks)} |"
            + (f" {fmt_ci([r.get('rt1_finetune') for r in rs])} | {fmt_ci([r.get('rt1_seconds') for r in rs], 1)} |"
               if one else "")
        )  # fmt: skip
    return "\n".join(lines)


def variants_table(rows: Sequence[dict[str, Any]], base: str = "defaults") -> str:
    """Per task: the probe, ``base``'s finetune, each other label's finetune and fastai (mean ± 95%
    t-half-width over seeds), and each variant's paired differences (same task and seed) against ``base``'s
    finetune and against the probe. Rows without a ``base`` row of the same task and seed are left out."""
    by = {(r["task"], r["seed"], r.get("label", "defaults")): r for r in rows}
    labels = [x for x in dict.fromkeys(r.get("label", "defaults") for r in rows) if x != base]
    head = f"| task | seeds | probe | {base} ft | " + " | ".join(f"{x} ft" for x in labels) + " | fastai |"
    head += "".join(f" {x} − {base} | {x} − probe |" for x in labels)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for task in dict.fromkeys(r["task"] for r in rows):
        seeds = sorted(s for (t, s, lab) in by if t == task and lab == base)
        if not seeds:
            continue
        b = [by[task, s, base] for s in seeds]
        cells = [fmt_ci([r["rt_probe"] for r in b]), fmt_ci([r["rt_finetune"] for r in b])]
        diffs = []
        for x in labels:
            v = [(by[task, s, x], by[task, s, base]) for s in seeds if (task, s, x) in by]
            cells.append(fmt_ci([r["rt_finetune"] for r, _ in v]) + f" (n={len(v)})")
            diffs += [fmt_ci([r["rt_finetune"] - q["rt_finetune"] for r, q in v])]
            diffs += [fmt_ci([r["rt_finetune"] - r["rt_probe"] for r, _ in v])]
        cells.append(fmt_ci([r.get("fastai") for r in b]))
        lines.append(f"| {task} | {len(seeds)} | " + " | ".join(cells + diffs) + " |")
    return "\n".join(lines)
