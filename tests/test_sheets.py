"""Contact sheets: a labelled grid of the listed images, grey tiles for missing ones, and the choice of the
most confidently wrong rows for `rt evaluate --worst`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from planted import write_cache, write_images

from resnet_transfer.base import DataError
from resnet_transfer.cache import FeatureCache
from resnet_transfer.images import (
    contact_sheet,
    image_root,
    most_confidently_wrong,
    plot_top_losses,
    resolve,
    root_attrs,
)


def test_sheet_is_a_grid_of_the_images(tmp_path: Path) -> None:
    write_images(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    items = [(tmp_path / n, f"caption {n}") for n in ("a.png", "b.png", "c.png", "broken.png")]
    items.append((None, "missing"))
    out = contact_sheet(items, tmp_path / "sheet.png", thumb=40, cols=3, title="five")
    img = Image.open(out)
    assert img.size[0] == 3 * 44 + 4 and img.size[1] > 2 * 40  # 3 columns, 2 rows
    px = np.asarray(img.convert("RGB")).astype(float)
    pitch = 40 + 2 * 12 + 4 + 4  # tile, two caption lines, gaps
    first = px[22 : 22 + 40, 4 : 4 + 40]
    missing = px[22 + pitch : 22 + pitch + 40, 48 : 48 + 40]  # row 1, column 1
    assert first.std() > 30  # the random pixels of a.png, scaled to the tile
    assert missing.std() == 0 and missing.mean() == 235  # a plain grey tile


def test_most_confidently_wrong_order() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.95, 0.05]])
    y = np.array([1, 1, 0, 1])  # rows 0, 2, 3 are wrong; 3 most confidently
    assert most_confidently_wrong(y, probs, 5).tolist() == [3, 0, 2]
    assert most_confidently_wrong(y, probs, 1).tolist() == [3]


def test_top_losses_rows_name_true_and_predicted(tmp_path: Path) -> None:
    write_images(tmp_path, ["x.png", "y.png"])
    probs = np.array([[0.3, 0.7], [0.9, 0.1]])
    rows = plot_top_losses(
        [tmp_path / "x.png", tmp_path / "y.png"], [0, 0], probs, ["cat", "dog"], 3, tmp_path / "w.png"
    )
    assert rows == [
        {
            "path": str(tmp_path / "x.png"),
            "true": "cat",
            "predicted": "dog",
            "probability": 0.7,
            "probability_of_true": 0.3,
        }
    ]
    assert (tmp_path / "w.png").exists()


def test_image_root_finds_where_relative_paths_lead(tmp_path: Path) -> None:
    write_images(tmp_path / "data", ["c/i0.png"])
    cache = write_cache(tmp_path / "data" / "f.h5", np.ones((1, 3)), [0], ["c"], ["c/i0.png"])
    with FeatureCache(cache) as fc:
        assert image_root(fc).folder == tmp_path / "data"  # next to the cache
        given = image_root(fc, tmp_path / "elsewhere")
        assert given.folder == tmp_path / "elsewhere" and given.how == "--root" and not given.found
        assert image_root(fc).resolve(fc.paths)[0] == (tmp_path / "data" / "c" / "i0.png").resolve()
    assert resolve(["a.png"], None) == [None]


def _cache(path: Path, paths: list[str], **attrs: str) -> SimpleNamespace:
    """What image_root reads of a cache: its file, row paths and attributes."""
    return SimpleNamespace(path=path, paths=paths, attrs=attrs)


def test_image_root_uses_the_recorded_folder_then_its_place_next_to_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "a" / "unlabelled", ["x.png", "y.png"])
    (tmp_path / "elsewhere").mkdir()
    attrs = root_attrs(tmp_path / "a" / "unlabelled", tmp_path / "a" / "elsewhere" / "pool.h5")
    assert attrs == {"root": str(tmp_path / "a" / "unlabelled"), "root_relative": "../unlabelled"}
    cache = _cache(tmp_path / "elsewhere" / "pool.h5", ["x.png", "y.png"], **attrs)
    found = image_root(cache)
    assert found.folder == tmp_path / "a" / "unlabelled" and found.found  # the recorded folder
    # the data folder and its cache moved together: the recorded folder is gone, its place next to the
    # cache leads to the images
    (tmp_path / "a").rename(tmp_path / "b")
    moved = _cache(tmp_path / "b" / "elsewhere" / "pool.h5", ["x.png", "y.png"], **attrs)
    (tmp_path / "b" / "elsewhere").mkdir()
    found = image_root(moved)
    assert found.folder == tmp_path / "b" / "unlabelled" and found.found
    assert next(p for p, _ in found.looked_in) == tmp_path / "a" / "unlabelled"
    assert image_root(moved).resolve(["x.png"])[0] == (tmp_path / "b" / "unlabelled" / "x.png").resolve()


def test_image_root_says_which_folders_it_looked_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cache = _cache(tmp_path / "c" / "pool.h5", ["x.png"], root=str(tmp_path / "gone"), root_relative="../lost")
    found = image_root(cache)
    assert found.folder is None and not found.found
    assert [p for p, _ in found.looked_in] == [tmp_path / "gone", tmp_path / "lost", tmp_path / "c", tmp_path]
    with pytest.raises(DataError) as info:
        found.require("--pool pool.h5")
    text = str(info.value)
    assert text.startswith("--pool pool.h5: its images were not found (looked in ")
    assert all(str(p) in text for p, _ in found.looked_in) and "pass --root" in text
    assert image_root(_cache(tmp_path / "c.h5", ["/abs/x.png"])).folder == Path("/")  # absolute paths
