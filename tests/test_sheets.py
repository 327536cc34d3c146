"""Contact sheets: a labelled grid of the listed images, grey tiles for missing ones, and the choice of the
most confidently wrong rows for `rt evaluate --worst`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from planted import write_cache, write_images

from resnet_transfer.cache import FeatureCache
from resnet_transfer.images import contact_sheet, image_root, most_confidently_wrong, plot_top_losses, resolve


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
        assert image_root(fc) == tmp_path / "data"  # next to the cache
        assert image_root(fc, tmp_path / "elsewhere") == tmp_path / "elsewhere"
        assert resolve(fc.paths, image_root(fc))[0] == (tmp_path / "data" / "c" / "i0.png").resolve()
    assert resolve(["a.png"], None) == [None]
