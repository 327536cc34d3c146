from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from resnet_transfer.cache import ChunkStore, ExtractConfig, FeatureCache, extract
from resnet_transfer.cli import app
from tests.conftest import make_image_folder
from tests.odd_images import write_odd_images

runner = CliRunner()
FAST = ["--model", "resnet18", "--weights", "none", "--image-size", "32"]


def rt(*args: str) -> object:
    return runner.invoke(app, [str(a) for a in args])


def test_extract_writes_a_complete_cache(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    r = rt("extract", "--data", image_folder, "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    c = FeatureCache(out)
    assert c.n == 24 and c.dim == 512 and c.classes == ["circle", "square", "triangle"]
    assert np.isfinite(c.features()).all() and c.features().std() > 0
    assert c.identity.weights_id == "random:seed=0" and c.identity.transform.input_size == 32
    assert c.attrs["root"] == str(image_folder.resolve())  # where its images are (sheets.image_root)
    info = rt("info", out, "--json")
    assert info.exit_code == 0 and '"rows": 24' in info.output


def test_the_data_folder_is_recorded_unless_no_record_root(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "caches" / "f.h5"
    assert rt("extract", "--data", image_folder, "--out", out, *FAST).exit_code == 0
    rel = Path(os.path.relpath(image_folder.resolve(), out.parent)).as_posix()
    assert FeatureCache(out).attrs["root_relative"] == rel
    info = rt("info", out)
    assert f"root: {image_folder.resolve()}" in info.output and f"root_relative: {rel}" in info.output
    mtime = out.stat().st_mtime_ns
    r = rt("extract", "--data", image_folder, "--out", out, *FAST, "--no-record-root")
    assert r.exit_code == 0 and "up to date" in r.output and out.stat().st_mtime_ns != mtime  # attrs rewritten
    c = FeatureCache(out)
    assert c.attrs["root"] == "" and c.attrs["root_relative"] == rel  # no machine path; the relative one stays
    assert "root: None" in rt("info", out).output
    assert rt("extract", "--data", image_folder, "--out", out, *FAST, "--record-root").exit_code == 0  # still taken
    assert FeatureCache(out).attrs["root"] == str(image_folder.resolve())


def test_rerun_does_nothing_and_new_images_are_added(image_folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    out = tmp_path / "f.h5"
    assert rt("extract", "--data", data, "--out", out, *FAST).exit_code == 0
    first = FeatureCache(out).features()
    mtime = out.stat().st_mtime_ns
    r = rt("extract", "--data", data, "--out", out, *FAST)
    assert r.exit_code == 0 and "nothing to compute" in r.output
    assert out.stat().st_mtime_ns == mtime
    assert not (tmp_path / "f.h5.parts").exists()  # a no-op run leaves nothing behind
    make_image_folder(data, per_class=2, seed=9, classes=("square", "zebra"))  # 2 new rows + a new class
    r = rt("extract", "--data", data, "--out", out, *FAST)
    assert r.exit_code == 0 and "24 of 28 images already done" in r.output
    c = FeatureCache(out)
    assert c.n == 28 and c.classes == ["circle", "square", "triangle", "zebra"]
    np.testing.assert_array_equal(c.features(range(24)), first)  # old rows untouched
    assert c.labels[c.paths.index("zebra/zebra_9_000.jpg")] == 3


def test_interrupt_then_resume_equals_uninterrupted(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = dict(data=image_folder, model="resnet18", weights="none", image_size=32, batch_size=4, chunk_rows=8)
    extract(ExtractConfig(out=tmp_path / "ref.h5", **common))  # type: ignore[arg-type]
    calls = {"n": 0}
    real = ChunkStore.write

    def flaky(self: ChunkStore, *a: object, **k: object) -> str:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return real(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(ChunkStore, "write", flaky)
    with pytest.raises(Exception, match="interrupted"):
        extract(ExtractConfig(out=tmp_path / "c.h5", **common))  # type: ignore[arg-type]
    monkeypatch.undo()
    assert not (tmp_path / "c.h5").exists()
    res = extract(ExtractConfig(out=tmp_path / "c.h5", **common))  # type: ignore[arg-type]
    assert res.new_rows == 24 and res.rows == 24
    a, b = FeatureCache(tmp_path / "ref.h5"), FeatureCache(tmp_path / "c.h5")
    assert a.paths == b.paths
    np.testing.assert_array_equal(a.features(), b.features())


def test_mismatch_is_refused_or_overwritten(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    base = ["extract", "--data", image_folder, "--out", out, "--weights", "none"]
    assert rt(*base, "--model", "resnet18", "--image-size", "32").exit_code == 0
    r = rt(*base, "--model", "resnet18", "--image-size", "48")
    assert r.exit_code == 2 and "transform" in r.output and "Traceback" not in r.output
    r = rt(*base, "--model", "resnet34", "--image-size", "32")
    assert r.exit_code == 2 and "arch" in r.output
    r = rt(*base, "--model", "resnet18", "--image-size", "48", "--overwrite")
    assert r.exit_code == 0 and FeatureCache(out).identity.transform.input_size == 48


@pytest.mark.parametrize(("model", "channels"), [("resnet18", 256), ("resnet50", 1024)])
def test_cut_keeps_stage_maps(image_folder: Path, tmp_path: Path, model: str, channels: int) -> None:
    out = tmp_path / "f.h5"
    r = rt(
        "extract",
        "--data",
        image_folder,
        "--out",
        out,
        "--model",
        model,
        "--weights",
        "none",
        "--image-size",
        "64",
        "--cut",
        "layer3",
    )
    assert r.exit_code == 0, r.output
    c = FeatureCache(out)
    assert c.stages == {"layer3": (channels, 4, 4)}
    maps = c.stage("layer3", [0, 5])
    assert maps.shape == (2, channels, 4, 4) and np.isfinite(maps).all()


def test_manifest_input_with_unlabelled_rows(image_folder: Path, tmp_path: Path) -> None:
    rows = [
        "path,label",
        "circle/circle_0_000.jpg,circle",
        "square/square_0_001.png,square",
        "triangle/triangle_0_002.webp,",
    ]
    (image_folder / "m.csv").write_text("\n".join(rows) + "\n")
    try:
        out = tmp_path / "m.h5"
        assert rt("extract", "--data", image_folder / "m.csv", "--out", out, *FAST).exit_code == 0
    finally:
        (image_folder / "m.csv").unlink()
    c = FeatureCache(out)
    assert c.labels.tolist() == [0, 1, -1] and c.classes == ["circle", "square"]


def test_odd_files_are_skipped_listed_and_set_exit_code(tmp_path: Path) -> None:
    data = tmp_path / "data"
    expect = write_odd_images(data / "mixed")
    make_image_folder(data, per_class=2, seed=4, classes=("plain",))
    out = tmp_path / "f.h5"
    r = rt("extract", "--data", data, "--out", out, *FAST)
    assert r.exit_code == 3, r.output
    c = FeatureCache(out)
    skipped = {Path(p).name for p, _ in c.skipped}
    assert skipped == {n for n, k in expect.items() if k == "skip"}
    assert {Path(p).name for p in c.paths} >= {n for n, k in expect.items() if k == "ok"}
    assert not any(".DS_Store" in p or "Thumbs" in p or "._hidden" in p for p in c.paths + list(skipped))
    assert "truncated.jpg" in rt("info", out, "--skipped").output
    r = rt("extract", "--data", data, "--out", tmp_path / "strict.h5", "--strict", *FAST)
    assert r.exit_code == 2 and "drop --strict" in r.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "resnet5O"], "did you mean"),
        (["--cut", "layer9"], "layer1, layer2, layer3, layer4"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--weights", "/nonexistent/w.pth"], "no such file"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_input_is_one_clear_line(image_folder: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    base = {"--model": "resnet18", "--weights": "none", "--image-size": "32"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv]
    r = rt("extract", "--data", image_folder, "--out", tmp_path / "x.h5", *flat)
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output and r.output.startswith("error:")


def test_missing_data_folder(tmp_path: Path) -> None:
    r = rt("extract", "--data", tmp_path / "nope", "--out", tmp_path / "x.h5", *FAST)
    assert r.exit_code == 2 and "no such file or folder" in r.output


# ------------------------------------------------------------------------------ content keys (issue 13)

EXACT = [*FAST, "--precision", "fp32", "--dtype", "float32", "--workers", "0"]


def test_noop_run_reads_no_image_and_a_touch_only_rehashes(
    fresh_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from resnet_transfer.base import fsutil as fsutil

    out = tmp_path / "f.h5"
    assert rt("extract", "--data", fresh_folder, "--out", out, *EXACT).exit_code == 0
    real, calls = fsutil.file_digest, []
    monkeypatch.setattr(fsutil, "file_digest", lambda p: calls.append(p) or real(p))
    r = rt("extract", "--data", fresh_folder, "--out", out, *EXACT)
    assert r.exit_code == 0 and "nothing to compute" in r.output and calls == []  # the stat check did it all
    one = sorted(fresh_folder.rglob("*.png"))[0]
    os.utime(one, ns=(one.stat().st_atime_ns, one.stat().st_mtime_ns + 10**9))  # touched, same bytes
    r = rt("extract", "--data", fresh_folder, "--out", out, *EXACT)
    assert r.exit_code == 0 and len(calls) == 1 and "nothing to compute" in r.output  # read once, not computed
    calls.clear()
    assert rt("extract", "--data", fresh_folder, "--out", out, *EXACT).exit_code == 0 and calls == []


def test_precision_is_part_of_the_identity(fresh_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    assert rt("extract", "--data", fresh_folder, "--out", out, *FAST, "--precision", "fp32").exit_code == 0
    r = rt("extract", "--data", fresh_folder, "--out", out, *FAST, "--precision", "bf16")
    assert r.exit_code == 2 and "fp32" in r.output and "bf16" in r.output and "--overwrite" in r.output
    r = rt("extract", "--data", fresh_folder, "--out", out, *FAST, "--precision", "bf16", "--overwrite")
    assert r.exit_code == 0 and FeatureCache(out).precision == "bf16"


def test_dry_run_plans_without_writing_and_info_shows_the_last_run(fresh_folder: Path, tmp_path: Path) -> None:
    from resnet_transfer.cache import chunk_dir

    out = tmp_path / "f.h5"
    assert rt("extract", "--data", fresh_folder, "--out", out, *EXACT).exit_code == 0
    files = sorted(p for p in fresh_folder.rglob("*") if p.is_file())
    files[0].unlink()  # removed
    assert files[1].parent.name == "circle"
    files[1].rename(fresh_folder / "triangle" / "moved.png")  # moved to another class folder: a new label
    make_image_folder(fresh_folder, per_class=1, seed=8, classes=("circle",))  # added
    before = (out.stat().st_mtime_ns, sorted(p.name for p in chunk_dir(out).iterdir()))
    r = rt("extract", "--data", fresh_folder, "--out", out, *EXACT, "--dry-run")
    assert r.exit_code == 0, r.output
    # a changed label counts as relabelled whatever else changed (issue 33), the move included
    assert "added 1, changed 0, removed 1, relabelled 1, moved 0, unchanged 10" in r.output
    assert "would compute 1 image" in r.output
    assert (out.stat().st_mtime_ns, sorted(p.name for p in chunk_dir(out).iterdir())) == before
    r = rt("extract", "--data", fresh_folder, "--out", out, *EXACT)
    assert "added 1, changed 0, removed 1, relabelled 1, moved 0, unchanged 10" in r.output
    c = FeatureCache(out)
    assert c.n == 12 and c.last_run["computed"] == 1 and c.last_run["relabelled"] == 1
    info = rt("info", out)
    assert "last_run: added 1, changed 0, removed 1, relabelled 1, moved 0, unchanged 10" in info.output


def test_merged_cache_is_one_file_and_still_updates(fresh_folder: Path, tmp_path: Path) -> None:
    import h5py

    from resnet_transfer.cache import chunk_dir

    out = tmp_path / "f.h5"
    assert rt("extract", "--data", fresh_folder, "--out", out, *EXACT, "--cut", "layer3", "--merge").exit_code == 0
    with h5py.File(out, "r") as f:
        assert not f["features"].is_virtual and not f["stages/layer3"].is_virtual
    assert not chunk_dir(out).exists()
    make_image_folder(fresh_folder, per_class=1, seed=8)
    assert rt("extract", "--data", fresh_folder, "--out", out, *EXACT, "--cut", "layer3").exit_code == 0
    ref = tmp_path / "ref.h5"
    assert rt("extract", "--data", fresh_folder, "--out", ref, *EXACT, "--cut", "layer3").exit_code == 0
    a, b = FeatureCache(out), FeatureCache(ref)
    assert sorted(zip(a.paths, a.keys)) == sorted(zip(b.paths, b.keys)) and a.n == 15
    order = [b.paths.index(p) for p in a.paths]
    np.testing.assert_allclose(a.features(), b.features(order), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.stage("layer3", range(a.n)), b.stage("layer3", order), rtol=1e-2, atol=1e-3)


# ------------------------------------------------------------------------------ pooled stages (issue 17)


def test_pool_stages_stored_in_one_pass_and_kept_up_to_date(fresh_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    args = [
        "extract",
        "--data",
        fresh_folder,
        "--out",
        out,
        *EXACT,
        "--cut",
        "layer3",
        "--pool-stages",
        "layer3,layer4",
    ]
    r = rt(*args)
    assert r.exit_code == 0, r.output
    c = FeatureCache(out)
    assert c.pooled_stages == ["layer3", "layer4"] and c.pooled == {"layer3": 256, "layer4": 512}
    rows = np.arange(c.n)
    np.testing.assert_allclose(c.features(stage="layer3"), c.stage("layer3", rows).mean(axis=(2, 3)), atol=2e-3)
    np.testing.assert_allclose(c.features(stage="layer4"), c.features(), rtol=1e-5, atol=1e-6)  # resnet18: avg pool
    both = c.features([3, 1], stage=["layer4", "layer3"])
    assert both.shape == (2, 768)
    np.testing.assert_array_equal(both[:, 512:], c.features([3, 1], stage="layer3"))
    assert rt("info", out, "--json").output.count('"layer4": 512') == 1
    with pytest.raises(Exception, match="--pool-stages layer2"):
        c.features(stage="layer2")
    make_image_folder(fresh_folder, per_class=1, seed=8)  # incremental runs keep the pooled stages too
    assert rt(*args).exit_code == 0
    c = FeatureCache(out)
    assert c.n == 15 and np.isfinite(c.features(stage=["layer3", "layer4"])).all()
    r = rt("extract", "--data", fresh_folder, "--out", out, *EXACT, "--cut", "layer3", "--pool-stages", "layer4")
    assert r.exit_code == 2 and "pooled features of [layer3, layer4]" in r.output and "--overwrite" in r.output


def test_pooled_stage_features_match_the_stages() -> None:
    import torch

    from resnet_transfer.backbone import build_backbone, pooled_stage_features

    b = build_backbone("resnet18", "none", 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = pooled_stage_features(b, x, ["layer2", "layer4", "layer2"])
        final = b.net(x)
    assert list(got) == ["layer2", "layer4"] and got["layer2"].shape == (2, 128)
    torch.testing.assert_close(got["layer4"], final)
    with pytest.raises(Exception, match="not a stage"):
        pooled_stage_features(b, x, ["layer9"])
