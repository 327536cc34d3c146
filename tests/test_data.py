from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from resnet_transfer.base import DataError
from resnet_transfer.images import (
    ImageDecodeError,
    TransformConfig,
    eval_transform,
    list_images,
    load_image,
    tta_transform,
)
from tests.conftest import examples
from tests.odd_images import write_odd_images


def test_folder_layout(image_folder: Path) -> None:
    images = list_images(image_folder)
    assert images.classes == ["circle", "square", "triangle"]
    assert len(images) == 24
    assert images.counts() == {"circle": 8, "square": 8, "triangle": 8}
    assert all(not Path(p).is_absolute() for p in images.paths)
    # extensions in any case are found (.JPG is one of the fixture's formats)
    assert any(p.endswith(".JPG") for p in images.paths)


def test_nested_folders_unicode_and_litter(tmp_path: Path) -> None:
    (tmp_path / "chat noir" / "2024" / "été").mkdir(parents=True)
    (tmp_path / "chien").mkdir()
    (tmp_path / "empty").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "chat noir" / "2024" / "été" / "猫.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "chien" / "a.jpg")
    (tmp_path / "chien" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "chien" / "Thumbs.db").write_bytes(b"x")
    (tmp_path / "chien" / "notes.txt").write_text("x")
    images = list_images(tmp_path)
    assert images.classes == ["chat noir", "chien"]
    assert images.paths == ["chat noir/2024/été/猫.png", "chien/a.jpg"]
    assert any("empty" in n for n in images.notes)


def test_loose_folder_is_unlabelled(tmp_path: Path) -> None:
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    images = list_images(tmp_path)
    assert images.labels == [-1, -1, -1] and images.classes == []


def test_manifest(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for n in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f"{n}.png")
    (tmp_path / "m.csv").write_text("path,label\nimg/a.png,cat\nimg/b.png,dog\nimg/c.png,\n")
    images = list_images(tmp_path / "m.csv")
    assert images.classes == ["cat", "dog"]
    assert images.labels == [0, 1, -1]
    assert images.paths == ["img/a.png", "img/b.png", "img/c.png"]


def test_manifest_cannot_escape_its_folder(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (sub / "m.csv").write_text("../outside.png,cat\n")
    with pytest.raises(DataError, match="outside the manifest"):
        list_images(sub / "m.csv")
    images = list_images(sub / "m.csv", allow_outside=True)
    assert images.paths == [(tmp_path / "outside.png").resolve().as_posix()]


def test_manifest_errors_name_the_row(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("a.png,cat,extra\n")
    with pytest.raises(DataError, match="row 1"):
        list_images(tmp_path / "m.csv")
    (tmp_path / "e.csv").write_text("path,label\n")
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path / "e.csv")


def test_missing_path_and_unknown_class(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        list_images(tmp_path / "nope")
    with pytest.raises(DataError, match="not classes of the model"):
        list_images(image_folder, classes=["circle", "square"])


def test_odd_images_decode_or_skip_with_reason(tmp_path: Path) -> None:
    expect = write_odd_images(tmp_path)
    for name, kind in expect.items():
        if kind == "ok":
            img = load_image(tmp_path / name)
            assert img.mode == "RGB", name
        else:
            with pytest.raises(ImageDecodeError) as info:
                load_image(tmp_path / name)
            assert str(info.value), name
    # EXIF orientation applied: the 40x30 original is stored rotated
    assert load_image(tmp_path / "exif_rotated.jpg").size == (30, 40)
    # a transparent pixel is composited on white, not black
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    # 16-bit PNG keeps its contrast after scaling to 8 bits
    assert max(load_image(tmp_path / "deep16.png").getextrema()[0]) > 200


def test_decompression_bomb_limit(tmp_path: Path) -> None:
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageDecodeError, match="too large"):
        load_image(tmp_path / "big.png", max_pixels=10_000)


def test_tiny_image_goes_through_eval_transform(tmp_path: Path) -> None:
    Image.new("RGB", (3, 2), (10, 20, 30)).save(tmp_path / "t.png")
    t = eval_transform(TransformConfig(input_size=32, resize_size=36))
    assert tuple(t(load_image(tmp_path / "t.png")).shape) == (3, 32, 32)


def test_tta_shapes() -> None:
    cfg = TransformConfig(input_size=32, resize_size=36)
    img = Image.new("RGB", (50, 40))
    assert tuple(tta_transform(cfg, "flip")(img).shape) == (2, 3, 32, 32)
    assert tuple(tta_transform(cfg, "tencrop")(img).shape) == (10, 3, 32, 32)


_name = st.text(
    alphabet=st.characters(whitelist_categories=("L", "N"), whitelist_characters="_- "), min_size=1, max_size=12
)


@settings(max_examples=examples(40), deadline=None)
@given(
    rows=st.lists(st.tuples(_name, st.one_of(st.just(""), _name)), min_size=1, max_size=15, unique_by=lambda r: r[0])
)
def test_manifest_parser_roundtrip(tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[str, str]]) -> None:
    """Any list of (file, label) rows written as CSV parses back to the same paths and labels."""
    import csv

    root = tmp_path_factory.mktemp("m")
    rows = [(f"{name.strip() or 'x'}_{i}.png", label.strip()) for i, (name, label) in enumerate(rows)]
    with open(root / "m.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    images = list_images(root / "m.csv")
    assert images.paths == [p for p, _ in rows]
    names = [images.classes[y] if y >= 0 else "" for y in images.labels]
    assert names == [label for _, label in rows]
    assert images.classes == sorted({label for _, label in rows if label})


def test_skip_reason_describes_the_content_not_the_path(tmp_path: Path) -> None:
    """PIL names the open file in its message; the recorded reason does not (the same bytes under two
    paths give one reason, and a cache holds no machine path)."""
    reasons = set()
    for name in ("a/x.jpg", "b/y.png"):
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).write_bytes(b"not an image")
        with pytest.raises(ImageDecodeError) as err:
            load_image(tmp_path / name)
        reasons.add(str(err.value))
    assert reasons == {"not a readable image (UnidentifiedImageError: cannot identify image file)"}


