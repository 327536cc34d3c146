from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resnet_transfer.backbone import BackboneIdentity
from resnet_transfer.base import ModelDirError, UsageError
from resnet_transfer.head import HeadModule, read_model_dir, write_model_dir
from resnet_transfer.images import TransformConfig


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


# ------------------------------------------------------------------------------- load_classifier


def _head_dir(out: Path, features: list[str] | None = None, in_features: int | None = None) -> Path:
    from resnet_transfer.backbone import build_backbone

    bb = build_backbone("resnet18", "none", 32)
    torch.manual_seed(3)
    head = HeadModule(in_features or bb.num_features, 3)
    head.mean.normal_()
    config = {**head.config, **({"features": features} if features else {})}
    write_model_dir(out, "head", bb.identity, ["a", "b", "c"], config, {"head.safetensors": head.state_dict()})
    return out


def test_load_classifier_is_backbone_then_head(tmp_path: Path) -> None:
    from resnet_transfer.backbone import build_backbone
    from resnet_transfer.models import Classifier, load_classifier

    clf, md = load_classifier(_head_dir(tmp_path / "h"))
    assert isinstance(clf, Classifier) and isinstance(clf, torch.nn.Module) and not clf.training
    assert md.kind == "head" and md.classes == ["a", "b", "c"]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref_net = build_backbone("resnet18", "none", 32).net.eval()
    with torch.no_grad():
        ref = clf.head(ref_net(x))
        assert torch.allclose(clf(x), ref, atol=1e-5)
    # one set of parameters: net and head, nothing duplicated
    assert {n.split(".")[0] for n, _ in clf.named_parameters()} == {"net", "head"}

    pix, _ = load_classifier(tmp_path / "h", normalize=True)  # export's view: pixels in [0, 1]
    t = md.identity.transform
    with torch.no_grad():
        want = clf((x - torch.tensor(t.mean).view(1, 3, 1, 1)) / torch.tensor(t.std).view(1, 3, 1, 1))
        assert torch.allclose(pix(x), want, atol=1e-5)


def test_load_classifier_feeds_the_heads_stage_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A head config with `features` gets the concatenated pooled features of those stages, computed by
    `backbones.pooled_stage_features` (the contract; stubbed here with its documented shape)."""
    from resnet_transfer.backbone import networks as backbones
    from resnet_transfer.models import load_classifier

    calls = []

    def pooled_stage_features(backbone, x, stages):
        calls.append(list(stages))
        frozen, _ = backbone.split("layer3")
        maps3 = frozen(x)
        out = {
            "layer3": maps3.mean((2, 3)),
            "layer4": backbone.net.forward_head(backbone.net.layer4(maps3), pre_logits=True),
        }
        return {s: out[s] for s in stages}

    monkeypatch.setattr(backbones, "pooled_stage_features", pooled_stage_features, raising=False)
    clf, _ = load_classifier(_head_dir(tmp_path / "h", ["layer3", "layer4"], in_features=256 + 512))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = clf(x)
        feats = pooled_stage_features(clf.backbone, x, ["layer3", "layer4"])
        want = clf.head(torch.cat([feats["layer3"], feats["layer4"]], 1))
    assert calls[0] == ["layer3", "layer4"] and got.shape == (2, 3)
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(UsageError, match="layer9"):
        load_classifier(_head_dir(tmp_path / "bad", ["layer9"], in_features=8))


def test_predict_feeds_a_stage_features_head_its_stages(tmp_path: Path, image_folder: Path) -> None:
    """`rt predict` on images goes through the Classifier, so a head on layer3+layer4 pooled features gets
    those (not the final features, whose width would not even fit)."""
    from resnet_transfer.backbone import pooled_stage_features
    from resnet_transfer.images import eval_transform, load_image
    from resnet_transfer.models import PredictConfig, load_classifier, predict

    hd = _head_dir(tmp_path / "h", ["layer3", "layer4"], in_features=256 + 512)
    img = sorted((image_folder / "circle").iterdir())[0]
    res = predict(PredictConfig(hd, [img], precision="fp32", batch_size=2))
    clf, md = load_classifier(hd)
    x = eval_transform(md.identity.transform)(load_image(img))[None]
    with torch.no_grad():
        f = pooled_stage_features(clf.backbone, x, ["layer3", "layer4"])
        want = clf.head.predict_proba(torch.cat([f["layer3"], f["layer4"]], 1)).numpy()
    assert res.probabilities.shape == (1, 3)
    assert abs(res.probabilities - want).max() < 1e-3
