"""The int8 forward (quantized.py) and ``--precision int8`` in rt extract / rt predict / rt finetune.

One small quantize + compile (ResNet-18 at 32 px: a few seconds) is shared by the library tests; the CLI
tests compile once more through ``rt extract``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("torchao", reason="the int8 forward needs torchao (pip install 'resnet_transfer[int8]')")

from resnet_transfer.backbone import Int8Forward, build_backbone, calibration_batch, calibration_images, require_torchao
from resnet_transfer.base import UsageError, resolve_precision
from resnet_transfer.cache import FeatureCache
from resnet_transfer.cli import app

CPU = torch.device("cpu")
SIZE = 32


@pytest.fixture(scope="module")
def int8_run() -> tuple[torch.nn.Module, Int8Forward, torch.Tensor]:
    torch.manual_seed(0)
    bb = build_backbone("resnet18", "none", SIZE)
    net = bb.net.eval().to(memory_format=torch.channels_last)
    fwd = Int8Forward(net, bb.transform, CPU)
    x = calibration_batch(bb.transform, 8)  # photo crops: what the quantizer saw, not random noise
    with torch.inference_mode():
        fwd(x)
    return net, fwd, x


def test_calibration_batch_is_the_same_on_every_call() -> None:
    bb = build_backbone("resnet18", "none", SIZE)
    a, b = calibration_batch(bb.transform, 6), calibration_batch(bb.transform, 6)
    assert a.shape == (6, 3, SIZE, SIZE)
    assert torch.equal(a, b)
    assert a.std() > 0.1  # real pixels, normalised


def test_int8_features_follow_fp32(int8_run: tuple[torch.nn.Module, Int8Forward, torch.Tensor]) -> None:
    net, fwd, x = int8_run
    with torch.inference_mode():
        ref = net(x).float()
        got = fwd(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    assert float(cos.min()) >= 0.99, cos
    assert not torch.equal(got, ref)  # it is not the fp32 graph in disguise
    assert fwd.quantize_s is not None and fwd.compile_s is not None


def test_a_row_does_not_depend_on_its_batch(int8_run: tuple[torch.nn.Module, Int8Forward, torch.Tensor]) -> None:
    _, fwd, x = int8_run
    with torch.inference_mode():
        full = fwd(x)
        short = fwd(x[:3].contiguous(memory_format=torch.channels_last))  # padded to the compiled batch
        long = fwd(torch.cat([x, x[:5]]).contiguous(memory_format=torch.channels_last))  # split
    assert short.shape == (3, full.shape[1]) and long.shape == (13, full.shape[1])
    torch.testing.assert_close(short, full[:3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(long[8:], full[:5], rtol=1e-4, atol=1e-4)


def test_int8_is_for_x86_cpus_only() -> None:
    assert resolve_precision("int8", CPU) == "int8"
    assert resolve_precision("auto", CPU) != "int8"  # never chosen for you
    with pytest.raises(UsageError, match="x86 CPUs"):
        resolve_precision("int8", torch.device("cuda"))


def test_missing_torchao_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(UsageError) as e:
        require_torchao()
    assert "resnet_transfer[int8]" in (e.value.hint or "")


def test_cli_extract_int8_records_its_precision_and_never_mixes(image_folder: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "c.h5"
    args = ["extract", "--data", str(image_folder), "--model", "resnet18", "--weights", "none"]
    args += ["--image-size", str(SIZE), "--batch-size", "8", "--out", str(out)]
    r = runner.invoke(app, [*args, "--precision", "int8"])
    assert r.exit_code == 0, r.output
    with FeatureCache(out) as c:
        assert c.precision == "int8"
        feats = c.features()
        assert feats.shape[0] == len(c.paths) and torch.isfinite(torch.as_tensor(feats)).all()
    r = runner.invoke(app, [*args, "--precision", "bf16"])
    assert r.exit_code != 0 and "int8" in r.output and "--overwrite" in r.output


def test_cli_int8_refuses_what_it_cannot_do(image_folder: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["--data", str(image_folder), "--model", "resnet18", "--weights", "none", "--image-size", str(SIZE)]
    r = runner.invoke(
        app, ["extract", *base, "--out", str(tmp_path / "m.h5"), "--precision", "int8", "--cut", "layer3"]
    )
    assert r.exit_code == 2, r.output
    assert "pooled features only" in r.output and not (tmp_path / "m.h5").exists()
    r = runner.invoke(
        app,
        ["finetune", *base, "--unfreeze", "all", "--epochs", "1", "--out", str(tmp_path / "ft"), "--precision", "int8"],
    )
    assert r.exit_code == 2, r.output
    assert "not for training" in r.output


def test_calibration_images_are_chosen_the_same_way_and_named_by_content(image_folder: Path, tmp_path: Path) -> None:
    import shutil

    paths, name = calibration_images(image_folder, n=4)
    again, name2 = calibration_images(image_folder, n=4)
    assert paths == again and name == name2 and name.startswith("int8@") and len(paths) == 4
    copy = tmp_path / "copy"
    shutil.copytree(image_folder, copy)
    assert calibration_images(copy, n=4)[1] == name  # the bytes count, not where they are
    changed = Path(calibration_images(copy, n=4)[0][0])
    changed.write_bytes(next(p for p in sorted(image_folder.rglob("*.png")) if p.name != changed.name).read_bytes())
    assert calibration_images(copy, n=4)[1] != name


def test_cli_extract_int8_with_own_calibration_is_kept_apart(image_folder: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "c.h5"
    args = ["extract", "--data", str(image_folder), "--model", "resnet18", "--weights", "none"]
    args += ["--image-size", str(SIZE), "--batch-size", "8", "--out", str(out), "--precision", "int8"]
    r = runner.invoke(app, [*args, "--calibration", str(image_folder)])
    assert r.exit_code == 0, r.output
    with FeatureCache(out) as c:
        assert c.precision == calibration_images(image_folder)[1]
    r = runner.invoke(app, args)  # the default calibration set: other rows
    assert r.exit_code != 0 and "--calibration" in r.output and "--overwrite" in r.output
    r = runner.invoke(app, [*args, "--calibration", str(image_folder)])  # the same set: nothing to do
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args[:-2], "--calibration", str(image_folder)])  # without int8
    assert r.exit_code == 2 and "--precision int8" in r.output
