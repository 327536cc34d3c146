from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
import torch

from resnet_transfer.backbone import build_backbone, load_state_file, parse_model_name, save_backbone
from resnet_transfer.base import UsageError, WeightsError


@pytest.mark.parametrize(("model", "width", "l3"), [("resnet18", 512, 256), ("resnet50", 2048, 1024)])
def test_stages_and_cut_shapes(model: str, width: int, l3: int) -> None:
    bb = build_backbone(model, "none", image_size=64)
    assert bb.stages == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert bb.num_features == width
    frozen, rest = bb.split("layer3")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = frozen(x)
        assert tuple(maps.shape) == (2, l3, 4, 4)  # stride 16
        torch.testing.assert_close(rest(maps), bb.net(x))


def test_groups_cover_every_parameter_once() -> None:
    bb = build_backbone("resnet18", "none")
    names = [n for n, _ in bb.stage_groups()]
    assert names == ["act1", "layer1", "layer2", "layer3", "layer4", "head"]
    grouped = [id(p) for _, mods in bb.stage_groups() for m in mods for p in m.parameters()]
    assert sorted(grouped) == sorted(id(p) for p in bb.net.parameters())


def test_other_timm_cnn_stages_come_from_feature_info() -> None:
    bb = build_backbone("convnext_atto", "none", image_size=64)
    assert bb.stages == ["stages.0", "stages.1", "stages.2", "stages.3"]
    frozen, rest = bb.split("stages.2")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rest(frozen(x)), bb.net(x), rtol=1e-3, atol=1e-4)


def test_unknown_stage_lists_valid_ones() -> None:
    bb = build_backbone("resnet18", "none")
    with pytest.raises(UsageError, match="layer1, layer2"):
        bb.check_stage("layer5")


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UsageError, match="resnet50"):
        parse_model_name("resnet5O")
    with pytest.raises(UsageError, match="torchvision"):
        parse_model_name("tv:vgg16")
    assert parse_model_name("tv:resnet34").source == "tv"
    assert parse_model_name("resnet50.a1_in1k").arch == "resnet50"


def test_random_init_is_reproducible() -> None:
    a = build_backbone("resnet18", "none", image_size=32)
    b = build_backbone("resnet18", "none", image_size=32)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.net(x), b.net(x))
    assert a.identity == b.identity


def test_offline_imagenet_error_is_fast_and_actionable() -> None:
    for model in ("resnet18", "tv:resnet18"):
        t0 = time.perf_counter()
        with pytest.raises(WeightsError) as info:
            build_backbone(model, "imagenet")
        assert time.perf_counter() - t0 < 10
        text = str(info.value)
        assert "--weights PATH" in text and "--weights none" in text and "cache" in text


def test_torchvision_layout_checkpoint_with_any_classifier(tmp_path: Path) -> None:
    import torchvision

    tv = torchvision.models.resnet18(num_classes=7)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    bb = build_backbone("tv:resnet18", str(tmp_path / "tv.pth"), image_size=64)
    tv.fc = torch.nn.Identity()
    tv.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb.net(x), tv(x))
    assert bb.identity.weights_id.startswith("sha256:")


def test_wrapped_and_prefixed_timm_checkpoint(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(3)
    src = timm.create_model("resnet18", num_classes=4)
    state = {"model_state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    torch.save(state, tmp_path / "ckpt.pt")
    bb = build_backbone("resnet18", str(tmp_path / "ckpt.pt"))
    src.reset_classifier(0)
    src.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb.net(x), src(x))


def test_wrong_architecture_is_refused(tmp_path: Path) -> None:
    import timm

    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="do not fit resnet50"):
        build_backbone("resnet50", str(tmp_path / "r18.pth"))


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("echo pwned > /tmp/rt_pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    Path("/tmp/rt_pwned").unlink(missing_ok=True)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv1.weight": _Evil()}, f)
    with pytest.raises(WeightsError, match="pickled code is refused"):
        load_state_file(tmp_path / "evil.pth")
    assert not Path("/tmp/rt_pwned").exists()


def test_saved_backbone_roundtrip_keeps_transform(tmp_path: Path) -> None:
    bb = build_backbone("resnet18", "none", image_size=48)
    with torch.no_grad():
        for p in bb.net.parameters():
            p.add_(0.01)
    tmp_path.mkdir(exist_ok=True)
    save_backbone(bb.net, tmp_path / "backbone.safetensors", bb.identity)
    again = build_backbone("resnet18", str(tmp_path))  # a directory holding backbone.safetensors
    assert again.transform == bb.transform
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(again.net(x), bb.net(x))
    with pytest.raises(WeightsError, match="no such file"):
        build_backbone("resnet18", str(tmp_path / "missing.pth"))


def test_draft_is_on_for_new_identities_and_off_for_recorded_ones_without_it() -> None:
    from resnet_transfer.images import TransformConfig

    t = build_backbone("resnet18", "none", image_size=32).transform
    assert t.draft is True and t.draft_target() == t.resize_size
    assert t.with_size(48).draft is True
    old = {k: v for k, v in t.to_dict().items() if k != "draft"}  # an identity written before the field
    assert TransformConfig.from_dict(old).draft is False
    assert TransformConfig.from_dict(old).draft_target() is None
    assert TransformConfig.from_dict(t.to_dict()) == t


def test_extract_decodes_large_jpegs_with_the_recorded_draft(tmp_path: Path) -> None:
    """A JPEG >= 2x the resize size is decoded in draft mode (predict, evaluate and finetune build their
    ImageDataset with the same ``transform.draft_target()``): the cached
    features are the drafted image's, and differ from a full decode's."""
    import numpy as np
    from PIL import Image

    from resnet_transfer.cache import ExtractConfig, FeatureCache, extract
    from resnet_transfer.images import ImageDataset, collate, eval_transform_uint8, list_images, normalize_batch

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(2):
            arr = rng.integers(0, 255, size=(300, 400, 3), dtype=np.uint8)
            Image.fromarray(arr).resize((400, 300)).save(tmp_path / "img" / c / f"{i}.jpg", quality=90)
    out = tmp_path / "f.h5"
    extract(ExtractConfig(data=tmp_path / "img", out=out, model="resnet18", weights="none", image_size=32,
                          precision="fp32", compile="off", dtype="float32"))  # fmt: skip
    bb = build_backbone("resnet18", "none", image_size=32)
    images = list_images(tmp_path / "img")

    def feats(draft: int | None) -> torch.Tensor:
        ds = ImageDataset(images, eval_transform_uint8(bb.transform), draft=draft)
        xs = normalize_batch(collate([ds[i] for i in range(len(ds))])[0], bb.transform)
        with torch.inference_mode():
            return bb.net(xs)

    with FeatureCache(out) as fc:
        assert fc.identity.transform.draft is True
        cached = torch.from_numpy(fc.features())
    torch.testing.assert_close(cached, feats(bb.transform.resize_size), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cached, feats(None), rtol=1e-3, atol=1e-3)
