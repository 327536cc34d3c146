"""Images where they live: zip / tar / tar.gz of a class-folder tree, WebDataset shards, a Hugging Face
dataset (save_to_disk) and Parquet, each written with the library users write it with, from the conftest
image folder; the cache of each must equal the folder's, row by row."""

from __future__ import annotations

import pickle
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from resnet_transfer.cache import ExtractConfig, FeatureCache, extract
from resnet_transfer.cli import app
from resnet_transfer.images import contact_sheet, image_root, list_images, load_image
from tests.conftest import make_image_folder

runner = CliRunner()


def _extract(data: object, out: Path) -> object:
    cfg = ExtractConfig(
        data=data,
        out=out,
        model="resnet18",
        weights="none",
        image_size=32,
        precision="fp32",
        dtype="float32",
        batch_size=8,
        workers=0,
    )
    return extract(cfg)


def write_zip(folder: Path, out: Path, extra: dict[str, bytes] | None = None) -> Path:
    listing = list_images(folder)
    with zipfile.ZipFile(out, "w") as z:
        for p in listing.paths:
            z.write(folder / p, p)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return out


def write_tar(folder: Path, out: Path, mode: str = "w") -> Path:
    listing = list_images(folder)
    with tarfile.open(out, mode) as t:
        for p in listing.paths:
            t.add(folder / p, p)
    return out


def write_shards(folder: Path, pattern: str, maxcount: int = 10, start: int = 0, offset: int = 0) -> list[Path]:
    """WebDataset shards of ``folder`` (webdataset's ShardWriter); ``cls`` as the class name, every third
    sample's label in a ``json`` entry instead."""
    import webdataset as wds

    listing = list_images(folder)
    written = []
    with wds.ShardWriter(pattern, maxcount=maxcount, start_shard=start, verbose=0) as sink:
        for i, p in enumerate(listing.paths):
            sample = {"__key__": f"{offset + i:06d}", Path(p).suffix.lower()[1:]: (folder / p).read_bytes()}
            name = listing.classes[listing.labels[i]]
            sample.update({"json": {"label": name}} if i % 3 == 2 else {"cls": name})
            sink.write(sample)
            written.append(sink.fname)
    return sorted({Path(f) for f in written})


def hf_dataset(folder: Path) -> object:
    import datasets

    listing = list_images(folder)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=listing.classes)})
    rows = {
        "image": [{"bytes": (folder / p).read_bytes(), "path": p} for p in listing.paths],
        "label": listing.labels,
    }
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture(scope="module")
def folder_cache(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("folder") / "folder.h5"
    _extract(image_folder, out)
    return out


def _make(kind: str, folder: Path, where: Path) -> str:
    if kind == "zip":
        return str(write_zip(folder, where / "data.zip"))
    if kind == "tar":
        return str(write_tar(folder, where / "data.tar"))
    if kind == "tar.gz":
        return str(write_tar(folder, where / "data.tar.gz", "w:gz"))
    if kind in ("wds", "wds-pattern"):
        (where / "shards").mkdir()
        shards = write_shards(folder, str(where / "shards" / "train-%03d.tar"))
        return (
            str(where / "shards")
            if kind == "wds"
            else str(where / "shards" / f"train-{{000..{len(shards) - 1:03d}}}.tar")
        )
    ds = hf_dataset(folder)
    if kind == "hf":
        ds.save_to_disk(str(where / "hfds"))
        return str(where / "hfds")
    (where / "pq").mkdir()
    ds.to_parquet(str(where / "pq" / "train.parquet"))
    return str(where / "pq")


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "wds", "wds-pattern", "hf", "parquet"])
def test_each_source_gives_the_folders_cache_row_by_row(
    kind: str, image_folder: Path, folder_cache: Path, tmp_path: Path
) -> None:
    data = _make(kind, image_folder, tmp_path)
    out = tmp_path / "src.h5"
    res = _extract(data, out)
    assert res.computed == 24 and not res.skipped
    with FeatureCache(folder_cache) as want, FeatureCache(out) as got:
        assert got.attrs["source"] == kind.split("-")[0].replace("tar.gz", "tar")
        assert got.classes == want.classes
        assert list(got.keys) == list(want.keys)  # a member's key is its file's key
        assert np.array_equal(got.labels, want.labels)
        assert np.array_equal(got.features(), want.features())
        listing = list_images(data)  # torchrun ranks and spawned workers get it pickled: the source reopens
        clone = pickle.loads(pickle.dumps(listing.subset([5])))
        assert clone.digest(0) == listing.digest(5) == got.keys[5]
        found = image_root(got)  # review, audit and sheets find the images through the same reader
        assert found.found and found.reader is not None
        member = found.resolve([got.paths[0]])[0]
        assert load_image(member).size == load_image(image_folder / want.paths[0]).size


