"""The offline_digits recipe: its data builder (fast) and, on a small version, the transfer claims (slow).

The slow test runs the real recipe script (rt commands only) for k = 10 and the probes + from scratch only, and checks
what the recipe is for: at k = 10 images per class, a linear probe on source-pretrained features beats a
linear probe on random-init features and training from scratch.
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

import pytest
from PIL import Image

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "offline_digits"


def _load_make_data():
    spec = importlib.util.spec_from_file_location("offline_digits_make_data", RECIPE / "make_data.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_make_data_layout_sizes_and_determinism(tmp_path: Path) -> None:
    md = _load_make_data()
    small = dict(size=48, source_renders=1, source_test_per_class=2, target_test_per_class=3, max_train_scans=25)
    cfg = md.make_data(md.DigitsConfig(out=tmp_path / "a", **small))
    root = tmp_path / "a"
    assert sorted(p.name for p in (root / "source" / "train").iterdir()) == [str(c) for c in range(7)]
    splits = sorted(p.name for p in (root / "target").iterdir())
    assert splits == ["test", "train_all", "train_k10", "train_k20", "train_k5"]
    for split in splits:
        assert sorted(p.name for p in (root / "target" / split).iterdir()) == ["7", "8", "9"]
    for k in (5, 10, 20):
        assert cfg.counts[f"target/train_k{k}"] == {"7": k, "8": k, "9": k}
    assert cfg.counts["target/train_all"] == {"7": 25, "8": 25, "9": 25}
    assert cfg.counts["target/test"] == {"7": 3, "8": 3, "9": 3}
    # the k subsets are nested, and no test scan is used for training
    for cls in ("7", "8", "9"):
        names = {
            k: {p.name for p in (root / "target" / f"train_{k}" / cls).iterdir()} for k in ("k5", "k10", "k20", "all")
        }
        assert names["k5"] <= names["k10"] <= names["k20"] <= names["all"]
        test_scans = {p.name.split("_")[0] for p in (root / "target" / "test" / cls).iterdir()}
        assert not test_scans & {n.split("_")[0] for n in names["all"]}
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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("rt") is None, reason="needs bash and rt")
def test_recipe_shows_transfer_at_k10(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {
        **os.environ,
        "KS": "k10",
        "METHODS": "probe scratch",
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(
        ["bash", str(RECIPE / "run.sh"), str(run)], env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def acc(method: str) -> float:
        return float(json.loads((run / "eval" / method / "k10" / "report.json").read_text())["accuracy"])

    src, rnd, scratch = acc("probe_source"), acc("probe_random"), acc("scratch")
    assert src > rnd + 0.1, (src, rnd, scratch)
    assert src > scratch + 0.1, (src, rnd, scratch)
    assert (run / "results.md").exists() and (run / "accuracy_vs_k.png").exists()


def test_finetune_no_hflip_drops_the_flip() -> None:
    """Digits need `rt finetune --no-hflip`: a mirrored 2 looks like a 5."""
    from torchvision import transforms as T

    from resnet_transfer.backbones import TransformConfig
    from resnet_transfer.data import train_transform
    from resnet_transfer.finetune import FinetuneConfig

    def has_flip(t: T.Compose) -> bool:
        return any(isinstance(s, T.RandomHorizontalFlip) for s in t.transforms)

    cfg = TransformConfig(input_size=32, resize_size=37)
    assert has_flip(train_transform(cfg)) and not has_flip(train_transform(cfg, hflip=False))
    assert FinetuneConfig(out=Path("x")).hflip is True
    assert FinetuneConfig.from_json(FinetuneConfig(out=Path("x"), hflip=False).to_json()).hflip is False
