"""The offline_digits recipe: its data builder and results logic (fast) and, on a small run, its claims (slow).

The slow test runs the real recipe script on a reduced version (fewer source drawings and epochs, fewer
seeds, k up to 50) and checks what the recipe is for, with the intervals the recipe reports: at every k the
linear probe on source-pretrained features beats the probe on random-init features and training from
scratch, and at the largest k finetuning (layer4 or all) does not fall behind the probe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "offline_digits"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"offline_digits_{name}", RECIPE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_make_data_layout_sizes_and_determinism(tmp_path: Path) -> None:
    md = _load("make_data")
    small = dict(
        size=48, source_renders=1, source_test_per_class=2, target_test_per_class=3, max_train_scans=25,
        target_renders=2, target_test_renders=2,
    )  # fmt: skip
    cfg = md.make_data(md.DigitsConfig(out=tmp_path / "a", **small))
    root = tmp_path / "a"
    assert sorted(p.name for p in (root / "source" / "train").iterdir()) == [str(c) for c in range(7)]
    assert sorted(p.name for p in (root / "target").iterdir()) == ["test", "train"]
    for split in ("train", "test"):
        assert sorted(p.name for p in (root / "target" / split).iterdir()) == ["7", "8", "9"]
    assert cfg.counts["target/train"] == {"7": 50, "8": 50, "9": 50}  # 25 scans x 2 drawings
    assert cfg.counts["target/test"] == {"7": 6, "8": 6, "9": 6}
    assert cfg.counts["source/train"] == {str(c): 25 for c in range(7)}
    # every training scan is drawn target_renders times, differently; no test scan is used for training
    for cls in ("7", "8", "9"):
        train = sorted((root / "target" / "train" / cls).iterdir())
        scans = {p.name.split("_")[0] for p in train}
        assert len(scans) == 25
        test_scans = {p.name.split("_")[0] for p in (root / "target" / "test" / cls).iterdir()}
        assert not test_scans & scans
        first = next(iter(sorted(scans)))
        a, b = (root / "target" / "train" / cls / f"{first}_{r}.png" for r in (0, 1))
        assert a.read_bytes() != b.read_bytes()
    # every image is RGB at the requested size
    for p in list(root.rglob("*.png"))[::7]:
        with Image.open(p) as im:
            assert im.size == (48, 48) and im.mode == "RGB"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["size"] == 48 and manifest["counts"] == cfg.counts
    # same config -> byte-identical images; another seed -> different ones
    md.make_data(md.DigitsConfig(out=tmp_path / "b", **small))
    assert _digest(root) == _digest(tmp_path / "b")
    md.make_data(md.DigitsConfig(out=tmp_path / "c", seed=1, **small))
    assert _digest(root) != _digest(tmp_path / "c")


def test_results_intervals_claims_and_table(tmp_path: Path) -> None:
    """results.py: the t-interval, the k-subset sampler, and the claims/table built from run outputs."""
    res = _load("results")
    s = res.summarise([0.8, 0.9, 1.0])
    assert s["mean"] == pytest.approx(0.9) and s["half"] == pytest.approx(4.302653 * 0.1 / 3**0.5, rel=1e-5)
    assert res.summarise([0.5])["half"] == float("inf")
    labels = [0] * 30 + [1] * 20 + [2] * 4
    rows = res.subset_rows(labels, 5, seed=0)
    assert [int((np.asarray(labels)[rows] == c).sum()) for c in range(3)] == [5, 5, 4]
    assert np.array_equal(rows, res.subset_rows(labels, 5, seed=0))
    assert not np.array_equal(rows, res.subset_rows(labels, 5, seed=1))

    run = tmp_path / "run"
    (run / "curves").mkdir(parents=True)

    def rows(method: str, by_k: dict) -> list[dict]:  # `rt curve`'s curve.json rows
        return [{"k": k, "method": method, "scores": v} for k, v in by_k.items()]

    for bb, curve in {
        "source": rows("probe", {10: [0.80, 0.82, 0.84], 50: [0.85, 0.86, 0.87], "all": [0.9]})
        + rows("knn", {10: [0.7, 0.7, 0.7], 50: [0.75, 0.76, 0.77]}),
        "random": rows("probe", {10: [0.33, 0.35, 0.34], 50: [0.4, 0.3, 0.35]}),
    }.items():
        (run / "curves" / bb).mkdir()
        (run / "curves" / bb / "curve.json").write_text(json.dumps({"kind": "curve", "curve": curve}))
    for method, k, accs in (("scratch", 10, [0.3, 0.4, 0.35]), ("scratch", 50, [0.5, 0.9, 0.7]),
                            ("finetune_all", 50, [0.95, 0.96, 0.97])):  # fmt: skip
        for seed, a in enumerate(accs):
            d = run / "eval" / method / f"k{k}" / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "report.json").write_text(json.dumps({"accuracy": a}))
    acc = res.collect(run)
    assert acc["probe_source"][10] == [0.80, 0.82, 0.84] and acc["scratch"][50] == [0.5, 0.9, 0.7]
    c = res.claims(acc)
    assert c["probe_beats_random_and_scratch"][10]["holds"] is True
    assert c["probe_beats_random_and_scratch"][50]["holds"] is False  # scratch's interval reaches the probe's
    assert c["largest_k"] == 50 and c["finetune_minus_probe"]["finetune_all"]["diff"] == pytest.approx(0.1)
    assert res.main([str(run)]) == 0
    table = (run / "results.md").read_text()
    assert "| linear probe, source-pretrained features | 0.820 ± 0.050 | 0.860 ± 0.025 | 3 |" in table
    assert "NOT above both rivals' at k = 50" in table
    assert json.loads((run / "results.json").read_text())["claims"]["largest_k"] == 50
    assert (run / "accuracy_vs_k.png").stat().st_size > 1000


def test_sweep_manifests_batches_and_epochs(tmp_path: Path) -> None:
    """sweep.py: the seeded k-image manifests load as a dataset; tiny sets get small batches."""
    from resnet_transfer.images import list_images

    sw = _load("sweep")
    data = tmp_path / "target"
    for cls in ("7", "8", "9"):
        (data / "train" / cls).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(data / "train" / cls / f"d{i:04d}_0.png")
    a = sw.write_manifest(data, 5, seed=0)
    images = list_images(a)
    assert len(images) == 15 and sorted(np.bincount(images.labels).tolist()) == [5, 5, 5]
    assert a.read_text() == sw.write_manifest(data, 5, seed=0).read_text()
    assert a.read_text() != sw.write_manifest(data, 5, seed=1).read_text()
    assert sw.batch_for(5, 3, 32) == 4 and sw.batch_for(200, 3, 32) == 32
    assert [sw.epochs_for(k, {1: 10, 50: 8, 100: 6}, 3) for k in (5, 50, 99, 200)] == [10, 8, 8, 6]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("rt") is None, reason="needs bash and rt")
def test_recipe_shows_both_claims_on_a_small_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {
        **os.environ,
        "SOURCE_RENDERS": "4",
        "SOURCE_EPOCHS": "7",  # 4 drawings x 7 epochs = ~25k images: past the slow start (recipe README)
        "TARGET_RENDERS": "2",
        "TEST_RENDERS": "1",
        "CURVE_KS": "5,10",
        "BIG_K": "50",
        "SEEDS": "5",
        "FT_SEEDS": "3",  # 2 seeds give a t-interval of +-12.7 sd: from scratch at chance could not be told apart
        "SCRATCH_KS": "10,50",
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(
        ["bash", str(RECIPE / "run.sh"), str(run)], env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "results.md").exists() and (run / "accuracy_vs_k.png").exists()
    c = json.loads((run / "results.json").read_text())["claims"]
    beats = c["probe_beats_random_and_scratch"]
    assert sorted(int(k) for k in beats) == [5, 10, 50]
    assert all(v["holds"] for v in beats.values()), beats
    for method, d in c["finetune_minus_probe"].items():  # a weak source model: finetuning must at least keep up
        assert d["ci95"][1] > 0, (method, d)


def test_finetune_no_hflip_drops_the_flip() -> None:
    """Digits need `rt finetune --no-hflip`: a mirrored 2 looks like a 5."""
    from torchvision import transforms as T

    from resnet_transfer.finetuning import FinetuneConfig
    from resnet_transfer.images import TransformConfig, train_transform

    def has_flip(t: T.Compose) -> bool:
        return any(isinstance(s, T.RandomHorizontalFlip) for s in t.transforms)

    cfg = TransformConfig(input_size=32, resize_size=37)
    assert has_flip(train_transform(cfg)) and not has_flip(train_transform(cfg, hflip=False))
    assert FinetuneConfig(out=Path("x")).hflip is True
    assert FinetuneConfig.from_json(FinetuneConfig(out=Path("x"), hflip=False).to_json()).hflip is False
