"""The GPU decode path's CPU-side logic (images/gpu_decode.py): which files it sends to the GPU, and that
its crops (torchvision's decoder, run here on the CPU) equal the PIL path's within a few grey levels. No GPU
is needed: ``torch.device("cuda")`` only names a device; nothing here runs on one."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_transfer.images import ImageDataset, TransformConfig, eval_transform_uint8, list_images
from resnet_transfer.images import gpu_decode as gd
from tests.odd_images import write_odd_images

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def _photo(w: int = 500, h: int = 375, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 37.0 + c) * np.cos(yy / 23.0 - c) for c in range(3)], -1) * 90 + 128
    noise = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def test_the_decode_path_per_file_and_device(tmp_path: Path) -> None:
    expect = write_odd_images(tmp_path / "odd")
    _photo().save(tmp_path / "odd" / "baseline.jpg", quality=90)
    _photo().save(tmp_path / "odd" / "progressive.jpg", quality=90, progressive=True)
    chosen = {name: gd.decode_path(tmp_path / "odd" / name, CUDA) for name in expect}
    chosen["baseline.jpg"] = gd.decode_path(tmp_path / "odd" / "baseline.jpg", CUDA)
    chosen["progressive.jpg"] = gd.decode_path(tmp_path / "odd" / "progressive.jpg", CUDA)
    on_gpu = {n for n, where in chosen.items() if where == "gpu"}
    # plain baseline JPEGs (colour or grey) on the GPU; CMYK, EXIF-rotated, progressive, other formats,
    # empty, truncated-headerless or missing files on the CPU (which reports what is wrong with them)
    assert on_gpu >= {"baseline.jpg", "gray.jpg", "UPPER.JPEG"}
    assert not on_gpu & {"cmyk.jpg", "exif_rotated.jpg", "progressive.jpg", "zero.jpg", "broken_link.jpg"}
    assert not any(n.endswith((".png", ".gif", ".tiff", ".webp")) for n in on_gpu)
    # on any other device everything is decoded by the CPU path
    assert {gd.decode_path(tmp_path / "odd" / n, CPU) for n in chosen} == {"cpu"}
    assert gd.decode_path(tmp_path / "odd" / "baseline.jpg", CUDA, max_pixels=1000) == "cpu"


def test_the_header_reader_finds_the_exif_orientation() -> None:
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 8
    _photo(64, 48).save(buf, format="JPEG", exif=exif.tobytes())
    info = gd.jpeg_header(buf.getvalue())
    assert info is not None and info["orientation"] == 8 and info["components"] == 3 and info["sof"] == 0xC0
    assert gd.jpeg_header(b"\x89PNG\r\n\x1a\n") is None


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (300, 300)])
def test_torchvision_decode_equals_the_pil_path_within_tolerance(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "c" / "photo.jpg"
    path.parent.mkdir()
    _photo(*size).save(path, quality=92)
    tcfg = TransformConfig(input_size=224, resize_size=256)
    ds = ImageDataset(list_images(tmp_path), eval_transform_uint8(tcfg), tcfg.draft_target())
    pil, _, err = ds[0]
    assert not err
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    tv = gd.decode_resize_crop([data], 256, 224, CPU)[0]
    assert tv.shape == pil.shape and tv.dtype == torch.uint8
    diff = (tv.int() - pil.int()).abs().float()
    # two decoders (libjpeg-turbo's IDCT/upsampling in both, different resize code): grey levels
    assert diff.mean() < 2.0 and torch.quantile(diff.flatten(), 0.99) < 12


def test_gpu_batches_match_the_cpu_feed_file_for_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the batched path on the CPU with the CUDA rule: the plain JPEGs through torchvision's decoder,
    the rest (odd files, errors) through the dataset, in order, with the same errors as the CPU feed."""
    root = tmp_path / "mix"
    write_odd_images(root / "odd")
    for k in range(5):
        _photo(seed=k).save(root / "odd" / f"p{k}.jpg", quality=90)
    real = gd.decode_path
    monkeypatch.setattr(gd, "decode_path", lambda p, d, h=None, m=None: real(p, CUDA, h, m))
    tcfg = TransformConfig(input_size=64, resize_size=73)
    images = list_images(root)
    ds = ImageDataset(images, eval_transform_uint8(tcfg), tcfg.draft_target())
    paths = [ds.path(i) for i in range(len(ds))]
    from resnet_transfer.images import feed

    ref = list(feed.iter_batches(ds, 4, threads=0))
    got = list(gd.gpu_batches(ds, paths, 4, 73, 64, CPU, threads=2))
    assert [b[1] for b in got] == [b[1] for b in ref]
    assert [b[2] for b in got] == [b[2] for b in ref]  # the same files skipped, for the same reasons
    for (x, _, _), (r, _, _) in zip(got, ref):
        assert (x is None) == (r is None)
        if x is not None:
            assert x.shape == r.shape and (x.int() - r.int()).abs().float().mean() < 3.0


def test_host_to_device_is_a_plain_move_off_cuda() -> None:
    x = torch.arange(6, dtype=torch.uint8)
    assert torch.equal(gd.HostToDevice(CPU).put(x), x)
    assert gd.gpu_decode_enabled(CPU) is False


def test_gpu_batches_read_the_members_of_an_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A zip's members (images/sources.py) take the GPU way too: read through their reader, never opened as
    paths, with the crops of the same images as a folder."""
    import zipfile

    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    for k in range(3):
        _photo(seed=k).save(root / "a" / f"p{k}.jpg", quality=90)
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as z:
        for f in sorted((root / "a").iterdir()):
            z.write(f, f"a/{f.name}")
    real = gd.decode_path
    sent: list[str] = []

    def on_cuda(p, d, h=None, m=None):
        way = real(p, CUDA, h, m)
        sent.append(way)
        return way

    monkeypatch.setattr(gd, "decode_path", on_cuda)
    tcfg = TransformConfig(input_size=64, resize_size=73)
    crops = []
    for data in (root, tmp_path / "photos.zip"):
        ds = ImageDataset(list_images(data), eval_transform_uint8(tcfg), tcfg.draft_target())
        (x, idx, errors), *_ = gd.gpu_batches(ds, [ds.path(i) for i in range(len(ds))], 4, 73, 64, CPU, threads=1)
        assert errors == ["", "", ""] and idx == [0, 1, 2]
        crops.append(x)
    assert sent == ["gpu"] * 6  # three files, then the same three as members
    assert torch.equal(crops[0], crops[1])
