"""`rt fit-head --views K`: augmented views of the training images through the cache's backbone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from typer.testing import CliRunner

from resnet_transfer.base import DataError, RtError, UsageError
from resnet_transfer.cache import ExtractConfig, FeatureCache, extract
from resnet_transfer.cli import app
from resnet_transfer.head import FitHeadConfig, fit_head

SIZE = 32


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("views")
    data = make_image_folder(root / "data", per_class=6, seed=4)
    out = root / "train.h5"
    extract(ExtractConfig(data=data, out=out, model="resnet18", weights="none", image_size=SIZE))
    return out


def test_cli_fits_on_eval_crops_plus_views_and_reports_them(views_cache: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["fit-head", "--cache", str(views_cache), "--head", "linear", "--json"]
    plain = runner.invoke(app, [*base, "--out", str(tmp_path / "plain"), "--views", "0"])
    viewed = runner.invoke(app, [*base, "--out", str(tmp_path / "views"), "--views", "3", "--no-hflip"])
    assert plain.exit_code == 0 and viewed.exit_code == 0, viewed.output
    a = json.loads((tmp_path / "plain" / "report.json").read_text())
    b = json.loads((tmp_path / "views" / "report.json").read_text())
    assert a["views"] is None
    v = b["views"]
    assert v["views"] == 3 and v["hflip"] is False and v["images"] == b["n_train"] == a["n_train"]
    assert v["rows"] == 3 * b["n_train"]
    assert b["n_val"] == a["n_val"]  # validation: the same eval crops of the same held-out images
    split_a, split_b = (json.loads((tmp_path / d / "split.json").read_text()) for d in ("plain", "views"))
    assert split_a == split_b
    from safetensors.numpy import load_file

    wa, wb = (load_file(str(tmp_path / d / "head.safetensors")) for d in ("plain", "views"))
    assert any(not np.allclose(wa[k], wb[k]) for k in wa)  # the views changed the fit


def test_view_features_are_the_backbone_on_the_seeded_crops(views_cache: Path) -> None:
    """Each view row is the cache's backbone on the crop the seeded augmentation makes, in order; the
    global RNG is left as it was."""
    import torch

    from resnet_transfer.backbone import backbone_from_identity
    from resnet_transfer.base import autocast
    from resnet_transfer.head import VIEW_CROP_SCALE, view_features
    from resnet_transfer.images import image_root, load_image, normalize_batch, train_transform_uint8

    with FeatureCache(views_cache) as cache:
        rows = np.array([4, 1])
        torch.manual_seed(123)
        X, y, report = view_features(cache, rows, 2, seed=7, hflip=True)
        after = torch.rand(1)
        torch.manual_seed(123)
        assert torch.equal(torch.rand(1), after)  # the views drew from their own generator
        assert X.shape == (4, cache.dim) and list(y) == [cache.labels[4]] * 2 + [cache.labels[1]] * 2
        again, _, _ = view_features(cache, rows, 2, seed=7, hflip=True)
        assert np.array_equal(X, again)
        bb = backbone_from_identity(cache.identity)
        net = bb.net.eval().to(memory_format=torch.channels_last)
        folder = image_root(cache).folder
        tcfg = bb.identity.transform
        torch.manual_seed(7)
        aug = train_transform_uint8(tcfg, 0.0, VIEW_CROP_SCALE, True)
        crops = []
        for r in rows:
            img = np.array(load_image(folder / cache.paths[int(r)], draft=tcfg.draft_target()))
            crops += [aug(img).contiguous() for _ in range(2)]
        with torch.inference_mode(), autocast(torch.device("cpu"), report["precision"]):
            want = net(normalize_batch(torch.stack(crops), tcfg, torch.channels_last)).float().numpy()
        assert np.allclose(X, want, atol=1e-4)
        assert not np.allclose(X[0], X[1])  # two different crops of one image


def test_moved_images_name_root_and_root_finds_them(views_cache: Path, tmp_path: Path, quiet_reporter) -> None:
    with FeatureCache(views_cache) as c:
        folder = Path(str(c.attrs["root"]))
    cache = tmp_path / "train.h5"
    shutil.copy(views_cache, cache)
    shutil.copytree(str(views_cache) + ".chunks", str(cache) + ".chunks")
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    shutil.move(str(folder), str(tmp_path / "gone"))
    try:
        with pytest.raises(DataError) as e:
            fit_head(FitHeadConfig(cache=cache, out=tmp_path / "h", views=2, head_type="linear"))
        assert "--root" in e.value.hint and "images were not found" in e.value.message
        r = fit_head(FitHeadConfig(cache=cache, out=tmp_path / "h2", views=2, head_type="linear", root=moved))
        assert r.report["views"]["images_from"] == str(moved)
    finally:
        shutil.move(str(tmp_path / "gone"), str(folder))


def test_no_validation_rows_fits_without_views_and_says_why(tmp_path: Path, quiet_reporter) -> None:
    data = make_image_folder(tmp_path / "one", per_class=1, seed=5)  # one image per class: nothing to hold out
    extract(ExtractConfig(data=data, out=tmp_path / "one.h5", model="resnet18", weights="none", image_size=SIZE))
    r = fit_head(FitHeadConfig(cache=tmp_path / "one.h5", out=tmp_path / "h", views=2, head_type="linear"))
    assert r.report["views"]["views"] == 0 and "no validation rows" in r.report["views"]["why_not"]
    assert any("--views 2" in w for w in quiet_reporter.warnings)


def test_views_over_the_memory_budget_and_negative_views_are_usage_errors(views_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as e:
        fit_head(FitHeadConfig(cache=views_cache, out=tmp_path / "h", views=4, max_memory_gb=1e-6, head_type="linear"))
    assert "--max-memory-gb" in e.value.message and "--views" in e.value.hint
    with pytest.raises(UsageError):
        FitHeadConfig(cache=views_cache, out=tmp_path / "h", views=-1)


def test_auto_views_below_the_image_limit_within_the_time_budget(views_cache: Path, tmp_path: Path) -> None:
    r = fit_head(FitHeadConfig(cache=views_cache, out=tmp_path / "h", views="auto", head_type="linear"))
    v = r.report["views"]
    assert v["asked"] == "auto" and v["views"] == 8 and v["rows"] == 8 * r.report["n_train"]
    assert v["timed_ms_per_view"] > 0 and v["budget_s"] == 30.0


@pytest.mark.parametrize(
    ("setting", "why"),
    [("AUTO_MAX_IMAGES", "training images: auto adds views below"), ("AUTO_BUDGET_S", "would take")],
)
def test_auto_views_stand_down_with_the_reason(views_cache: Path, tmp_path: Path, monkeypatch, setting, why) -> None:
    from resnet_transfer.head import views

    monkeypatch.setattr(views, setting, 5 if setting == "AUTO_MAX_IMAGES" else 1e-9)
    r = fit_head(FitHeadConfig(cache=views_cache, out=tmp_path / "h", views="auto", head_type="linear"))
    assert r.report["views"]["views"] == 0 and why in r.report["views"]["why_not"]


def test_auto_views_without_the_images_fit_on_the_eval_crops(views_cache: Path, tmp_path: Path) -> None:
    r = fit_head(
        FitHeadConfig(cache=views_cache, out=tmp_path / "h", views="auto", head_type="linear", root=tmp_path / "none")
    )
    assert r.report["views"]["views"] == 0 and r.report["views"]["asked"] == "auto"
    assert f"not in {tmp_path / 'none'}" in r.report["views"]["why_not"]  # said, and the fit went on


def test_views_option_takes_auto_or_a_count(views_cache: Path, tmp_path: Path) -> None:
    from resnet_transfer.head.views import parse_views

    assert parse_views("auto") == "auto" and parse_views(" 3 ") == 3 and parse_views(0) == 0
    for bad in ("many", "-2", "1.5"):
        with pytest.raises(UsageError):
            parse_views(bad)
    res = CliRunner().invoke(
        app, ["fit-head", "--cache", str(views_cache), "--out", str(tmp_path / "h"), "--views", "x"]
    )
    assert res.exit_code == 2 and "--views" in res.output


def test_auto_views_without_the_weights_fit_on_the_eval_crops(tmp_path: Path, quiet_reporter) -> None:
    """A cache whose --weights file is gone still fits (as before the views); an explicit K says why."""
    from resnet_transfer.backbone import build_backbone, save_backbone

    bb = build_backbone("resnet18", "none", SIZE)
    ckpt = tmp_path / "mine.safetensors"
    save_backbone(bb.net, ckpt, bb.identity)
    data = make_image_folder(tmp_path / "data", per_class=4, seed=6)
    cache = tmp_path / "c.h5"
    extract(ExtractConfig(data=data, out=cache, model="resnet18", weights=str(ckpt), image_size=SIZE))
    ckpt.unlink()
    r = fit_head(FitHeadConfig(cache=cache, out=tmp_path / "h", head_type="linear"))
    assert r.report["views"]["views"] == 0 and r.report["views"]["asked"] == "auto"
    assert any("fitting on the eval crops only" in m for m in quiet_reporter.messages)
    with pytest.raises(RtError) as e:
        fit_head(FitHeadConfig(cache=cache, out=tmp_path / "h2", head_type="linear", views=2))
    assert "mine.safetensors" in str(e.value)


def test_an_image_changed_since_extract_is_noticed(tmp_path: Path, quiet_reporter) -> None:
    """Views of a file that is no longer the one the cache holds the eval crop of would mix two images:
    an explicit --views says which file and what to run; auto fits on the eval crops and says why."""
    data = make_image_folder(tmp_path / "data", per_class=4, seed=7)
    cache = tmp_path / "c.h5"
    extract(ExtractConfig(data=data, out=cache, model="resnet18", weights="none", image_size=SIZE))
    with FeatureCache(cache) as c:
        paths = [data / str(p) for p in c.paths]
    contents = [p.read_bytes() for p in paths]
    for p, b in zip(paths, contents[1:] + contents[:1]):  # every file now holds another image's bytes
        p.write_bytes(b)
    with pytest.raises(DataError) as e:
        fit_head(FitHeadConfig(cache=cache, out=tmp_path / "h", head_type="linear", views=2, val_fraction=0.5))
    assert "changed since `rt extract`" in e.value.message and "rt extract" in e.value.hint
    r = fit_head(FitHeadConfig(cache=cache, out=tmp_path / "h2", head_type="linear", val_fraction=0.5))
    assert r.report["views"]["views"] == 0 and "changed since" in r.report["views"]["why_not"]
