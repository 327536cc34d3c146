"""`rt review` in a real browser: headless Chromium (Debian's `chromium`, which `.ci/run` installs) driven by
Playwright, against the `rt review` command itself. The grid loads its images, a filter narrows it, a key
press relabels, a reload keeps it, the manifest holds it; x excludes and u undoes.

Skipped (with the reason) where no Chromium binary is found: `apt-get install -y chromium`, or point
``RT_CHROMIUM`` at one. Playwright's own browser download (``playwright install``) is never used."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from review_data import CLASSES, FLIPPED, ReviewSet, make_review_set

ROOT = Path(__file__).resolve().parents[1]


def _chromium() -> str | None:
    env = os.environ.get("RT_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium binary found (apt-get install -y chromium, or set RT_CHROMIUM); .ci/run installs it",
)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ReviewSet, str, Path]]:
    """`rt review` running in its own process on a free port: (the set, the printed URL, the manifest)."""
    rs = make_review_set(tmp_path, audit=True)
    manifest = rs.root / "review.csv"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "resnet_transfer", "review", "--cache", str(rs.cache), "--root", str(rs.root)]
    cmd += ["--audit", str(rs.audit), "--thumbs", str(tmp_path / "thumbs"), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip() if proc.stdout else ""
        if not url.startswith("http://127.0.0.1:"):
            proc.kill()
            pytest.fail(f"rt review printed {url!r}; stderr: {proc.stderr.read() if proc.stderr else ''}")
        yield rs, url, manifest
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_grid_filter_keys_reload_and_manifest_in_chromium(served: tuple[ReviewSet, str, Path]) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    rs, url, manifest = served
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            assert "token=" not in page.url  # the token went into a cookie
            page.wait_for_selector("body[data-ready='1']", timeout=15000)
            tiles = page.locator("#grid .tile")
            assert tiles.count() == len(rs.paths)
            # every thumbnail decoded (made on demand by the server)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)",
                timeout=15000,
            )
            assert page.locator("#grid img").count() == len(rs.paths)

            # a filter narrows the grid
            page.select_option("#f-class", "cat")
            cats = rs.labels.count(0)
            page.wait_for_function(f"() => document.querySelectorAll('#grid .tile').length === {cats}")
            assert page.locator("#grid .tile.sel").get_attribute("data-row") == "0"
            page.select_option("#f-finding", "label_error")
            page.select_option("#f-class", "")
            page.wait_for_function(f"() => document.querySelector('#grid .tile').dataset.row === '{FLIPPED}'")
            # the selection follows the narrowed grid before a key is pressed (the grid redraws first)
            page.wait_for_selector(f"#grid .tile.sel[data-row='{FLIPPED}']")

            # a key press relabels the selected image (the audit's top label error: a cat labelled dog)
            page.keyboard.press("1")
            tile = page.locator(f"#grid .tile[data-row='{FLIPPED}']")
            tile.locator(".chip", has_text=CLASSES[0]).wait_for()
            assert "relabelled" in (tile.get_attribute("class") or "")
            page.wait_for_function("() => document.getElementById('pending').textContent.startsWith('1 ')")
            assert f"{rs.paths[FLIPPED]},{CLASSES[0]}" in manifest.read_text().splitlines()

            # a reload keeps it (filters in the address, labels on the server)
            page.reload()
            page.wait_for_selector("body[data-ready='1']")
            assert page.input_value("#f-finding") == "label_error"
            tile = page.locator(f"#grid .tile[data-row='{FLIPPED}']")
            assert "relabelled" in (tile.get_attribute("class") or "")
            assert tile.locator(".chip").inner_text() == CLASSES[0]

            # x excludes the selected image, u undoes it; the manifest follows each
            tile.click()
            page.keyboard.press("x")
            page.wait_for_selector(f"#grid .tile.excluded[data-row='{FLIPPED}']")
            assert rs.paths[FLIPPED] not in manifest.read_text()
            page.keyboard.press("u")
            page.wait_for_selector(f"#grid .tile.relabelled[data-row='{FLIPPED}']")
            assert f"{rs.paths[FLIPPED]},{CLASSES[0]}" in manifest.read_text().splitlines()
            assert errors == []
        finally:
            browser.close()
