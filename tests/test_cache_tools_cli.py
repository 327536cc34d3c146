"""The cache tools end to end through `rt` on generated images (random-init ResNet-18 at 32 px): caches
made by the real `rt extract`, a head by `rt fit-head`, one image of the training set planted in the test
set (leakage), and a folder of loose images as the pool to label."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from typer.testing import CliRunner

from resnet_transfer.base import file_digest
from resnet_transfer.cache import FeatureCache
from resnet_transfer.cli import app
from resnet_transfer.images import list_images

runner = CliRunner()
BACKBONE = ["--model", "resnet18", "--weights", "none", "--image-size", "32"]


def rt(*args: object) -> str:
    """Run `rt`; its stdout (messages and warnings go to stderr)."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.stdout


def rt_all(*args: object) -> str:
    """Run `rt`; stdout and stderr together."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("tools")
    train = make_image_folder(tmp / "train", per_class=12, seed=0)
    test = make_image_folder(tmp / "test", per_class=4, seed=1)
    leaked = sorted((train / "square").iterdir())[3]
    shutil.copy(leaked, test / "square" / "leaked.png")
    pool = tmp / "pool"
    make_image_folder(tmp / "pool_src", per_class=5, seed=3)
    pool.mkdir()
    for f in sorted((tmp / "pool_src").rglob("*.*")):
        shutil.copy(f, pool / f.name)  # loose images: no class folders, no labels
    for name, data in (("train", train), ("test", test)):
        rt("extract", "--data", data, "--out", tmp / f"{name}.h5", *BACKBONE)
    rt("fit-head", "--cache", tmp / "train.h5", "--out", tmp / "head")
    return {"tmp": tmp, "train": train, "test": test, "pool": pool, "leaked": leaked}


def test_fit_head_reports_the_knn_beside_the_head(world: dict) -> None:
    rep = json.loads((world["tmp"] / "head" / "report.json").read_text())
    knn = rep["knn"]
    assert knn["k"] in {int(k) for k in knn["scores"]} and "validation" in knn["chosen_by"]
    assert 0.0 <= knn["accuracy"] <= 1.0 and knn["n"] == rep["n_val"]
    assert 0.0 <= knn["agreement_with_head"] <= 1.0


def test_evaluate_shows_knn_calibration_and_worst(world: dict) -> None:
    tmp = world["tmp"]
    out = rt(
        "evaluate",
        tmp / "head",
        "--cache",
        tmp / "test.h5",
        "--out",
        tmp / "eval",
        "--worst",
        "4",
        "--root",
        world["test"],
    )
    assert "kNN (cosine" in out and "ECE" in out and "worst.png" in out
    rep = json.loads((tmp / "eval" / "report.json").read_text())
    assert rep["knn"]["n"] == rep["n"] and rep["knn"]["chosen_by"] == "recorded by rt fit-head"
    assert rep["calibration"]["log_loss"]["before"] > 0
    worst = rep["worst"]["rows"]
    assert worst and all(r["true"] != r["predicted"] for r in worst)
    assert [r["probability"] for r in worst] == sorted((r["probability"] for r in worst), reverse=True)
    assert all(Path(r["path"]).is_file() for r in worst)
    assert (tmp / "eval" / "worst.png").stat().st_size > 1000 and (tmp / "eval" / "reliability.png").exists()


def test_min_confidence_marks_low_confidence_images(world: dict) -> None:
    tmp, test = world["tmp"], world["test"]
    plain = json.loads(rt("predict", tmp / "head", test, "--json"))["predictions"]
    p = float(np.median([r["probability"] for r in plain]))
    low = {r["path"] for r in plain if r["probability"] < p}
    assert low and len(low) < len(plain)
    marked = json.loads(rt("predict", tmp / "head", test, "--json", "--min-confidence", p))["predictions"]
    assert {r["path"] for r in marked if r["prediction"] == "uncertain"} == low
    assert all(r["uncertain"] == (r["path"] in low) for r in marked)
    assert all(r["guess"] == r["top"][0]["class"] for r in marked if r["uncertain"])
    rows = list(csv.DictReader(io.StringIO(rt("predict", tmp / "head", test, "--csv", "--min-confidence", p))))
    assert {r["path"] for r in rows if r["prediction"] == "uncertain"} == low
    table = rt("predict", tmp / "head", test, "--min-confidence", p)
    assert table.count("uncertain") == len(low)


def test_audit_finds_the_image_leaked_into_the_test_set(world: dict) -> None:
    tmp = world["tmp"]
    out = rt_all(
        "audit",
        "--cache",
        tmp / "train.h5",
        "--test",
        tmp / "test.h5",
        "--root",
        world["train"],
        "--test-root",
        world["test"],
        "--out",
        tmp / "audit",
        "--json",
    )
    rep = json.loads((tmp / "audit" / "audit.json").read_text())
    leaks = [(x["train"], x["test"]) for x in rep["duplicates"]["leakage_exact"]]
    assert leaks == [(world["leaked"].relative_to(world["train"]).as_posix(), "square/leaked.png")]
    assert rep["duplicates"]["exact"] == []
    assert "leakage" in out and (tmp / "audit" / "audit.png").stat().st_size > 1000


def test_suggest_from_a_folder_of_loose_images(world: dict) -> None:
    tmp = world["tmp"]
    manifest = tmp / "labelling" / "next.csv"
    rt("suggest", "--head", tmp / "head", "--pool", world["pool"], "-n", "4", "--out", manifest)
    rows = list(csv.reader(manifest.open()))[1:]
    assert len(rows) == 4 and all(label == "" for _, label in rows)
    pool_files = {file_digest(f): f for f in world["pool"].iterdir()}
    filled = manifest.with_name("filled.csv")
    filled.write_text("path,label\n" + "".join(f"{p},circle\n" for p, _ in rows))
    listed = list_images(filled, allow_outside=True)
    assert all(file_digest(Path(listed.root) / p) in pool_files for p in listed.paths)
    # the filled manifest extracts to the same features the pool cache holds for those files
    rt("extract", "--data", filled, "--out", tmp / "labelled.h5", "--allow-outside", *BACKBONE)
    pool_cache = FeatureCache(manifest.with_suffix(".pool.h5"))
    new = FeatureCache(tmp / "labelled.h5")
    assert new.n == 4 and (new.labels == new.classes.index("circle")).all()
    by_name = {Path(p).name: i for i, p in enumerate(pool_cache.paths)}
    same = pool_cache.features([by_name[Path(p).name] for p in new.paths])
    np.testing.assert_allclose(new.features(), same, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------ where a cache's images are (issue 22)


def test_evaluate_worst_and_audit_find_the_images_without_root(world: dict) -> None:
    """A cache records the folder it was extracted from: no --root needed for the pictures."""
    tmp = world["tmp"]
    res = runner.invoke(
        app, [str(a) for a in ("evaluate", tmp / "head", "--cache", tmp / "test.h5", "--out", tmp / "e2", "--worst", 4)]
    )
    assert res.exit_code == 0, res.output
    assert "not found" not in res.output
    worst = json.loads((tmp / "e2" / "report.json").read_text())["worst"]["rows"]
    assert worst and all(Path(r["path"]).is_file() and Path(r["path"]).is_relative_to(world["test"]) for r in worst)
    res = runner.invoke(
        app, [str(a) for a in ("audit", "--cache", tmp / "train.h5", "--test", tmp / "test.h5", "--out", tmp / "a2")]
    )
    assert res.exit_code == 0, res.output
    assert "not found" not in res.output and (tmp / "a2" / "audit.png").stat().st_size > 1000


def test_a_data_folder_moved_with_its_cache_still_finds_its_images(tmp_path: Path) -> None:
    project = tmp_path / "project"
    make_image_folder(project / "data", per_class=3, seed=4)
    rt("extract", "--data", project / "data", "--out", project / "cache" / "c.h5", *BACKBONE)
    assert FeatureCache(project / "cache" / "c.h5").attrs["root_relative"] == "../data"
    moved = tmp_path / "moved"
    project.rename(moved)  # the recorded folder is gone; its place relative to the cache is not
    res = runner.invoke(app, ["audit", "--cache", str(moved / "cache" / "c.h5"), "--out", str(tmp_path / "audit")])
    assert res.exit_code == 0, res.output
    assert "not found" not in res.output
    # the next extract from the new place records it (no row changed, the index is rewritten for the root)
    out = rt_all("extract", "--data", moved / "data", "--out", moved / "cache" / "c.h5", *BACKBONE)
    assert "up to date" in out and FeatureCache(moved / "cache" / "c.h5").attrs["root"] == str(moved / "data")
    shutil.rmtree(moved / "data")
    res = runner.invoke(app, ["audit", "--cache", str(moved / "cache" / "c.h5"), "--out", str(tmp_path / "audit")])
    assert res.exit_code == 0 and f"looked in {moved / 'data'}" in res.output  # says where it looked


def _readme_lines(*starts: str) -> list[str]:
    """The README's command lines beginning with ``starts`` (one each), comments removed."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    found = []
    for start in starts:
        lines = [ln.split("  #")[0].strip() for ln in text.splitlines() if ln.startswith(start)]
        assert len(lines) == 1, f"README.md: one line starting {start!r}, found {lines}"
        found.append(lines[0])
    return found


