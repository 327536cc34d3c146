from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from resnet_transfer.backbone import BackboneIdentity
from resnet_transfer.base import CacheError, IdentityMismatch
from resnet_transfer.cache import FORMAT_VERSION, CacheWriter, FeatureCache
from resnet_transfer.images import TransformConfig
from tests.conftest import examples

DIM = 6


def identity(weights_id: str = "random:seed=0") -> BackboneIdentity:
    return BackboneIdentity("timm:resnet18", "resnet18", "none", weights_id, TransformConfig(32, 36), DIM)


def rows(n: int, seed: int = 0) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    paths = [f"c{i % 3}/img{i:04d}.png" for i in range(n)]
    labels = [i % 3 for i in range(n)]
    return paths, labels, rng.normal(size=(n, DIM)).astype(np.float32), rng.normal(size=(n, 2, 2, 2))


def write(out: Path, n: int, chunk: int, stop_after: int | None = None, stages: bool = True) -> None:
    paths, labels, feats, maps = rows(n)
    write_subset(out, paths, labels, feats, maps if stages else None, n, chunk, stop_after)


def test_layout_is_plain_hdf5(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    write(out, 10, 4)
    with h5py.File(out, "r") as f:  # readable without our package
        assert f["features"].shape == (10, DIM) and f["features"].dtype == np.float16
        assert f["labels"][:].tolist() == [i % 3 for i in range(10)]
        assert f["paths"][0].decode() == "c0/img0000.png"
        assert f["stages/layer3"].shape == (10, 2, 2, 2)
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert json.loads(f.attrs["classes"]) == ["a", "b", "c"]
        assert json.loads(f.attrs["identity"])["arch"] == "resnet18"
        assert f["skipped"].shape == (0, 2)
        assert len(f["keys"]) == 10 and len(f["keys"][0].decode()) == 32
        assert f["features"].is_virtual  # rows read from immutable chunk files
    assert len(list((tmp_path / "c.h5.chunks").glob("chunk-*.h5"))) == 3  # 10 rows in chunks of 4


def test_interrupted_run_resumes_and_equals_uninterrupted(tmp_path: Path) -> None:
    write(tmp_path / "ref.h5", 11, 3)
    write(tmp_path / "c.h5", 11, 3, stop_after=2)
    assert not (tmp_path / "c.h5").exists() and len(list((tmp_path / "c.h5.chunks").glob("chunk-*.h5"))) == 2
    write(tmp_path / "c.h5", 11, 3)
    a, b = FeatureCache(tmp_path / "ref.h5"), FeatureCache(tmp_path / "c.h5")
    assert a.paths == b.paths
    np.testing.assert_array_equal(a.features(), b.features())
    np.testing.assert_array_equal(a.stage("layer3", range(11)), b.stage("layer3", range(11)))


def test_chunk_reads_cover_rows_once(tmp_path: Path) -> None:
    write(tmp_path / "c.h5", 10, 10)
    c = FeatureCache(tmp_path / "c.h5")
    got = np.concatenate([x for x, _ in c.iter_chunks(chunk_rows=4, shuffle=True, seed=1)])
    np.testing.assert_array_equal(np.sort(got, axis=0), np.sort(c.features(), axis=0))
    np.testing.assert_array_equal(c.features([7, 2, 2]), c.features()[[7, 2, 2]])


def test_other_identity_or_cut_refused(tmp_path: Path) -> None:
    write(tmp_path / "c.h5", 5, 5)
    with (
        pytest.raises(IdentityMismatch, match="weights_id"),
        CacheWriter(tmp_path / "c.h5", identity("sha256:x"), ["a"]),
    ):
        pass
    with pytest.raises(IdentityMismatch, match="layer3"), CacheWriter(tmp_path / "c.h5", identity(), ["a"], {}):
        pass


def test_unfinished_parts_from_other_settings_refused(tmp_path: Path) -> None:
    write(tmp_path / "c.h5", 9, 3, stop_after=1)
    with (
        pytest.raises(IdentityMismatch, match="unfinished work"),
        CacheWriter(tmp_path / "c.h5", identity("sha256:y"), ["a"], {"layer3": (2, 2, 2)}),
    ):
        pass
    with CacheWriter(tmp_path / "c.h5", identity("sha256:y"), ["a"], {}, overwrite=True) as w:
        assert w.done_paths() == set()


def test_second_writer_is_locked_out(tmp_path: Path) -> None:
    first = CacheWriter(tmp_path / "c.h5", identity(), ["a"])
    second = CacheWriter(tmp_path / "c.h5", identity(), ["a"])
    with first, pytest.raises(CacheError, match="another `rt extract`"), second:
        pass
    with CacheWriter(tmp_path / "c.h5", identity(), ["a"]):  # released after the first one ends
        pass


@pytest.mark.parametrize("damage", ["truncate", "garbage", "old_version", "other_file"])
def test_damaged_cache_gets_clear_error(tmp_path: Path, damage: str) -> None:
    out = tmp_path / "c.h5"
    write(out, 6, 6)
    if damage == "truncate":
        out.write_bytes(out.read_bytes()[:1000])
    elif damage == "garbage":
        out.write_bytes(b"not hdf5 at all" * 10)
    elif damage == "old_version":
        with h5py.File(out, "a") as f:
            f.attrs["format_version"] = 0
    else:
        with h5py.File(out, "w") as f:
            f["x"] = 1
    with pytest.raises(CacheError) as info:
        FeatureCache(out)
    assert str(out) in str(info.value) and "fix:" in str(info.value)


def test_skipped_files_are_recorded_and_not_retried(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    with CacheWriter(out, identity(), ["a"]) as w:
        w.write_part(["a/1.png"], [0], np.ones((1, DIM)), {}, skipped=[("a/bad.jpg", "empty file (0 bytes)")])
        w.finalize()
    c = FeatureCache(out)
    assert c.skipped == [("a/bad.jpg", "empty file (0 bytes)")]
    with CacheWriter(out, identity(), ["a"]) as w:
        assert w.done_paths() == {"a/1.png", "a/bad.jpg"}


def test_disk_full_is_reported_and_previous_cache_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    out = tmp_path / "c.h5"
    write(out, 4, 4, stages=False)
    before = FeatureCache(out).features()

    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with CacheWriter(out, identity(), ["a", "b", "c"]) as w, pytest.raises(CacheError, match="disk full"):
        monkeypatch.setattr(h5py, "File", full)
        w.write_part(["new.png"], [0], np.ones((1, DIM)), {})
    monkeypatch.undo()
    np.testing.assert_array_equal(FeatureCache(out).features(), before)
    assert not list((tmp_path / "c.h5.chunks").glob(".*tmp*"))


def test_reasons_recorded_with_a_file_name_are_reused_without_it(tmp_path: Path) -> None:
    """A cache written before reasons were path-free (PIL's message named the open file) hands its reasons
    on without the other file's absolute path."""
    out = tmp_path / "c.h5"
    old = "not a readable image (UnidentifiedImageError: cannot identify image file <_io.BufferedReader name='/tmp/x/a.jpg'>)"
    with CacheWriter(out, identity(), ["a", "b", "c"]) as w:
        w.write_part(["a/1.png"], [0], np.ones((1, DIM)), skipped=[("a/bad.jpg", old)], skipped_keys=["k" * 32])
        w.finalize()
    with CacheWriter(out, identity(), ["a", "b", "c"]) as w:
        assert w.known_skips() == {
            "k" * 32: "not a readable image (UnidentifiedImageError: cannot identify image file)"
        }


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 20),
    chunk=st.integers(1, 7),
    kills=st.lists(st.integers(0, 4), max_size=3),
    add=st.integers(0, 5),
)
def test_append_resume_property(
    tmp_path_factory: pytest.TempPathFactory, n: int, chunk: int, kills: list[int], add: int
) -> None:
    """Any sequence of interrupted runs, then a full run, then an incremental run with ``add`` more rows,
    gives the same rows as one uninterrupted run over everything."""
    d = tmp_path_factory.mktemp("prop")
    paths, labels, feats, maps = rows(n + add)
    ref = d / "ref.h5"
    write_subset(ref, paths, labels, feats, maps, n + add, chunk)
    out = d / "c.h5"
    for k in kills:
        write_subset(out, paths, labels, feats, maps, n, chunk, stop_after=k)
    write_subset(out, paths, labels, feats, maps, n, chunk)
    write_subset(out, paths, labels, feats, maps, n + add, chunk)
    a, b = FeatureCache(ref), FeatureCache(out)
    assert a.paths == b.paths and a.labels.tolist() == b.labels.tolist()
    np.testing.assert_array_equal(a.features(), b.features())
    np.testing.assert_array_equal(a.stage("layer3", range(a.n)), b.stage("layer3", range(b.n)))


