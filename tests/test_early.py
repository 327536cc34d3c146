"""Early crops (images/early.py): decoded by a forked child before the model is ready, equal to the feed's own
crops, never used for a changed file, and an extract with them writes what one without them writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from resnet_transfer.cache import ExtractConfig, FeatureCache, extract
from resnet_transfer.images import (
    TransformConfig,
    early_crops,
    early_worthwhile,
    eval_transform_uint8,
    list_images,
    load_image,
)
from tests.conftest import make_image_folder
from tests.odd_images import write_odd_images

TC = TransformConfig(input_size=32, resize_size=36, interpolation="bicubic")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def forking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the early start run in this (torch-loaded) test process: the child only uses PIL and numpy."""
    if not sys.platform.startswith("linux"):
        pytest.skip("early crops fork: Linux only")
    monkeypatch.setattr("resnet_transfer.images.early.early_worthwhile", lambda: True)


def odd_folder(root: Path) -> tuple[Path, dict[str, str]]:
    expect = write_odd_images(root / "mixed")
    make_image_folder(root, per_class=3, seed=5, classes=("plain",))
    return root, expect


def test_crops_equal_the_feed_and_odd_files_are_left_to_it(tmp_path: Path, forking: None) -> None:
    data, expect = odd_folder(tmp_path / "data")
    images = list_images(data)
    crops = early_crops(images, TC)
    assert crops is not None
    made = crops.wait()
    transform = eval_transform_uint8(TC)
    taken = 0
    for i, rel in enumerate(images.paths):
        crop = crops.take(images, i)
        if expect.get(Path(rel).name) == "skip":
            assert crop is None, rel  # the feed decodes it again and reports it as always
            continue
        assert crop is not None, rel
        assert np.array_equal(crop, transform(load_image(images.file(i), draft=TC.draft_target())).numpy()), rel
        assert crops.take(images, i) is None  # handed over once
        taken += 1
    assert taken == made == sum(k == "ok" for k in expect.values()) + 3
    crops.close()
    assert crops.take(images, 0) is None


def test_a_changed_file_or_another_root_is_not_taken(tmp_path: Path, forking: None) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2)
    images = list_images(data)
    crops = early_crops(images, TC)
    assert crops is not None and crops.wait() == len(images)
    path = images.file(0)
    path.write_bytes(path.read_bytes())  # same bytes, new mtime and maybe inode: not the file the child read
    os.utime(path, ns=(1, 1))
    assert crops.take(images, 0) is None
    elsewhere = list_images(make_image_folder(tmp_path / "copy", per_class=2))
    assert crops.take(elsewhere, 1) is None
    assert crops.take(images, 1) is not None
    crops.close()
    crops.close()  # idempotent


def test_budget_and_fit(tmp_path: Path, forking: None) -> None:
    images = list_images(make_image_folder(tmp_path / "data", per_class=4))
    crops = early_crops(images, TC, budget=3 * 32 * 32 * 5)  # room for five crops
    assert crops is not None and crops.wait() == 5
    assert crops.fits(TC, None) and not crops.fits(TC.with_size(48), None) and not crops.fits(TC, 1000)
    crops.close()
    assert early_crops(images, TC, budget=100) is None  # not even one fits


def test_not_started_where_it_cannot_help(image_folder: Path) -> None:
    assert "torch" in sys.modules and not early_worthwhile()  # forking after torch started is not safe
    assert early_crops(list_images(image_folder), TC) is None


def test_a_fresh_process_starts_it_without_loading_torch(image_folder: Path) -> None:
    code = (
        "import sys\n"
        "from resnet_transfer.images import TransformConfig, early_crops, list_images\n"
        f"c = early_crops(list_images({str(image_folder)!r}), TransformConfig(32, 36))\n"
        "n = c.wait() if c is not None else -1\n"
        "c is not None and c.close()\n"
        "print(n, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    expected = "24 False" if len(os.sched_getaffinity(0)) >= 2 and sys.platform.startswith("linux") else "-1 False"
    assert out.stdout.split("\n")[0] == expected, out.stderr


def test_extract_with_an_early_start_writes_the_same_cache(
    tmp_path: Path, forking: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RT_SPEED_RECORDS", str(tmp_path / "records.json"))  # no transform recalled yet
    data, _ = odd_folder(tmp_path / "data")
    started: list = []

    def start_and_finish(*args, **kw):  # wait for the child, so that the feed surely takes its crops
        crops = early_crops(*args, **kw)
        if crops is not None:
            crops.wait()
            started.append(crops)
        return crops

    monkeypatch.setattr("resnet_transfer.images.early.early_crops", start_and_finish)
    common = {"data": data, "model": "resnet18", "weights": "none", "image_size": 32, "compile": "off"}
    plain = extract(ExtractConfig(out=tmp_path / "plain.h5", **common))
    assert not started
    early = extract(ExtractConfig(out=tmp_path / "early.h5", **common))
    assert len(started) == 1 and started[0].used == plain.computed
    assert early.skipped == plain.skipped and early.computed == plain.computed
    a, b = FeatureCache(tmp_path / "plain.h5"), FeatureCache(tmp_path / "early.h5")
    assert a.paths == b.paths and a.keys == b.keys
    assert np.array_equal(a.features(), b.features())
    extract(ExtractConfig(out=tmp_path / "early.h5", **common))  # an existing cache: the plan decides, no early start
    assert len(started) == 1
