"""JPEG decoding on the GPU for the eval feed (extract, predict, evaluate), and the pinned, side-stream
host-to-device copy of a batch.

On a CUDA device the CPU threads that decode JPEGs become the bottleneck long before the GPU does (a
ResNet-50 forward in fp16 is thousands of images per second; PIL decodes a few hundred per core). So
:func:`gpu_batches` reads the files' bytes in threads and decodes the plain JPEGs of each batch in one
``torchvision.io.decode_jpeg(list_of_tensors, device="cuda")`` call (nvJPEG), then resizes and crops them on
the GPU to the eval crop (short side to ``resize_size``, bilinear with antialias, center crop
``input_size``: the geometry of :class:`transforms.ResizeCenterCrop`). Every other file goes the usual way
(:class:`data.ImageDataset` in a CPU thread: PIL, EXIF, alpha, 16-bit, CMYK): :func:`decode_path` decides
per file from its first bytes, without decoding it:

- ``gpu``: a baseline (or extended sequential) JPEG with 1 or 3 components and no EXIF rotation;
- ``cpu``: not a JPEG, a progressive or lossless or arithmetic-coded JPEG, CMYK/YCCK (4 components), an
  EXIF orientation other than 1 (PIL applies it), an unreadable header, or any device but CUDA.

A batch whose GPU decode fails (a corrupt file nvJPEG refuses) is decoded again on the CPU, so a bad file
is reported exactly as the CPU path reports it. ``RT_GPU_DECODE=0`` turns the GPU decode off.

The same functions run with ``device="cpu"`` (torchvision's CPU decoder): that is how the tests check, on a
machine without a GPU, that this path's crops equal the PIL path's within a few grey levels.
**Untested on a GPU** in this repository's CI: no GPU was available when it was written
(docs/performance.md).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

JPEG_SOI = b"\xff\xd8\xff"
GPU_SOF = (0xC0, 0xC1)  # baseline and extended sequential Huffman: what nvJPEG's batched decode takes
HEADER_BYTES = 1 << 16


def gpu_decode_enabled(device: Any) -> bool:
    """Whether the eval feed decodes JPEGs on ``device``: CUDA, torchvision present, not turned off."""
    if _kind(device) != "cuda" or os.environ.get("RT_GPU_DECODE", "1") == "0":
        return False
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return True


def _kind(device: Any) -> str:
    return str(getattr(device, "type", None) or str(device).split(":", 1)[0])


def jpeg_header(head: bytes) -> dict[str, Any] | None:
    """``{"sof": marker, "components": n, "orientation": k}`` of a JPEG from its first bytes, or None when
    it is not a JPEG or the header cannot be read. Scans the markers up to the first start-of-frame;
    reads the EXIF orientation from an APP1 segment on the way."""
    if not head.startswith(JPEG_SOI):
        return None
    pos, orientation = 2, 1
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack(">H", head[pos + 2 : pos + 4])
        seg = head[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and seg.startswith(b"Exif\x00\x00"):
            orientation = _exif_orientation(seg[6:]) or 1
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            if len(seg) < 6:
                return None
            h, w = struct.unpack(">HH", seg[1:5])
            return {"sof": marker, "components": seg[5], "orientation": orientation, "pixels": h * w}
        if marker == 0xDA:  # start of scan before any frame header: not a readable JPEG
            return None
        pos += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int | None:
    """The Orientation tag (0x0112) of IFD0 of a TIFF block, or None."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    e = "<" if tiff[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(e + "I", tiff[4:8])
        (count,) = struct.unpack(e + "H", tiff[ifd : ifd + 2])
        for k in range(count):
            at = ifd + 2 + 12 * k
            tag, _typ, _n = struct.unpack(e + "HHI", tiff[at : at + 8])
            if tag == 0x0112:
                return int(struct.unpack(e + "H", tiff[at + 8 : at + 10])[0])
    except struct.error:
        return None
    return None


def decode_path(path: str | Path, device: Any, head: bytes | None = None, max_pixels: int | None = None) -> str:
    """``"gpu"`` or ``"cpu"``: where the eval feed decodes ``path`` on ``device`` (the module doc's rule;
    above ``max_pixels`` the CPU path, which refuses it with its reason). ``head``: the file's first bytes
    when already read."""
    if _kind(device) != "cuda":
        return "cpu"
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
        except OSError:
            return "cpu"  # the CPU path reports why it cannot be read
    info = jpeg_header(head)
    if info is None or info["sof"] not in GPU_SOF or info["components"] not in (1, 3):
        return "cpu"
    if max_pixels is not None and info["pixels"] > max_pixels:
        return "cpu"
    return "gpu" if info["orientation"] == 1 else "cpu"