def write_subset(
    out: Path,
    paths: list[str],
    labels: list[int],
    feats: np.ndarray,
    maps: np.ndarray | None,
    n: int,
    chunk: int,
    stop_after: int | None = None,
) -> None:
    """One run over the first ``n`` rows in chunks of ``chunk``; ``stop_after=k`` "kills" it after k chunks
    (finished parts stay on disk, the cache is not assembled)."""
    shapes = {"layer3": (2, 2, 2)} if maps is not None else {}
    with CacheWriter(out, identity(), ["a", "b", "c"], shapes) as w:
        done = w.done_paths()
        todo = [i for i in range(n) if paths[i] not in done]
        for k, lo in enumerate(range(0, len(todo), chunk)):
            if stop_after is not None and k >= stop_after:
                return
            sel = todo[lo : lo + chunk]
            stage = {"layer3": maps[sel]} if maps is not None else {}
            w.write_part([paths[i] for i in sel], [labels[i] for i in sel], feats[sel], stage)
        w.finalize()


def test_full_read_of_float16_spanning_several_blocks(tmp_path: Path) -> None:
    """features() converts float16 block by block; rows across block boundaries come back exactly."""
    n = 9000  # > 2 read blocks of 4096 rows
    paths, labels, feats, _ = rows(n)
    with CacheWriter(tmp_path / "big.h5", identity(), ["a", "b", "c"]) as w:
        w.write_part(paths, labels, feats)
        w.finalize()
    got = FeatureCache(tmp_path / "big.h5").features()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, feats.astype(np.float16).astype(np.float32))


