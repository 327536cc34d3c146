from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resnet_transfer.backbone import build_backbone, forward_images
from resnet_transfer.images import eval_transform, list_images


@pytest.fixture(scope="module")
def backbone():  # type: ignore[no-untyped-def]
    return build_backbone("resnet18", "none", 32)


def test_forward_images_features_maps_and_skips(backbone, fresh_folder: Path) -> None:  # type: ignore[no-untyped-def]
    (fresh_folder / "circle" / "zz_broken.png").write_bytes(b"nope")
    images = list_images(fresh_folder)
    batches = list(forward_images(backbone, images, batch_size=5, maps=["layer3"]))
    assert sum(len(b.indices) for b in batches) == len(images)
    skipped = [images.paths[i] for b in batches for i, _ in b.skipped]
    assert skipped == ["circle/zz_broken.png"]
    b = batches[0]
    assert b.features.shape == (len(b.ok), backbone.num_features)
    assert b.maps["layer3"].shape[:2] == (len(b.ok), 256)
    first = images.root / images.paths[b.ok[0]]
    from resnet_transfer.images import load_image

    x = eval_transform(backbone.transform)(load_image(first))[None]
    with torch.inference_mode():
        ref = backbone.net.eval()(x)
    assert torch.allclose(b.features[0], ref[0], atol=1e-4)  # fp32: the same function as the plain net


def test_forward_images_tta_views(backbone, fresh_folder: Path) -> None:  # type: ignore[no-untyped-def]
    images = list_images(fresh_folder).subset([0, 1, 2])
    plain = torch.cat([b.features for b in forward_images(backbone, images, batch_size=4)])
    flip = torch.cat([b.features for b in forward_images(backbone, images, batch_size=4, view="flip")])
    assert flip.shape == (3, 2, backbone.num_features)
    assert torch.allclose(flip[:, 0], plain, atol=1e-4)  # the first flip view is the eval view
