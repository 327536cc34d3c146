from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resnet_transfer.backbones import BackboneIdentity, TransformConfig
from resnet_transfer.cache import FORMAT_VERSION, FeatureCache
from resnet_transfer.cache_writer import CacheWriter
from resnet_transfer.errors import CacheError, IdentityMismatch

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
    assert not (tmp_path / "c.h5.parts").exists()


def test_interrupted_run_resumes_and_equals_uninterrupted(tmp_path: Path) -> None:
    write(tmp_path / "ref.h5", 11, 3)
    write(tmp_path / "c.h5", 11, 3, stop_after=2)
    assert not (tmp_path / "c.h5").exists() and len(list((tmp_path / "c.h5.parts").glob("part-*"))) == 2
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

    monkeypatch.setattr(np, "savez", full)
    with CacheWriter(out, identity(), ["a", "b", "c"]) as w, pytest.raises(CacheError, match="disk full"):
        w.write_part(["new.png"], [0], np.ones((1, DIM)), {})
    monkeypatch.undo()
    np.testing.assert_array_equal(FeatureCache(out).features(), before)
    assert not list((tmp_path / "c.h5.parts").glob("*.tmp"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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


def test_labelled_as_maps_into_another_class_order(tmp_path: Path) -> None:
    from resnet_transfer.errors import DataError

    write(tmp_path / "c.h5", 6, 6, stages=False)  # classes a, b, c; labels 0,1,2,0,1,2
    c = FeatureCache(tmp_path / "c.h5")
    rows, y = c.labelled_as(["c", "b", "a", "z"], "--val c.h5", "hint")
    assert rows.tolist() == list(range(6)) and y.tolist() == [2, 1, 0, 2, 1, 0]
    with pytest.raises(DataError, match=r"--val c\.h5: class\(es\) c are not among a, b"):
        c.labelled_as(["a", "b"], "--val c.h5", "hint")
