"""Make docs/img/review.png: the `rt review` page on a small generated dataset, through the real loop.

    python tools/review_screenshot.py [OUT.png]     # from the repository root; needs chromium + playwright

A folder of coloured shapes (4 classes x 30 images, tests/conftest.py's drawings at 80-160 px), with planted
mistakes: 5 images moved into the wrong class folder, 2 copied into a second class, a few loose (unlabelled)
ones. Then, as a user would: `rt extract` (ResNet-18, random init, 64 px: no download), `rt fit-head`,
`rt audit`, `rt review --head --audit`; headless Chromium opens the printed URL, shows the audit's label
errors, relabels the top one with the key 3 (a square), and the screenshot is taken (1400 x 900).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
CLASSES = ("circle", "cross", "square", "triangle")
BACKBONE = ["--model", "resnet18", "--weights", "none", "--image-size", "64"]


def make_data(root: Path) -> None:
    from conftest import draw_image

    rng = np.random.default_rng(7)
    for cls in CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(30):
            draw_image(cls, rng, int(rng.integers(80, 160))).save(root / cls / f"{cls}_{i:02d}.jpg", quality=92)
    for i, (src, dst) in enumerate(
        [
            ("square", "circle"),
            ("circle", "triangle"),
            ("triangle", "square"),
            ("cross", "circle"),
            ("square", "triangle"),
        ]
    ):
        f = root / src / f"{src}_{i + 20:02d}.jpg"
        f.rename(root / dst / f"{src}_{i + 20:02d}.jpg")  # mislabelled: now in another class folder
    shutil.copy(root / "circle" / "circle_03.jpg", root / "square" / "copy_of_circle_03.jpg")
    shutil.copy(root / "cross" / "cross_05.jpg", root / "cross" / "cross_05_again.jpg")
    for i in range(4):
        draw_image(CLASSES[i], rng, 120).save(root / f"loose_{i}.jpg", quality=92)


def rt(*args: object, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RT_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "resnet_transfer", *map(str, args)], cwd=cwd, env=env, check=True)


def shoot(url: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("RT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        page.select_option("#f-finding", "label_error")
        page.wait_for_timeout(400)
        page.wait_for_function("() => [...document.querySelectorAll('#grid img')].every(i => i.complete)")
        page.keyboard.press("ArrowRight")
        page.wait_for_timeout(300)
        page.keyboard.press("ArrowLeft")  # the top label error
        page.wait_for_timeout(500)
        page.keyboard.press("3")  # is a square: relabelled, written to the manifest, the next one selected
        page.wait_for_timeout(1000)
        page.wait_for_function("() => [...document.querySelectorAll('img')].every(i => i.complete)")
        page.screenshot(path=str(out))
        browser.close()
    from PIL import Image

    # 256 colours: the picture is UI and flat shapes on noise; a third of the size, no visible change
    Image.open(out).convert("RGB").quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out, optimize=True
    )


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "img" / "review.png").resolve()
    with tempfile.TemporaryDirectory(prefix="rt-review-shot-") as tmp:
        work = Path(tmp)
        make_data(work / "shapes")
        rt("extract", "--data", "shapes", "--out", "shapes.h5", *BACKBONE, "--record-root", cwd=work)
        rt("fit-head", "--cache", "shapes.h5", "--out", "shapes-head", cwd=work)
        rt("audit", "--cache", "shapes.h5", "--out", "audit", "--no-sheet", cwd=work)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "resnet_transfer", "review", "--cache", "shapes.h5", "--head", "shapes-head"]
        cmd += ["--audit", "audit", "--thumbs", str(work / "thumbs")]
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, text=True)
        try:
            url = proc.stdout.readline().strip() if proc.stdout else ""
            shoot(url, out)
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