def test_readme_suggest_lines_work_exactly_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rt extract --data ./unlabelled --out pool.h5`, then `rt suggest --head cat-head/ --pool pool.h5 -n 10
    --out to-label.csv`, read from the README and run as they are: the default backbone (ResNet-50,
    ImageNet weights from the local Hugging Face cache; here random-init weights the test put there), no
    --root. The head is planted with the pool's backbone identity."""
    import shlex

    from fake_hub import hf_snapshot, timm_state, use_hubs
    from planted import write_head

    from resnet_transfer.head import read_model_dir, write_model_dir

    extract_line, suggest_line = _readme_lines("rt extract --data ./unlabelled ", "rt suggest --head cat-head/ ")
    hub, _ = use_hubs(monkeypatch, tmp_path / "hubs")
    hf_snapshot(hub, "timm/resnet50.a1_in1k", timm_state("resnet50"))
    work = tmp_path / "work"
    make_image_folder(work / "src", per_class=4, seed=5)
    (work / "unlabelled").mkdir()
    for f in sorted((work / "src").rglob("*.*")):
        f.rename(work / "unlabelled" / f.name)  # 12 loose images
    monkeypatch.chdir(work)
    res = runner.invoke(app, shlex.split(extract_line)[1:])
    assert res.exit_code == 0, res.output
    pool = FeatureCache(work / "pool.h5")
    rng = np.random.default_rng(0)
    planted = write_head(tmp_path / "h", rng.normal(size=(3, pool.dim)), np.zeros(3), ["cat", "dog", "fox"])
    md = read_model_dir(planted)
    write_model_dir(
        work / "cat-head",
        "head",
        pool.identity,
        md.classes,
        md.head_config,
        {"head.safetensors": md.load_tensors("head.safetensors")},
    )
    res = runner.invoke(app, shlex.split(suggest_line)[1:])
    assert res.exit_code == 0, res.output
    rows = list(csv.reader((work / "to-label.csv").open()))[1:]
    assert len(rows) == 10 and all(label == "" for _, label in rows)
    assert all((work / p).is_file() and (work / p).parent == work / "unlabelled" for p, _ in rows)