def decode_resize_crop(data: Sequence[Any], resize_size: int, input_size: int, device: Any) -> Any:
    """JPEG bytes (uint8 1-D tensors) -> a uint8 (N, 3, input_size, input_size) batch on ``device``:
    ``torchvision.io.decode_jpeg`` of the whole list at once on ``device``, RGB, then per image the short
    side resized to ``resize_size`` (bilinear, antialias: PIL's filter support) and the center crop."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    images = decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)
    out = torch.empty((len(images), 3, input_size, input_size), dtype=torch.uint8, device=device)
    for k, img in enumerate(images):
        out[k] = resize_crop(img, resize_size, input_size)
    return out


def resize_crop(img: Any, resize_size: int, input_size: int) -> Any:
    """One uint8 (3, H, W) image -> its uint8 (3, c, c) eval crop, with torchvision's ``Resize`` output size
    (the long side ``int(s * long / short)``) and ``CenterCrop`` offsets."""
    import torch

    _, h, w = img.shape
    s, c = resize_size, input_size
    new_h, new_w = (int(s * h / w), s) if w <= h else (s, int(s * w / h))
    x = img.unsqueeze(0).float()
    x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = round((new_h - c) / 2.0), round((new_w - c) / 2.0)
    if top < 0 or left < 0:  # smaller than the crop: pad as CenterCrop does
        pad = (max(0, -left), max(0, c - new_w + max(0, -left)), max(0, -top), max(0, c - new_h + max(0, -top)))
        x = torch.nn.functional.pad(x, pad)
        top, left = max(0, top), max(0, left)
    return x[0, :, top : top + c, left : left + c].round().clamp(0, 255).to(torch.uint8)


def _read(path: Any) -> bytes | None:
    """The bytes of a file, or of a member of a source (an archive, shards, a dataset: ``reader.Member``)."""
    try:
        return path.read() if hasattr(path, "reader") else Path(path).read_bytes()
    except (OSError, KeyError, ValueError):
        return None


def gpu_batches(
    dataset: Any, paths: Sequence[Path], batch_size: int, resize_size: int, input_size: int, device: Any, threads: int
) -> Iterator[tuple[Any, list[int], list[str]]]:
    """``(uint8 batch on device or None, indices, errors)`` per batch, in order, as :func:`feed.iter_batches`
    yields them (on the device instead of the host): the JPEGs :func:`decode_path` sends to the GPU are read
    by ``threads`` threads one batch ahead and decoded together; the others by ``dataset`` in the threads."""
    import torch

    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="rt-read")

    def submit(lo: int) -> list[tuple[int, Any]]:
        idx = range(lo, min(lo + batch_size, len(paths)))
        return [(i, pool.submit(_read, paths[i])) for i in idx]

    def cpu(i: int) -> Any:
        return pool.submit(dataset.__getitem__, i)

    try:
        starts = list(range(0, len(paths), batch_size))
        ahead = submit(starts[0]) if starts else []
        for n, _lo in enumerate(starts):
            batch, ahead = ahead, (submit(starts[n + 1]) if n + 1 < len(starts) else [])
            raw = {i: f.result() for i, f in batch}
            gpu = [i for i in raw if raw[i] is not None and _on_gpu(paths[i], device, raw[i], dataset)]
            on_cpu = {i: cpu(i) for i in raw if i not in gpu}
            crops: dict[int, Any] = {}
            if gpu:
                try:
                    data = [torch.frombuffer(bytearray(raw[i]), dtype=torch.uint8) for i in gpu]
                    out = decode_resize_crop(data, resize_size, input_size, device)
                    crops = {i: out[k] for k, i in enumerate(gpu)}
                except RuntimeError:  # a file nvJPEG refuses: the batch goes the CPU way, errors and all
                    on_cpu.update({i: cpu(i) for i in gpu})
            errors = {}
            for i, f in on_cpu.items():
                x, _, err = f.result()
                if err:
                    errors[i] = err
                else:
                    crops[i] = x.to(device, non_blocking=True)
            idx = [i for i, _ in batch]
            good = [crops[i] for i in idx if i in crops]
            xs = torch.stack(good) if good else None
            yield xs, idx, [errors.get(i, "") for i in idx]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _on_gpu(path: Any, device: Any, data: bytes, dataset: Any) -> bool:
    return decode_path(path, device, data[:HEADER_BYTES], getattr(dataset, "max_pixels", None)) == "gpu"


class HostToDevice:
    """Pinned, double-buffered host-to-device copies on a side stream: :meth:`put` starts copying batch
    ``k+1`` while the default stream still computes batch ``k``; the tensor it returns is safe to use on the
    default stream (it waits on the copy's event). On a non-CUDA device it returns the batch as it is."""

    def __init__(self, device: Any) -> None:
        import torch

        self.device = torch.device(device) if isinstance(device, str) else device
        self.cuda = _kind(device) == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._keep: list[Any] = []  # the pinned sources of the two copies in flight

    def put(self, x: Any) -> Any:
        import torch

        if not self.cuda or x.device.type == "cuda":
            return x.to(self.device, non_blocking=True)
        src = x if x.is_pinned() else x.pin_memory()
        with torch.cuda.stream(self.stream):
            out = src.to(self.device, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        out.record_stream(torch.cuda.current_stream(self.device))
        self._keep = [*self._keep[-1:], src]
        return out
