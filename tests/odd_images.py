"""Builders for the messy files real photo folders contain (used by the data and extract tests)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def _rgb(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


def write_odd_images(folder: Path) -> dict[str, str]:
    """Write one file per odd case into ``folder``; returns ``{file name: "ok" | "skip"}``: what a correct
    loader must do with it."""
    folder.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str] = {}

    def save(name: str, img: Image.Image, fmt: str, kind: str = "ok", **kw: object) -> None:
        img.save(folder / name, format=fmt, **kw)
        expect[name] = kind

    save("cmyk.jpg", _rgb(seed=1).convert("CMYK"), "JPEG")
    save("gray.jpg", _rgb(seed=2).convert("L"), "JPEG")
    save("rgba.png", _rgb(seed=3).convert("RGBA"), "PNG")
    save("palette.png", _rgb(seed=4).convert("P"), "PNG")
    pal = _rgb(seed=5).convert("P")
    pal.info["transparency"] = 0
    save("palette_transparent.png", pal, "PNG", transparency=0)
    arr16 = (np.random.default_rng(6).integers(0, 65535, (30, 40))).astype(np.uint16)
    save("deep16.png", Image.fromarray(arr16), "PNG")
    frames = [_rgb(seed=s) for s in (7, 8, 9)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    expect["animated.gif"] = "ok"
    frames[0].save(folder / "multipage.tiff", save_all=True, append_images=frames[1:])
    expect["multipage.tiff"] = "ok"
    save("tiny.png", _rgb(3, 2, seed=10), "PNG")
    save("UPPER.JPEG", _rgb(seed=11), "JPEG")
    save("naïve_ünïcode_猫.webp", _rgb(seed=12), "WEBP")
    # EXIF orientation 6 (rotate 90): a 40x30 image must come out 30x40
    exif = Image.Exif()
    exif[0x0112] = 6
    _rgb(seed=13).save(folder / "exif_rotated.jpg", format="JPEG", exif=exif.tobytes())
    expect["exif_rotated.jpg"] = "ok"
    # the bad ones
    (folder / "zero.jpg").write_bytes(b"")
    expect["zero.jpg"] = "skip"
    (folder / "not_an_image.png").write_text("this is text, not a PNG\n")
    expect["not_an_image.png"] = "skip"
    buf = io.BytesIO()
    _rgb(200, 150, seed=14).save(buf, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect["truncated.jpg"] = "skip"
    os.symlink(folder / "does_not_exist.jpg", folder / "broken_link.jpg")
    expect["broken_link.jpg"] = "skip"
    # litter that must be ignored entirely (not listed, not skipped)
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "._hidden.jpg").write_bytes(b"\0\5\26\7")
    return expect