def test_a_second_extract_computes_nothing_and_a_new_shard_only_its_images(image_folder: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shards(image_folder, str(shards / "train-%03d.tar"))
    out = tmp_path / "f.h5"
    assert _extract(shards, out).computed == 24
    again = _extract(shards, out)
    assert again.computed == 0 and again.changes["unchanged"] == 24
    with FeatureCache(out) as fc:
        before = fc.labels.copy()
    more = make_image_folder(tmp_path / "more", per_class=2, seed=7, classes=("circle", "star"))  # a new class
    write_shards(more, str(shards / "train-%03d.tar"), start=3, offset=1000)
    added = _extract(shards, out)
    assert added.computed == 4 and added.changes["added"] == 4 and added.changes["unchanged"] == 24
    with FeatureCache(out) as fc:
        assert fc.classes == ["circle", "square", "triangle", "star"]  # the cache's class ids stay
        assert np.array_equal(fc.labels[:24], before) and all(p.startswith("train-003.tar/") for p in fc.paths[24:])


def test_a_corrupt_member_is_skipped_and_listed_by_member_name(image_folder: Path, tmp_path: Path) -> None:
    data = write_zip(image_folder, tmp_path / "d.zip", {"square/broken.jpg": b"\xff\xd8 not a jpeg"})
    out = tmp_path / "f.h5"
    res = _extract(data, out)
    assert [p for p, _ in res.skipped] == ["square/broken.jpg"]
    assert "not a readable image" in res.skipped[0][1]
    info = runner.invoke(app, ["info", str(out), "--skipped"])
    assert "square/broken.jpg" in info.output


def test_sheets_and_review_read_members(image_folder: Path, tmp_path: Path) -> None:
    from resnet_transfer.tools.review.files import ImageFiles
    from resnet_transfer.tools.review.thumbs import ThumbCache

    data = write_tar(image_folder, tmp_path / "d.tar")
    out = tmp_path / "f.h5"
    _extract(data, out)
    with FeatureCache(out) as fc:
        found = image_root(fc)
        files = found.resolve(fc.paths[:4])
        sheet = contact_sheet([(f, "x") for f in files], tmp_path / "sheet.png")
        assert sheet.is_file()
        served = ImageFiles(found.folder, fc.paths, found.reader)
        member = served.servable_path(fc.paths[1])
        assert member is not None and member.read() == (image_folder / fc.paths[1]).read_bytes()
        assert served.servable_path("circle/not-there.jpg") is None
        thumb = ThumbCache(tmp_path / "thumbs").get(member, 64)
        assert thumb.is_file()


@pytest.mark.parametrize(("module", "extra", "make"), [("webdataset", "wds", "wds"), ("datasets", "hf", "hf")])
def test_a_missing_extra_is_a_clear_error(
    module: str, extra: str, make: str, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _make(make, image_folder, tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as when not installed
    r = runner.invoke(app, ["extract", "--data", data, "--out", str(tmp_path / "f.h5"), "--weights", "none"])
    assert r.exit_code == 2
    assert f"pip install 'resnet_transfer[{extra}]'" in r.output and module in r.output


def test_cls_indices_name_classes_by_number_and_samples_group_by_key(tmp_path: Path, image_folder: Path) -> None:
    import webdataset as wds

    data = list_images(image_folder)
    with wds.TarWriter(str(tmp_path / "one.tar")) as sink:
        for i in range(12):
            p = data.paths[i]
            sink.write({"__key__": f"a/{i:03d}", "jpg": (image_folder / p).read_bytes(), "cls": i % 2 * 10 + 2})
        sink.write({"__key__": "a/lonely", "cls": 1})  # no image: ignored, with a note
    got = list_images(tmp_path / "one.tar")
    assert got.source == "wds" and got.classes == ["2", "12"] and len(got) == 12
    assert got.paths[0] == "one.tar/a/000.jpg" and any("without an image" in n for n in got.notes)


def test_a_manifest_beside_the_folder_relabels_and_moves_nothing(image_folder: Path, tmp_path: Path) -> None:
    """The roots bug: `rt review` wrote its manifest beside (not inside) the image folder with one image
    relabelled; `rt extract --data fixes.csv` said "relabelled 0, moved 24". The files are the same files."""
    import shutil

    shutil.copytree(image_folder, tmp_path / "data" / "pets")
    out = tmp_path / "pets.h5"
    _extract(tmp_path / "data" / "pets", out)
    listing = list_images(tmp_path / "data" / "pets")
    rows = [f"pets/{p},{listing.classes[y]}" for p, y in zip(listing.paths, listing.labels)]
    rows[0] = f"pets/{listing.paths[0]},triangle"  # was circle
    (tmp_path / "data" / "fixes.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    res = _extract(tmp_path / "data" / "fixes.csv", out)
    assert res.computed == 0
    assert res.changes == {"added": 0, "changed": 0, "removed": 0, "relabelled": 1, "moved": 0, "unchanged": 23}
    with FeatureCache(out) as fc:
        assert fc.paths[0] == f"pets/{listing.paths[0]}" and fc.classes[fc.labels[0]] == "triangle"
        assert image_root(fc).found


def test_a_moved_file_with_a_new_label_counts_as_relabelled() -> None:
    from resnet_transfer.cache import changes

    old = [("a/1.jpg", "k1", "cat"), ("a/2.jpg", "k2", "cat"), ("a/3.jpg", "k3", "cat")]
    new = [("b/1.jpg", "k1", "dog"), ("b/2.jpg", "k2", "cat"), ("a/3.jpg", "k9", "dog")]
    assert changes(old, new) == {
        "added": 0,
        "changed": 0,
        "removed": 0,
        "relabelled": 2,
        "moved": 1,
        "unchanged": 0,
    }


def _review(cache: Path, tmp_path: Path, manifest: Path | None = None) -> tuple[object, object]:
    from starlette.testclient import TestClient

    from resnet_transfer.tools.review import ReviewConfig, ThumbCache, build_state, create_app

    state = build_state(ReviewConfig(cache=cache, manifest=manifest))
    client = TestClient(create_app(state, "t", {"testserver"}, ThumbCache(tmp_path / "thumbs")))
    client.get("/", params={"token": "t"})  # as the browser: the printed URL, then the cookie
    return state, client


def test_review_with_its_manifest_beside_the_folder_then_extract_says_relabelled_1(
    image_folder: Path, tmp_path: Path
) -> None:
    """The issue's path as a new user takes it: `rt review --manifest fixes.csv` beside the image folder."""
    import shutil

    data = tmp_path / "data" / "pets"
    shutil.copytree(image_folder, data)
    cache = tmp_path / "pets.h5"
    _extract(data, cache)
    state, client = _review(cache, tmp_path, tmp_path / "data" / "fixes.csv")
    rows = {r["path"]: r["row"] for r in client.get("/api/rows", params={"limit": 500}).json()["rows"]}
    path = next(p for p in rows if p.startswith("circle/"))
    r = client.post("/api/label", json={"row": rows[path], "label": "square"}, headers={"X-RT-Token": "t"})
    assert r.status_code == 200
    state.manifest.close()
    res = _extract(tmp_path / "data" / "fixes.csv", cache)
    assert res.computed == 0 and res.summary.startswith("added 0, changed 0, removed 0, relabelled 1, moved 0")


def test_review_shows_the_images_of_a_zip(image_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "z.h5"
    _extract(write_zip(image_folder, tmp_path / "d.zip"), cache)
    state, client = _review(cache, tmp_path)
    assert state.images.found == state.images.sampled > 0
    assert any("members of" in n for n in state.notes)
    row = client.get("/api/rows", params={"limit": 5}).json()["rows"][0]
    assert client.get(row["thumb"]).status_code == 200
    full = client.get(row["thumb"].replace("/thumb/s/", "/file/", 1))  # the side panel's full image
    assert full.status_code == 200 and full.content == (image_folder / row["path"]).read_bytes()
