"""Shared helpers for the benchmarks: medians and ratios, the result printer, the machine record, child
processes with their own resource accounting, and generated photo-like JPEGs.

Every benchmark returns (and prints) one result dict::

    {"bench": NAME, "figures": {...ratios and the medians they come from...}, "raw": {...every sample...},
     "machine": {...}, "command": "python -m benchmarks NAME ..."}

The JSON line is printed first, on one line starting with ``{"bench":``, then a human summary.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from resnet_transfer.base import cpu_flags  # the one reading of the CPU's ISA flags

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------- numbers


def median(xs: Iterable[float]) -> float:
    """The median of ``xs`` (NaN for no samples, so a missing figure never looks like a zero)."""
    vals = [float(x) for x in xs]
    return statistics.median(vals) if vals else float("nan")


def ratio(a: float, b: float) -> float:
    """``a / b``; NaN when ``b`` is zero or either side is missing."""
    if b == 0 or a != a or b != b:
        return float("nan")
    return a / b


def rate(count: float, seconds: float) -> float:
    """Items per second; NaN for a non-positive duration."""
    return count / seconds if seconds > 0 else float("nan")


def time_repeats(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the samples themselves (rounded for printing)."""
    return {
        "median": round(median(samples), 4),
        "min": round(min(samples), 4) if samples else None,
        "max": round(max(samples), 4) if samples else None,
        "n": len(samples),
        "samples": [round(float(s), 4) for s in samples],
    }


# -------------------------------------------------------------------------------------------- printing


def json_line(result: dict[str, Any]) -> str:
    """The machine-readable line: one JSON object on one line, ``bench`` first, NaN written as null."""
    ordered = {"bench": result["bench"], **{k: v for k, v in result.items() if k != "bench"}}
    return json.dumps(_clean(ordered), sort_keys=False, separators=(",", ":"))


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return None if x != x or x in (float("inf"), float("-inf")) else round(x, 6)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def emit(result: dict[str, Any], summary: Sequence[str], stream: Any = None) -> dict[str, Any]:
    """Print the JSON line, then the human summary; returns ``result`` unchanged."""
    out = stream or sys.stdout
    print(json_line(result), file=out)
    print(f"== {result['bench']} ==", file=out)
    for line in summary:
        print("  " + line, file=out)
    m = result.get("machine") or {}
    if m:
        print(
            f"  machine: {m.get('cpu')} x{m.get('cores')} | torch {m.get('torch')} | threads {m.get('threads')}",
            file=out,
        )
    if result.get("command"):
        print(f"  reproduce: {result['command']}", file=out)
    out.flush()
    return result


def fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_summary() -> str:
    """The CPU features that decide the fast paths: AVX-512, native bf16, AMX (matrix units)."""
    flags = cpu_flags()
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    return " ".join(have) + ("" if {"amx_bf16", "amx_tile"} & flags else " (no AMX)")


def _version(dist: str) -> str | None:
    """A package's installed version from its metadata (no import: importing timm costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, usable cores, flags that matter, library versions, and the GPU when one is used."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in cpu_flags(),
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    info["torch"] = _version("torch")
    torch = sys.modules.get("torch")  # threads and GPU only when the benchmark already uses torch
    if torch is not None:
        info["threads"] = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    for dist in ("timm", "torchvision", "h5py", "pillow"):
        info[dist] = _version(dist)
    return info


def command_line(name: str, argv: Sequence[str] | None) -> str:
    return " ".join(["python -m benchmarks", name, *(argv or [])])


# ------------------------------------------------------------------------------------- child processes

# The start of a child that uses torch: ``ARGS["tune"]`` applies rt's process tuning first (as the `rt`
# entry point does), then torch gets ``ARGS["threads"]`` threads.
TORCH_PRELUDE = """
import os, time
if ARGS.get("tune"):
    from resnet_transfer.base import tune_process
    tune_process()
import torch
torch.set_num_threads(ARGS["threads"])
"""


def plain_frozen_compile(net: Any, dtype: Any = None) -> Any:
    """The reference the library's compiled forward is held to: what a user writes from inductor's docs, the
    global ``torch._inductor.config.freezing = True`` (left on), ``torch.compile(net)``, called under autocast
    at ``dtype`` (None: none) and the caller's ``inference_mode``; features back as float32."""
    import torch
    import torch._inductor.config as ic

    ic.freezing = True
    compiled = torch.compile(net)

    def fwd(x: Any) -> Any:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            return compiled(x).float()

    return fwd


