"""Exports loaded where users serve models: plain timm (`local-dir:`, timm's own transforms) and ONNX under
onnxruntime; both must give the top-1 `rt predict` gives. Also `rt predict` on a zip of the same images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from resnet_transfer.cache import ExtractConfig, extract
from resnet_transfer.cli import app
from resnet_transfer.head import FitHeadConfig, fit_head, read_model_dir
from resnet_transfer.images import eval_transform_uint8, list_images, load_image
from resnet_transfer.models import PredictConfig, predict
from tests.test_sources import write_zip

runner = CliRunner()


def _cache(data: Path, out: Path) -> Path:
    extract(ExtractConfig(data=data, out=out, model="resnet18", weights="none", image_size=64, precision="fp32"))
    return out


@pytest.fixture(scope="module")
def head_dirs(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A linear head (standardised features: the fold is exercised) and an MLP head, on one cache."""
    tmp = tmp_path_factory.mktemp("heads")
    cache = _cache(image_folder, tmp / "f.h5")
    fit_head(FitHeadConfig(cache=cache, out=tmp / "linear"))
    fit_head(FitHeadConfig(cache=cache, out=tmp / "mlp", hidden=16))
    return {"linear": tmp / "linear", "mlp": tmp / "mlp"}


def _rt_top1(model_dir: Path, inputs: list[object]) -> dict[str, str]:
    res = predict(PredictConfig(model_dir=model_dir, inputs=inputs, top=1, precision="fp32", compile="off"))
    return {Path(r["path"]).name: r["top"][0][0] for r in res.rows}


def test_timm_export_loads_in_plain_timm_with_the_same_top1(
    head_dirs: dict[str, Path], image_folder: Path, tmp_path: Path
) -> None:
    import timm
    from timm.data import create_transform, resolve_data_config

    out = tmp_path / "timm-model"
    r = runner.invoke(app, ["export", str(head_dirs["linear"]), "--format", "timm", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 3
    assert config["label_names"] == ["circle", "square", "triangle"]
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 64, 64] and pcfg["crop_mode"] == "center"
    t = read_model_dir(head_dirs["linear"]).identity.transform  # timm's eval resize is rt's: floor(size / crop_pct)
    assert math.floor(64 / pcfg["crop_pct"]) == t.resize_size and pcfg["interpolation"] == t.interpolation
    assert pcfg["mean"] == list(t.mean) and pcfg["std"] == list(t.std)

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=model))
    listing = list_images(image_folder)
    names = config["label_names"]
    with torch.no_grad():
        got = {
            Path(p).name: names[int(model(transform(load_image(image_folder / p)).unsqueeze(0)).argmax())]
            for p in listing.paths
        }
    assert got == _rt_top1(head_dirs["linear"], [image_folder])


def test_timm_export_refuses_an_mlp_head_and_says_which_heads_can(head_dirs: dict[str, Path], tmp_path: Path) -> None:
    r = runner.invoke(app, ["export", str(head_dirs["mlp"]), "--format", "timm", "--out", str(tmp_path / "t")])
    assert r.exit_code == 2
    assert "MLP head" in r.output and "--format onnx" in r.output
    assert not (tmp_path / "t").exists()


def test_onnx_export_under_onnxruntime_predicts_as_rt_predict(
    head_dirs: dict[str, Path], image_folder: Path, tmp_path: Path
) -> None:
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    r = runner.invoke(app, ["export", str(head_dirs["linear"]), "--format", "onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    crop = eval_transform_uint8(read_model_dir(head_dirs["linear"]).identity.transform)
    listing = list_images(image_folder)
    pixels = np.stack([crop(load_image(image_folder / p)).numpy() for p in listing.paths]).astype(np.float32) / 255
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = session.run(None, {sidecar["input"]["name"]: pixels})[0]
    got = {Path(p).name: sidecar["classes"][int(k)] for p, k in zip(listing.paths, logits.argmax(1))}
    assert got == _rt_top1(head_dirs["linear"], [image_folder])


def test_predict_reads_a_zip_as_it_reads_the_folder(
    head_dirs: dict[str, Path], image_folder: Path, tmp_path: Path
) -> None:
    data = write_zip(image_folder, tmp_path / "d.zip")
    want = predict(PredictConfig(model_dir=head_dirs["linear"], inputs=[image_folder], precision="fp32"))
    got = predict(PredictConfig(model_dir=head_dirs["linear"], inputs=[data], precision="fp32"))
    assert [Path(r["path"]).name for r in got.rows] == [Path(r["path"]).name for r in want.rows]
    assert np.allclose(got.probabilities, want.probabilities, atol=1e-6)


def test_evaluate_on_a_zip_reports_as_on_the_folder_and_draws_its_worst(
    head_dirs: dict[str, Path], image_folder: Path, tmp_path: Path
) -> None:
    data = write_zip(image_folder, tmp_path / "d.zip")
    args = ["evaluate", str(head_dirs["linear"]), "--worst", "4"]
    r = runner.invoke(app, [*args, "--data", str(data), "--out", str(tmp_path / "z")])
    assert r.exit_code == 0, r.output
    f = runner.invoke(app, [*args, "--data", str(image_folder), "--out", str(tmp_path / "f")])
    zipped, folder = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("z", "f"))
    assert zipped["accuracy"] == folder["accuracy"] and f.exit_code == 0
    assert (tmp_path / "z" / "worst.png").is_file() and "not found" not in r.output
