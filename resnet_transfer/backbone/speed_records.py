"""Forward-pass speeds measured on this host, kept for later runs' decisions.

`--compile auto` (:mod:`.compiled`) and the int8 hint of `rt extract` weigh what earlier runs *measured here*
for the same model, precision and batch shape, never a table of another machine's figures: eager and
compiled seconds per image, compile seconds on an empty and on a warm inductor cache, int8 seconds per
image and its quantise + compile seconds; ``load_s`` the seconds to load and check a compiled package kept on
disk (:mod:`.artefact`). An eager run records its eager rate; a compiled run its compile
time and compiled rate; an int8 run its own two (``finish()`` of the forward objects, at the end of a run).

The file is ``$RT_SPEED_RECORDS``, else ``$XDG_CACHE_HOME/resnet_transfer/speed-records.json`` (default
``~/.cache/...``): one JSON object ``{"format", "version", "hosts": {host id: {"host": {...}, "work":
{work id: {figure: [last samples], "updated": ...}}}}}``. The host id hashes what changes the speeds: the
CPU (model name, family, model, the ISA flags that pick kernels), usable cores, torch threads, torch
version, or the GPU's name. The work id is ``model|precision|NxCxHxW``. Each figure keeps its last
:data:`KEEP` samples and is read as their median. Writes are atomic (a kill leaves the old file or the new
one); two runs finishing at once may lose one's samples, never the file. An unreadable file is ignored
(and replaced at the next write); a read-only one only costs later runs their figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

FORMAT = "resnet_transfer.speed_records"
VERSION = 1
KEEP = 5
FIGURES = ("eager_s", "compiled_s", "compile_cold_s", "compile_warm_s", "load_s", "int8_s", "int8_setup_s")
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")

_warned: set[str] = set()


def records_path() -> Path:
    """Where the records live (``$RT_SPEED_RECORDS``, else the user's cache directory)."""
    env = os.environ.get("RT_SPEED_RECORDS")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "resnet_transfer" / "speed-records.json"


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                k, _, v = line.partition(":")
                out.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return out


def host_info(device: Any) -> dict[str, Any]:
    """What makes this host's speeds its own (the host id hashes it)."""
    import platform

    import torch

    from ..base import cpu_cores

    info: dict[str, Any] = {"torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        return info
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    info.update(
        {
            "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
            "family": cpu.get("cpu family", ""),
            "model": cpu.get("model", ""),
            "isa": [f for f in ISA_FLAGS if f in flags],
            "cores": cpu_cores(),
            "threads": torch.get_num_threads(),
        }
    )
    return info


def host_id(info: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(info, sort_keys=True).encode(), digest_size=8).hexdigest()


def work_id(model: str, precision: str, shape: tuple[int, ...]) -> str:
    """``model|precision|NxCxHxW``; an ``int8@<digest>`` precision is ``int8`` (its speed is the same)."""
    return f"{model}|{precision.split('@', 1)[0]}|{'x'.join(str(int(s)) for s in shape)}"


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("hosts"), dict):
            raise ValueError("not a speed-records file")
        return data
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        if str(path) not in _warned:
            _warned.add(str(path))
            from ..base import get_reporter

            get_reporter().info(f"{path}: unreadable speed records ({type(exc).__name__}), ignored")
        return {}


def _host_entry(device: Any) -> dict[str, Any]:
    """This host's entry in the records file (empty when it recorded nothing)."""
    return _load(records_path()).get("hosts", {}).get(host_id(host_info(device)), {})


def _update(device: Any, change: Any) -> None:
    """Load the file, apply ``change(entry)`` to this host's entry, write it atomically. Never raises for the
    file: a speed record is worth less than the run that measured it."""
    from ..base import atomic_write_json

    path = records_path()
    data = _load(path) or {"format": FORMAT, "version": VERSION, "hosts": {}}
    info = host_info(device)
    entry = data["hosts"].setdefault(host_id(info), {})
    entry["host"] = info
    change(entry)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data, indent=1)
    except OSError:
        pass


def read(device: Any, work: str) -> dict[str, float]:
    """The medians of this host's recorded samples for ``work``: ``{figure: value}``, only those recorded."""
    entry = _host_entry(device)
    figures = (entry.get("work") or {}).get(work) or {}
    out: dict[str, float] = {}
    for name in FIGURES:
        vals = [float(v) for v in figures.get(name) or [] if isinstance(v, (int, float)) and v > 0]
        if vals:
            out[name] = statistics.median(vals)
    return out


def record(device: Any, work: str, **samples: float | None) -> None:
    """Add one sample per given figure (None or non-positive values are left out) and write atomically."""
    new = {k: float(v) for k, v in samples.items() if v is not None and v > 0 and k in FIGURES}
    if not new:
        return

    def add(entry: dict[str, Any]) -> None:
        figures = entry.setdefault("work", {}).setdefault(work, {})
        for k, v in new.items():
            figures[k] = [*(figures.get(k) or []), round(v, 6)][-KEEP:]
        figures["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")

    _update(device, add)


read_speed = read  # the names other wings use (backbone's face)
record_speed = record


class StepTimer:
    """Seconds and images of the timed calls of one kind (the steady batches of a run)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.images = 0

    def add(self, seconds: float, images: int) -> None:
        self.seconds += seconds
        self.images += int(images)

    @property
    def per_image(self) -> float | None:
        return self.seconds / self.images if self.images else None


def record_probe(device: Any, scheme: str, model: str, drop_points: float) -> None:
    """This host's int8 probe check (``python -m benchmarks int8 --probe-run RUN --record``): the largest mean
    drop in linear-probe accuracy, in points, of int8 features against bf16 ones over the k's tried, for the
    quantisation ``scheme`` (``quantized.SCHEME``) on ``model``. The last one measured is kept."""

    def put(entry: dict[str, Any]) -> None:
        entry.setdefault("int8_probe", {})[scheme] = {
            "model": model,
            "drop_points": round(float(drop_points), 3),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    _update(device, put)


def read_probe(device: Any, scheme: str) -> dict[str, Any] | None:
    """The probe check recorded on this host for ``scheme`` (``{"model", "drop_points", "updated"}``), or None."""
    got = (_host_entry(device).get("int8_probe") or {}).get(scheme)
    return got if isinstance(got, dict) and isinstance(got.get("drop_points"), (int, float)) else None


def recorded_rates(device: Any, model: str, precision: str, shape: tuple[int, ...]) -> dict[str, float]:
    """This host's recorded forward speeds for ``model`` at ``precision`` and batch ``shape``, as images/s per
    way of running it (``eager``, ``compiled``, ``int8``); empty when nothing was recorded (`rt compare`
    shows them beside the extract rate it measured)."""
    got = read(device, work_id(model, precision, shape))
    int8 = read(device, work_id(model, "int8", shape))
    pairs = (("eager", got.get("eager_s")), ("compiled", got.get("compiled_s")), ("int8", int8.get("int8_s")))
    return {name: round(1.0 / s, 2) for name, s in pairs if s}