def run_child(code: str, args: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 1800) -> dict:
    """Run ``code`` in a fresh ``python -c`` with ``ARGS`` (a dict) defined, and return what it printed
    as its last line (a JSON object), plus ``max_rss_mb``: the child's own peak resident set size as
    the kernel counts it (``wait4`` rusage of that one child).

    ``env`` entries are added to (not replacing) this process's environment; a value of ``""`` removes
    the variable. Raises RuntimeError with the child's stderr tail on failure."""
    full_env = dict(os.environ)
    for k, v in (env or {}).items():
        if v == "":
            full_env.pop(k, None)
        else:
            full_env[k] = v
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    full_env.setdefault("RT_OFFLINE", "1")
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    prog = f"import json, sys\nARGS = json.loads({json.dumps(json.dumps(args))})\n" + code
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen([sys.executable, "-c", prog], stdout=out_f, stderr=err_f, env=full_env, text=True)
        deadline = time.monotonic() + timeout
        while True:  # wait4: this child's own rusage (RUSAGE_CHILDREN would mix in every earlier child)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise RuntimeError(f"benchmark child timed out after {timeout}s")
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed (exit {proc.returncode}):\n{err[-3000:]}")
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"benchmark child printed no result:\n{out[-1000:]}\n{err[-2000:]}")
    result = json.loads(lines[-1])
    # ru_maxrss is in KiB on Linux: the kernel's high-water mark of the child's resident set (its own
    # DataLoader workers, if any, are its children and not included; the benchmarks say when that matters)
    result["max_rss_mb"] = round(usage.ru_maxrss / 1024.0, 1)
    return result


# ------------------------------------------------------------------------------------------------ images


def make_photo_jpegs(
    root: Path,
    n: int,
    size: tuple[int, int] = (500, 375),
    classes: int = 4,
    seed: int = 0,
    quality: int = 90,
    vary: bool = True,
) -> Path:
    """Write ``n`` photo-like JPEGs under ``root/class_k/`` (an ImageFolder layout) and return ``root``.

    Content is built like a photo's spectrum, not flat colours: a smooth large-scale field, mid-scale
    texture, a few soft-edged objects, and sensor-like noise, so JPEG files are of realistic size
    (~40-80 KB at 500x375, quality 90) and decode at realistic cost. With ``vary`` the width/height swap
    (portrait) and vary by up to 10%, as in real collections. Existing files are reused."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    root = Path(root)
    marker = root / f".made-{n}-{size[0]}x{size[1]}-{classes}-{seed}-{quality}-{int(vary)}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = size
        if vary:
            w = int(w * rng.uniform(0.9, 1.1))
            h = int(h * rng.uniform(0.9, 1.1))
            if rng.random() < 0.25:
                w, h = h, w
        base = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
        img = Image.fromarray(base, "RGB").resize((w, h), Image.BICUBIC)
        mid = rng.normal(0, 28, size=(max(2, h // 16), max(2, w // 16), 3))
        mid_img = Image.fromarray(np.clip(mid + 128, 0, 255).astype(np.uint8), "RGB").resize((w, h), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + np.asarray(mid_img, dtype=np.int16) - 128
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 8))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            s = int(rng.integers(min(w, h) // 10, min(w, h) // 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
            if rng.random() < 0.5:
                draw.ellipse([x0, y0, x0 + s, y0 + int(s * rng.uniform(0.5, 1.5))], fill=colour)
            else:
                draw.rectangle([x0, y0, x0 + s, y0 + int(s * rng.uniform(0.5, 1.5))], fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.6, 1.4))))
        noise = rng.normal(0, 6, size=(h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr, "RGB").save(root / f"class_{i % classes}" / f"img_{i:05d}.jpg", quality=quality)
    marker.touch()
    return root


def _shipped_photos() -> list[Any]:
    """The photographs that ship inside scikit-learn (and scikit-image, when installed), as RGB arrays."""
    import numpy as np

    photos: list[Any] = []
    try:
        from sklearn.datasets import load_sample_images

        photos += [np.asarray(p, dtype=np.uint8) for p in load_sample_images().images]
    except ImportError:
        pass
    try:
        import skimage.data as sd

        for name in ("astronaut", "coffee", "chelsea", "rocket"):
            photos.append(np.asarray(getattr(sd, name)(), dtype=np.uint8)[..., :3])
    except (ImportError, AttributeError, OSError):
        pass
    if not photos:
        raise RuntimeError("no shipped photographs found (scikit-learn's load_sample_images)")
    return photos


def make_phone_jpegs(
    root: Path, n: int, size: tuple[int, int] = (4032, 3024), classes: int = 4, seed: int = 0, quality: int = 90
) -> Path:
    """Write ``n`` phone-sized JPEGs (12 MP by default) under ``root/class_k/`` and return ``root``.

    Each is a random crop of one of the photographs shipped with scikit-learn / scikit-image, upscaled
    (bicubic) to ``size`` (1 in 4 portrait) with sensor-like noise added, JPEG ``quality``: real photo
    content at a phone's pixel count (~2 MB per file at 12 MP, q90). Existing files are reused."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    marker = root / f".phone-{n}-{size[0]}x{size[1]}-{classes}-{seed}-{quality}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    photos = _shipped_photos()
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = photos[i % len(photos)]
        h0, w0 = src.shape[:2]
        w, h = size if rng.random() >= 0.25 else size[::-1]
        scale = rng.uniform(0.6, 1.0)
        cw = int(min(w0, h0 * w / h) * scale)
        ch = int(cw * h / w)
        x0, y0 = int(rng.integers(0, w0 - cw + 1)), int(rng.integers(0, h0 - ch + 1))
        img = Image.fromarray(src[y0 : y0 + ch, x0 : x0 + cw]).resize((w, h), Image.BICUBIC)
        noise = rng.integers(-6, 7, size=(h, w, 3), dtype=np.int16)
        arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr, "RGB").save(root / f"class_{i % classes}" / f"phone_{i:05d}.jpg", quality=quality)
    marker.touch()
    return root
