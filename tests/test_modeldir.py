from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resnet_transfer.backbones import BackboneIdentity, TransformConfig
from resnet_transfer.errors import ModelDirError
from resnet_transfer.head import HeadModule
from resnet_transfer.modeldir import read_model_dir, write_model_dir


def _write(out: Path) -> HeadModule:
    ident = BackboneIdentity("timm:resnet18", "resnet18", "none", "random:seed=0", TransformConfig(32, 36), 8)
    head = HeadModule(8, 3)
    write_model_dir(out, "head", ident, ["a", "b", "c"], head.config, {"head.safetensors": head.state_dict()})
    return head


def test_roundtrip(tmp_path: Path) -> None:
    head = _write(tmp_path / "m")
    md = read_model_dir(tmp_path / "m")
    assert md.kind == "head" and md.classes == ["a", "b", "c"] and md.head_config == head.config
    state = md.load_tensors("head.safetensors")
    assert torch.equal(state["net.weight"], head.state_dict()["net.weight"])


@pytest.mark.parametrize("damage", ["missing_weights", "edited_weights", "missing_meta", "edited_meta", "newer_format"])
def test_damaged_directory_is_refused_with_the_file_named(tmp_path: Path, damage: str) -> None:
    out = tmp_path / "m"
    _write(out)
    meta = json.loads((out / "meta.json").read_text())
    if damage == "missing_weights":
        (out / "head.safetensors").unlink()
        needle = "head.safetensors: missing"
    elif damage == "edited_weights":
        data = bytearray((out / "head.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (out / "head.safetensors").write_bytes(bytes(data))
        needle = "head.safetensors: changed"
    elif damage == "missing_meta":
        (out / "meta.json").unlink()
        needle = "meta.json: missing"
    elif damage == "edited_meta":
        (out / "meta.json").write_text("{not json")
        needle = "meta.json: unreadable"
    else:
        meta["format_version"] = 99
        (out / "meta.json").write_text(json.dumps(meta))
        needle = "format version 99"
    with pytest.raises(ModelDirError, match=needle.replace(".", r"\.")):
        read_model_dir(out)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="not a head/model directory"):
        read_model_dir(tmp_path / "nothing")
