"""Weights in the hubs' local caches: a damaged, cut-short, replaced or misnamed file is an error that names
the file, says it is damaged (not that a download failed) and how to fix it; a good one loads offline and
is hashed only once. Fake hubs with checkpoints the tests save themselves (tests/fake_hub.py); nothing is
downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fake_hub import hf_snapshot, timm_state, tv_checkpoint, use_hubs

from resnet_transfer.backbone import build_backbone
from resnet_transfer.base import WeightsError


@pytest.fixture
def hubs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    import torch.hub

    def no_download(*_a: object, **_k: object) -> None:
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return use_hubs(monkeypatch, tmp_path)


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _refused(model: str) -> WeightsError:
    with pytest.raises(WeightsError) as info:
        build_backbone(model, "imagenet")
    return info.value


def test_cached_torchvision_file_loads_offline_and_is_hashed_once(
    hubs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from resnet_transfer.backbone import check_weights_file, record_file

    path = tv_checkpoint(hubs[1], "resnet18", monkeypatch)
    bb = build_backbone("tv:resnet18", "imagenet")
    saved = torch.load(path, weights_only=True)
    torch.testing.assert_close(bb.net.state_dict()["conv1.weight"], saved["conv1.weight"])
    assert str(path.resolve()) in json.loads(record_file().read_text())  # remembered by path and stat
    assert check_weights_file(path, "torchvision", "fix") == "remembered"


def test_truncated_torchvision_file_is_named_as_damaged_with_the_fix(
    hubs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tv_checkpoint(hubs[1], "resnet18", monkeypatch)
    build_backbone("tv:resnet18", "imagenet")  # passes, and is remembered
    _cut(path)  # a full disk or an interrupted copy: another size, so it is hashed again
    err = _refused("tv:resnet18")
    assert str(path) in err.message and "damaged" in err.message and "download" not in err.message
    assert f"delete {path}" in str(err.hint) and "--weights PATH" in str(err.hint)


def test_replaced_torchvision_file_is_caught_even_though_it_loads(
    hubs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.models as tvm

    path = tv_checkpoint(hubs[1], "resnet18", monkeypatch)
    build_backbone("tv:resnet18", "imagenet")
    torch.manual_seed(99)
    torch.save(tvm.resnet18().state_dict(), path)  # a loadable checkpoint, but not the one its name says
    err = _refused("tv:resnet18")
    assert str(path) in err.message and "not the file its name says" in err.message and "sha256" in err.message


def test_torchvision_file_under_a_wrong_hash_name_is_refused(
    hubs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.models as tvm

    path = tv_checkpoint(hubs[1], "resnet18", monkeypatch)
    wrong = path.with_name("resnet18-deadbeef.pth")
    path.rename(wrong)
    monkeypatch.setattr(tvm.ResNet18_Weights.IMAGENET1K_V1.value, "url", f"https://x/models/{wrong.name}")
    err = _refused("tv:resnet18")
    assert str(wrong) in err.message and "its name says deadbeef" in err.message


def test_truncated_hugging_face_blob_is_named_with_the_folder_to_delete(hubs: tuple[Path, Path]) -> None:
    snap = hf_snapshot(hubs[0], "timm/resnet18.a1_in1k", timm_state("resnet18"))
    assert build_backbone("resnet18", "imagenet").identity.weights_id == "timm:resnet18.a1_in1k"  # offline
    _cut(snap.resolve())
    err = _refused("resnet18")
    assert str(snap) in err.message and "damaged" in err.message and "not in the local cache" not in err.message
    assert "models--timm--resnet18.a1_in1k" in str(err.hint) and "--weights PATH" in str(err.hint)


def test_damaged_hugging_face_file_without_a_hash_name_says_why_it_does_not_load(hubs: tuple[Path, Path]) -> None:
    """A cache without links (Windows) keeps the file itself in the snapshot: no hash to check, but the
    safetensors error still names the file as damaged."""
    snap = hf_snapshot(hubs[0], "timm/resnet18.a1_in1k", timm_state("resnet18"))
    blob = snap.resolve()
    snap.unlink()
    snap.write_bytes(blob.read_bytes()[:1000])
    err = _refused("resnet18")
    assert str(snap) in err.message and "damaged" in err.message and "cannot be loaded" in err.message