def test_rows_read_as_stored_in_any_order_across_blocks(tmp_path: Path) -> None:
    """features(rows, dtype=None): the float16 values as stored (no float32 copy), rows in the order asked
    for (repeats too), read in whole blocks across block edges; float32 on request is the same values."""
    n = 9000
    paths, labels, feats, _ = rows(n)
    with CacheWriter(tmp_path / "big.h5", identity(), ["a", "b", "c"]) as w:
        w.write_part(paths[:5000], labels[:5000], feats[:5000])  # two chunk files: a virtual dataset
        w.write_part(paths[5000:], labels[5000:], feats[5000:])
        w.finalize()
    want = np.array([8999, 3, 4095, 4096, 3, 0, 8191, 8192, 5000, 4999])
    with FeatureCache(tmp_path / "big.h5") as fc:
        stored = fc.features(want, dtype=None)
        as32 = fc.features(want)
        assert fc.features(np.zeros(0, dtype=np.int64), dtype=None).shape == (0, feats.shape[1])
    assert stored.dtype == np.float16 and as32.dtype == np.float32
    np.testing.assert_array_equal(stored, feats.astype(np.float16)[want])
    np.testing.assert_array_equal(as32, stored.astype(np.float32))


def test_labelled_as_maps_into_another_class_order(tmp_path: Path) -> None:
    from resnet_transfer.base import DataError

    write(tmp_path / "c.h5", 6, 6, stages=False)  # classes a, b, c; labels 0,1,2,0,1,2
    c = FeatureCache(tmp_path / "c.h5")
    rows, y = c.labelled_as(["c", "b", "a", "z"], "--val c.h5", "hint")
    assert rows.tolist() == list(range(6)) and y.tolist() == [2, 1, 0, 2, 1, 0]
    with pytest.raises(DataError, match=r"--val c\.h5: class\(es\) c are not among a, b"):
        c.labelled_as(["a", "b"], "--val c.h5", "hint")


# --------------------------------------------------------------------------- content-keyed incremental runs

CLASSES = ("circle", "square", "triangle")


class _Dataset:
    """An image folder (optionally listed by a manifest) that the property test edits like a user would."""

    def __init__(self, root: Path, manifest: bool, seed: int) -> None:
        from tests.conftest import make_image_folder

        self.root = make_image_folder(root, per_class=3, seed=seed, classes=CLASSES)
        self.rng = np.random.default_rng(seed)
        self.manifest = root / "list.csv" if manifest else None
        self.labels = {str(p.relative_to(root)): p.parent.name for p in sorted(root.rglob("*.*")) if p.is_file()}
        self.serial = 0
        self.write_manifest()

    @property
    def data(self) -> Path:
        return self.manifest or self.root

    def files(self) -> list[str]:
        return sorted(self.labels)

    def write_manifest(self) -> None:
        if self.manifest is not None:
            lines = ["path,label", *(f"{p},{c}" for p, c in sorted(self.labels.items()))]
            self.manifest.write_text("\n".join(lines) + "\n")

    def new_image(self, path: Path, cls: str) -> None:
        from tests.conftest import draw_image

        path.parent.mkdir(parents=True, exist_ok=True)
        draw_image(cls, self.rng, size=40).save(path, format="PNG")

    def apply(self, op: str, i: int, c: int) -> None:
        files = self.files()
        if not files and op != "add":
            return
        rel = files[i % len(files)] if files else ""
        cls = CLASSES[c % len(CLASSES)]
        path = self.root / rel
        if op == "edit":
            self.new_image(path, self.labels[rel])
        elif op == "delete":
            path.unlink()
            del self.labels[rel]
        elif op == "move":  # to another class folder: a new path, the same bytes, the new folder's label
            dest = f"{cls}/{Path(rel).name}"
            if dest not in self.labels:
                (self.root / cls).mkdir(exist_ok=True)
                path.rename(self.root / dest)
                del self.labels[rel]
                self.labels[dest] = cls
        elif op in ("add", "dup"):
            self.serial += 1
            dest = f"{cls}/new_{self.serial:03d}.png"
            if op == "add":
                self.new_image(self.root / dest, cls)
            else:  # the same bytes under a second path
                (self.root / dest).write_bytes(path.read_bytes())
            self.labels[dest] = cls
        elif op == "corrupt":
            path.write_bytes(b"not an image " + bytes([c % 2]))
        elif op == "repair":
            if not path.read_bytes().startswith(b"not an image"):
                return
            self.new_image(path, self.labels[rel])
        elif op == "relabel" and self.manifest is not None:
            self.labels[rel] = cls
        self.write_manifest()


