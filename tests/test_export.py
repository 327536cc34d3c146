"""rt finetune / rt export through the CLI, and the exported files reloaded outside this package's code."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES
from safetensors.torch import load_file
from typer.testing import CliRunner

from resnet_transfer.backbone import build_backbone
from resnet_transfer.cli import app
from resnet_transfer.head import HeadModule, read_model_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def src_model(image_folder, tmp_path_factory) -> Path:
    """The issue's "make your own source model" command, through the CLI."""
    out = tmp_path_factory.mktemp("cli") / "src"
    res = runner.invoke(
        app,
        ["finetune", "--data", str(image_folder), "--model", "resnet18", "--weights", "none", "--unfreeze", "all",
         "--out", str(out), "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--precision", "fp32"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


def _reference_logits(model_dir: Path, pixels: torch.Tensor) -> np.ndarray:
    """Logits computed independently of export.py: backbone via --weights DIR, head from its file."""
    md = read_model_dir(model_dir)
    bb = build_backbone(md.identity.model, str(model_dir))
    head = HeadModule(md.head_config["in_features"], md.head_config["num_classes"])
    head.load_state_dict(load_file(str(model_dir / "head.safetensors")))
    t = md.identity.transform
    x = (pixels - torch.tensor(t.mean).view(1, 3, 1, 1)) / torch.tensor(t.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return head(bb.net.eval()(x)).numpy()


def test_finetune_help_teaches():
    res = runner.invoke(app, ["finetune", "--help"])
    assert res.exit_code == 0
    for text in ("--unfreeze", "progressive", "--resume", "--cache", "--weights none --unfreeze all", "Examples"):
        assert text in res.output
    res = runner.invoke(app, ["export", "--help"])
    assert res.exit_code == 0 and "torchscript" in res.output and "sidecar" in res.output


def test_cli_errors_are_one_line_exit_2(image_folder, src_model, tmp_path):
    res = runner.invoke(app, ["finetune", "--data", str(image_folder), "--model", "resnet18", "--weights", "none",
                              "--unfreeze", "layer9", "--out", str(tmp_path / "x"), "--image-size", "32"])  # fmt: skip
    assert res.exit_code == 2
    assert "layer9" in res.output and "layer4, layer3, layer2, layer1" in res.output and "auto" in res.output
    res = runner.invoke(app, ["finetune", "--data", str(image_folder), "--out", str(src_model)])
    assert res.exit_code == 2 and "already holds a model" in res.output
    res = runner.invoke(app, ["export", str(src_model), "--format", "tflite"])
    assert res.exit_code == 2 and "torchscript" in res.output


def test_cli_model_dir_contents(src_model):
    md = read_model_dir(src_model)
    assert md.kind == "finetuned" and md.classes == list(CLASSES)
    assert md.identity.weights == str(src_model) and md.identity.weights_id.startswith("sha256:")
    report = json.loads((src_model / "report.json").read_text())
    assert report["unfreeze"] == "all" and report["config"]["lr_mult"] is None
    assert {p["part"]: p["lr"] for p in report["plan"]}["act1"] == pytest.approx(1e-3)  # random init: lr_mult 1
    res = runner.invoke(app, ["info", str(src_model), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["kind"] == "finetuned"


def test_export_torchscript_round_trip(src_model, tmp_path):
    out = tmp_path / "serve" / "model.pt"
    res = runner.invoke(app, ["export", str(src_model), "--format", "torchscript", "--out", str(out)])
    assert res.exit_code == 0, res.output
    side = json.loads(out.with_name("model.pt.json").read_text())
    assert side["classes"] == list(CLASSES) and side["preprocessing"]["input_size"] == 32
    assert side["preprocessing"]["resize_size"] == read_model_dir(src_model).identity.transform.resize_size
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(out))
    with torch.no_grad():
        got = loaded(pixels).numpy()
    assert got.shape == (5, 3)
    assert np.allclose(got, _reference_logits(src_model, pixels), rtol=1e-4, atol=1e-5)


def test_export_onnx_round_trip(src_model, tmp_path):
    import onnx

    out = tmp_path / "model.onnx"
    res = runner.invoke(app, ["export", str(src_model), "--format", "onnx", "--out", str(out)])
    assert res.exit_code == 0, res.output
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    side = json.loads((tmp_path / "model.onnx.json").read_text())
    assert side["input"]["name"] == "pixels" and side["classes"] == list(CLASSES)
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    try:
        import onnxruntime as ort

        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels.numpy()})[
            0
        ]
    except ImportError:  # onnx's own reference evaluator: slow but exact enough
        from onnx.reference import ReferenceEvaluator

        got = ReferenceEvaluator(str(out)).run(None, {"pixels": pixels.numpy()})[0]
    assert got.shape == (4, 3)
    assert np.allclose(got, _reference_logits(src_model, pixels), rtol=1e-4, atol=1e-4)