def test_unreadable_file_is_a_skip_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission errors (simulated: the suite may run as root, which reads anything)."""
    Image.new("RGB", (8, 8)).save(tmp_path / "locked.png")

    def denied(*_a: object, **_k: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("resnet_transfer.images.data.open", denied, raising=False)
    with pytest.raises(ImageDecodeError, match="permission denied"):
        load_image(tmp_path / "locked.png")


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A photo-like image: a smooth field, mid-scale texture and sensor noise, through JPEG."""
    import io

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(base, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_fused_resize_crop_matches_torchvision(interpolation: str) -> None:
    from torchvision import transforms as T

    from resnet_transfer.images import ResizeCenterCrop, interpolation_mode

    sizes = [(500, 375), (375, 500), (300, 800), (800, 300), (256, 256), (640, 481), (227, 300), (1000, 999)]
    for resize, crop in [(256, 224), (146, 128)]:
        ref = T.Compose([T.Resize(resize, interpolation=interpolation_mode(interpolation)), T.CenterCrop(crop)])
        fused = ResizeCenterCrop(resize, crop, interpolation)
        for k, (w, h) in enumerate(sizes):
            img = _photo(w, h, seed=k)
            a = np.asarray(ref(img), dtype=np.int16)
            b = np.asarray(fused(img), dtype=np.int16)
            assert a.shape == b.shape == (crop, crop, 3)
            diff = np.abs(a - b)
            # the same resampling; only PIL's 8-bit rounding between its passes may differ: a few percent
            # of pixels by 1, about a fifth on tall images where PIL runs the vertical pass first
            assert diff.max() <= 2, (w, h, resize, crop)
            assert diff.mean() < 0.35, (w, h, resize, crop)


def test_fused_resize_crop_falls_back_where_it_must() -> None:
    from torchvision import transforms as T

    from resnet_transfer.images import ResizeCenterCrop, interpolation_mode

    # an input smaller than the crop after resizing (padding) and the knife-edge filters: torchvision's
    # own two steps, so the result is exactly theirs
    cases = [((3, 2), 36, 32, "bicubic"), ((50, 40), 30, 32, "bilinear"), ((500, 375), 256, 224, "nearest")]
    for (w, h), resize, crop, interp in cases:
        img = _photo(w, h, seed=1)
        ref = T.Compose([T.Resize(resize, interpolation=interpolation_mode(interp)), T.CenterCrop(crop)])(img)
        assert np.array_equal(np.asarray(ResizeCenterCrop(resize, crop, interp)(img)), np.asarray(ref))


def test_uint8_path_equals_float_path() -> None:
    import torch

    from resnet_transfer.images import eval_transform_uint8, normalize_batch

    cfg = TransformConfig(input_size=64, resize_size=73, interpolation="bicubic")
    imgs = [_photo(120, 90, 0), _photo(90, 160, 1)]
    floats = torch.stack([eval_transform(cfg)(im) for im in imgs])
    u8 = torch.stack([eval_transform_uint8(cfg)(im) for im in imgs])
    assert u8.dtype == torch.uint8
    out = normalize_batch(u8, cfg, memory_format=torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, floats, atol=1e-5)


@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_uint8_train_transform_draws_and_crops_as_the_float_one(jitter: float) -> None:
    import numpy as np
    import torch

    from resnet_transfer.images import collate, normalize_batch, train_transform, train_transform_uint8

    cfg = TransformConfig(input_size=32, resize_size=36, interpolation="bilinear")
    imgs = [_photo(120, 90, 0), _photo(90, 160, 1), _photo(64, 64, 2)]
    torch.manual_seed(3)
    floats = torch.stack([train_transform(cfg, jitter, 0.2, True)(im) for im in imgs])
    after_float = torch.rand(1)
    torch.manual_seed(3)
    tf = train_transform_uint8(cfg, jitter, 0.2, True)
    # a PIL image or the uint8 array ImageDataset keeps for it: the same crop
    items = [(tf(im if k % 2 else np.array(im)), k, "") for k, im in enumerate(imgs)]
    assert torch.equal(torch.rand(1), after_float)  # the same random draws, no more, no fewer
    u8, idx, errors = collate(items)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 3, 32, 32) and idx == [0, 1, 2] and errors == ["", "", ""]
    assert u8.is_contiguous(memory_format=torch.channels_last)  # stacked straight into the model's layout
    out = normalize_batch(u8, cfg, torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # torch's antialiased resize (and tensor jitter) instead of PIL's: within 3 levels of 255, rarely off
    levels = ((out - floats) * torch.tensor(cfg.std).view(1, 3, 1, 1) * 255).abs()
    assert levels.max() <= 3.01 and levels.mean() < 0.5


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_iter_batches_in_order_with_errors(tmp_path: Path, threads: int) -> None:
    from resnet_transfer.images import ImageDataset, eval_transform_uint8, iter_batches

    (tmp_path / "a").mkdir()
    for i in range(11):
        _photo(40 + i, 30, i).save(tmp_path / "a" / f"{i:02d}.png")
    (tmp_path / "a" / "05.png").write_bytes(b"not a png")  # a bad file mid-batch
    ds = ImageDataset(list_images(tmp_path), eval_transform_uint8(TransformConfig(16, 18)))
    batches = list(iter_batches(ds, 4, threads))
    assert [idx for _, idx, _ in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    errors = [e for _, _, errs in batches for e in errs]
    assert [bool(e) for e in errors] == [i == 5 for i in range(11)]
    assert [tuple(x.shape) for x, _, _ in batches] == [(4, 3, 16, 16), (3, 3, 16, 16), (3, 3, 16, 16)]
    serial = list(iter_batches(ds, 4, 0))
    assert all(bool((x == y).all()) for (x, _, _), (y, _, _) in zip(batches, serial))
    # a consumer that stops early (an exception, Ctrl-C) closes the pool without waiting for the rest
    gen = iter_batches(ds, 2, threads)
    next(gen)
    gen.close()


def test_decode_threads_yield_to_the_forward_pass() -> None:
    import os
    import threading
    import time

    import torch

    from resnet_transfer.images import iter_batches

    main = threading.get_native_id()
    main_priority = os.getpriority(os.PRIO_PROCESS, main)
    seen: dict[int, tuple[int, int]] = {}

    class Probe:  # records which thread decoded each item, at what priority; the pool's threads are slow
        def __len__(self) -> int:
            return 12

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
            tid = threading.get_native_id()
            seen[i] = (tid, os.getpriority(os.PRIO_PROCESS, tid))
            if tid != main:
                time.sleep(0.05)
            return torch.full((3, 2, 2), i, dtype=torch.uint8), i, ""

    batches = list(iter_batches(Probe(), 6, threads=1))  # type: ignore[arg-type]
    assert [idx for _, idx, _ in batches] == [list(range(6)), list(range(6, 12))]
    assert [int(x[k, 0, 0, 0]) for x, _, _ in batches for k in range(6)] == list(range(12))
    by_pool = [p for tid, p in seen.values() if tid != main]
    by_caller = [p for tid, p in seen.values() if tid == main]
    assert by_pool and by_caller  # the thread decodes from the head, the waiting caller steals from the tail
    if hasattr(os, "sched_getaffinity"):  # Linux: per-thread nice
        assert set(by_pool) == {19}
    assert set(by_caller) == {main_priority}  # the caller keeps its priority
    assert os.getpriority(os.PRIO_PROCESS, main) == main_priority


def test_flip_tta_views_are_the_eval_view_and_its_mirror() -> None:
    import torch

    cfg = TransformConfig(input_size=64, resize_size=73, interpolation="bicubic")
    img = _photo(120, 90, 3)
    views = tta_transform(cfg, "flip")(img)
    plain = eval_transform(cfg)(img)
    assert torch.equal(views[0], plain)
    assert torch.equal(views[1], plain.flip(-1))


def test_class_order_and_remapping() -> None:
    from resnet_transfer.images import class_index_map, class_order, extended_class_order, remap_labels

    assert class_order({"b", "a"}) == ["a", "b"]
    assert class_order({"b"}, ["b", "a"]) == ["b", "a"]
    with pytest.raises(DataError, match="labels x are not classes"):
        class_order({"x", "a"}, ["a"], "labels")
    assert extended_class_order(["z", "a"], ["a", "c", "b", "z"]) == ["z", "a", "b", "c"]
    assert class_index_map(["a", "b", "c"], ["c", "a"]).tolist() == [1, -1, 0]
    assert remap_labels([0, 2, -1, 1], ["a", "b", "c"], ["c", "a"]).tolist() == [1, 0, -1, -1]
    assert remap_labels([-1], [], ["a"]).tolist() == [-1]


@pytest.mark.parametrize("view", [None, "flip"])
def test_normalized_batches_channels_last_with_errors(tmp_path: Path, view: str | None) -> None:
    import torch

    from resnet_transfer.images import eval_transform, normalized_batches

    for i in range(3):
        Image.new("RGB", (40 + 7 * i, 30), (30 * i, 90, 200)).save(tmp_path / f"{i}.png")
    (tmp_path / "1b.png").write_bytes(b"broken")
    images = list_images(tmp_path)
    cfg = TransformConfig(input_size=16, resize_size=20)
    got = list(normalized_batches(images, cfg, 2, torch.device("cpu"), view=view))
    assert [idx for _, idx, _ in got] == [[0, 1], [2, 3]]
    assert [bool(e) for _, _, errs in got for e in errs] == [False, False, True, False]  # 1b.png is third
    x = got[0][0]
    assert x.shape == (2 * (2 if view else 1), 3, 16, 16) and x.dtype == torch.float32  # 2 images x views
    assert x.is_contiguous(memory_format=torch.channels_last)
    expected = eval_transform(cfg)(load_image(tmp_path / "0.png"))
    assert torch.allclose(x[0], expected, atol=1e-5)
    if view:
        assert torch.allclose(x[1], expected.flip(-1), atol=1e-5)


def test_kept_decoded_images_give_the_same_items_without_the_files(tmp_path: Path) -> None:
    """``keep_decoded``: later epochs use the decoded image kept in memory (the file is not read again) and
    get exactly what decoding gives; over the budget, images are decoded each time as before."""
    import torch

    from resnet_transfer.images import ImageDataset, TransformConfig, train_transform

    (tmp_path / "a").mkdir()
    for i in range(4):
        _photo(40 + i, 30, i).save(tmp_path / "a" / f"{i}.png")
    tf = train_transform(TransformConfig(16, 18), 0.0, 0.35, True)
    kept = ImageDataset(list_images(tmp_path), tf, keep_decoded=1 << 20)
    plain = ImageDataset(list_images(tmp_path), tf)
    small = ImageDataset(list_images(tmp_path), tf, keep_decoded=(40 + 41) * 30 * 3)  # room for the first two
    first = []
    for ds in (kept, plain, small):
        torch.manual_seed(0)
        first.append([ds[i][0] for i in range(4)])
    assert all(torch.equal(a, b) for a, b in zip(first[0], first[1]))
    for f in (tmp_path / "a").iterdir():
        f.unlink()
    torch.manual_seed(1)
    again = [kept[i] for i in range(4)]
    assert all(not e for _, _, e in again) and not torch.equal(again[0][0], first[0][0])  # a new random crop
    assert [bool(small[i][2]) for i in range(4)] == [False, False, True, True]  # only two were kept