def _run(data: Path, out: Path, overwrite: bool = False) -> object:
    from resnet_transfer.cache import ExtractConfig, extract

    cfg = ExtractConfig(
        data=data,
        out=out,
        model="resnet18",
        weights="none",
        image_size=32,
        precision="fp32",
        dtype="float32",
        batch_size=4,
        chunk_rows=3,
        workers=0,
        overwrite=overwrite,
    )
    return extract(cfg)


def _rows(c: FeatureCache) -> dict[str, tuple[str, str | None]]:
    return {p: (k, c.classes[y] if y >= 0 else None) for p, k, y in zip(c.paths, c.keys, c.labels)}


def _counting_backbone(mp: pytest.MonkeyPatch) -> dict[str, int]:
    """Build the test backbone once, and count the images that go through its forward pass."""
    import resnet_transfer.backbone.networks as backbones

    real = backbones.build_backbone
    count = {"images": 0}
    built: dict[tuple, object] = {}

    def build(*args: object, **kwargs: object) -> object:
        key = (args, tuple(sorted(kwargs.items())))
        if key not in built:
            b = real(*args, **kwargs)  # type: ignore[arg-type]
            b.net.register_forward_pre_hook(lambda _m, inp: count.__setitem__("images", count["images"] + len(inp[0])))
            built[key] = b
        return built[key]

    mp.setattr(backbones, "build_backbone", build)
    return count


OPS = st.sampled_from(["edit", "delete", "move", "add", "dup", "corrupt", "repair", "relabel"])


@settings(max_examples=examples(6), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    manifest=st.booleans(),
    rounds=st.lists(
        st.lists(st.tuples(OPS, st.integers(0, 20), st.integers(0, 5)), min_size=1, max_size=4), min_size=1, max_size=2
    ),
)
@example(manifest=False, rounds=[[("add", 0, 0), ("corrupt", 3, 0), ("corrupt", 4, 0)]])  # issue 22: same bytes
def test_content_keyed_updates_equal_a_fresh_extraction(
    tmp_path_factory: pytest.TempPathFactory, manifest: bool, rounds: list[list[tuple[str, int, int]]]
) -> None:
    """After any edits, deletions, moves between class folders, manifest relabels, additions, duplicates,
    corruptions and repairs, re-running the same extract gives the rows of a fresh extraction (paths,
    labels, keys, features, skipped files), and only content the cache did not hold goes through the
    backbone."""
    d = tmp_path_factory.mktemp("edits")
    ds = _Dataset(d / "data", manifest, seed=len(rounds))
    out = d / "c.h5"
    with pytest.MonkeyPatch.context() as mp:
        count = _counting_backbone(mp)
        _run(ds.data, out)
        for r, ops in enumerate(rounds):
            for op in ops:
                ds.apply(*op)
            with FeatureCache(out) as before:
                old_keys = set(before.keys) | set(before.skipped_keys)
            count["images"] = 0
            res = _run(ds.data, out)
            computed = count["images"]
            fresh_out = d / f"fresh{r}.h5"
            _run(ds.data, fresh_out, overwrite=True)
            with FeatureCache(out) as got, FeatureCache(fresh_out) as ref:
                assert _rows(got) == _rows(ref)
                assert sorted(got.skipped) == sorted(ref.skipped)
                assert not [r for _, r in got.skipped if str(d) in r]  # a reason holds no machine path
                assert set(got.paths) | {p for p, _ in got.skipped} == set(ds.labels)
                assert all(ds.labels[p] == c for p, (_, c) in _rows(got).items())
                order = [ref.paths.index(p) for p in got.paths]
                np.testing.assert_allclose(got.features(), ref.features(order), rtol=1e-4, atol=1e-5)
                assert computed == len(set(ref.keys) - old_keys)  # unchanged content is never recomputed
                assert res.computed == computed  # type: ignore[attr-defined]
