"""Process-level performance settings and device/precision choices, resolved once.

On small CPU machines two things matter more than anything in the model code (see shared measurements):
glibc returning activation buffers to the OS after every batch (page faults double the forward time), and
OpenMP threads spinning while another process holds a core. :func:`tune_process` fixes both.
"""

from __future__ import annotations

import ctypes
import os
import platform
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16", "int8")

_TUNED = False


def tune_process() -> None:
    """Call early (the CLI does, before importing torch): keep freed memory in the process and make
    idle OpenMP threads sleep. Safe to call more than once; does nothing off glibc."""
    global _TUNED
    if _TUNED:
        return
    _TUNED = True
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass


def resolve_device(device: str = "auto") -> Any:
    import torch

    d = device.lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible here", "use --device cpu or --device auto")
    if d not in ("cpu",) and not d.startswith("cuda"):
        raise UsageError(f"--device {device!r} is not known", "use auto, cpu or cuda")
    return torch.device(d)


def cpu_supports_bf16() -> bool:
    import torch

    cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "AVX512" not in cap and "AMX" not in cap:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def resolve_precision(precision: str, device: Any) -> str:
    """``auto`` -> fp16 on CUDA, bf16 on CPUs with native bf16 (avx512_bf16/AMX), else fp32. ``int8``
    (extract and predict only: :mod:`quantized`) is never chosen by ``auto``: it changes the features more."""
    p = precision.lower()
    if p not in ("auto", *PRECISIONS):
        raise UsageError(f"--precision {precision!r} is not known", "use auto, " + ", ".join(PRECISIONS))
    if p != "auto":
        if p == "fp16" and device.type == "cpu":
            raise UsageError("--precision fp16 is for CUDA", "use bf16 or fp32 on the CPU")
        if p == "int8" and (device.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64")):
            raise UsageError("--precision int8 is for x86 CPUs", "use --precision fp16 or bf16 on this device")
        return p
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def precision_kind(precision: str) -> str:
    """The compute precision a recorded name stands for: ``int8@<digest>`` (int8 calibrated on a given image
    set, :mod:`quantized`) is ``int8``; the other names are their own kind."""
    return precision.split("@", 1)[0]


def autocast(device: Any, precision: str) -> AbstractContextManager[Any]:
    import torch

    if precision_kind(precision) in ("fp32", "int8"):  # int8 runs its own quantized graph
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def total_ram_bytes(default: int = 8 << 30) -> int:
    """The machine's physical memory in bytes (``default`` where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return int(default)


def default_workers(device: Any) -> int:
    """DataLoader worker processes: on a CUDA box, decode in parallel processes; on the CPU, none: the
    images are decoded by threads of the main process (:func:`decode_threads`) while the forward pass
    runs, which measured faster than worker processes on 2 cores (docs/performance.md)."""
    if device.type == "cuda":
        return max(1, min(8, cpu_cores() - 1))
    return 0


def train_workers(device: Any) -> int:
    """DataLoader worker processes for finetuning, whose augmentations run torch ops (kept out of
    threads): on a small CPU box none (the forward and backward passes need every core)."""
    if device.type == "cuda":
        return default_workers(device)
    cores = cpu_cores()
    return 0 if cores <= 2 else min(4, cores // 4)


def decode_threads() -> int:
    """Threads that decode the next batch while the current one runs (when there are no workers)."""
    return max(1, min(4, cpu_cores()))


# ------------------------------------------------------------------------------------------ compile choice

COMPILE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class CompilePrior:
    """What ``torch.compile`` (inductor, ``freezing`` on the CPU) is assumed to buy where this host has not
    measured it yet (:mod:`speed_records` holds what it has): ``speedup`` = compiled / eager steady-state
    rate, ``cold_s`` / ``warm_s`` = compile + first batch with an empty / a warm inductor cache,
    ``eager_s_per_image`` when not even the eager rate is known. Deliberately conservative and the same
    for every CPU: a host's own figures replace it after its first compiled run.

    ``plausible`` is the speed-up a compile *could* bring (not what is expected): it only decides whether
    a job is large enough to be worth measuring the compile on (:func:`compile_plan`)."""

    kind: str
    speedup: float
    cold_s: float
    warm_s: float
    eager_s_per_image: float
    source: str
    plausible: float = 2.0


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_prior(device: Any) -> CompilePrior:
    """The assumed compile gain where nothing was measured: a GPU or a CPU (any ISA)."""
    if device.type == "cuda":  # timm's RTX 4090 ResNet-50 AMP figures, 8237 vs 4218 img/s; times unmeasured
        return CompilePrior("cuda", 1.95, 60.0, 15.0, 0.0005, "timm's published RTX 4090 figures")
    return CompilePrior("cpu", 1.1, 60.0, 10.0, 0.05, "a conservative guess for any CPU")


def resolve_compile(
    mode: str,
    n_images: int,
    device: Any,
    eager_s_per_image: float | None = None,
    compile_s: float | None = None,
    compiled_s_per_image: float | None = None,
) -> bool:
    """Whether to compile the forward pass: ``on`` / ``off`` as given; ``auto`` when the images still to
    run repay the compile: ``n_images * (eager_s_per_image - compiled_s_per_image) > compile_s``. Each
    figure should be this host's own (:mod:`compiled` reads them from :mod:`speed_records`); a missing one
    comes from :func:`compile_prior` (the compiled rate as ``eager / speedup``, the cold compile time)."""
    m = str(mode).lower()
    if m not in COMPILE_MODES:
        raise UsageError(f"--compile {mode!r} is not known", "use auto, on or off")
    if m != "auto":
        return m == "on"
    if n_images <= 0:
        return False
    prior = compile_prior(device)
    eager = eager_s_per_image if eager_s_per_image and eager_s_per_image > 0 else prior.eager_s_per_image
    compiled = compiled_s_per_image if compiled_s_per_image and compiled_s_per_image > 0 else eager / prior.speedup
    cost = compile_s if compile_s is not None else prior.cold_s
    return n_images * (eager - compiled) > cost


COMPILE_ACTIONS = ("eager", "compile", "measure")


def compile_plan(
    left: int,
    eager_s: float,
    compiled_s: float | None,
    compile_s: float | None,
    warm: bool,
    device: Any,
    trial_images: int = 0,
) -> tuple[str, str]:
    """``--compile auto`` for the ``left`` images still to run, from this host's figures (seconds per image
    eager, measured in this run; compiled per image and the compile's cost in seconds, as recorded here, or
    None): ``(action, why)`` with action ``eager`` | ``compile`` | ``measure``.

    - Both figures known: compile when the images left repay it, ``left * (eager - compiled) > compile``.
    - The compiled rate never measured here (this model, precision and shape): ``measure`` (compile once,
      time a few compiled batches against the eager ones, keep the faster: :mod:`backbone.compiled`) when
      the images left would save more than a *warm* compile costs at a merely plausible speed-up
      (:attr:`CompilePrior.plausible`), i.e. when a job of this size repays compiling from its second run
      on; below that, or with fewer than ``trial_images`` left to time the compiled forward on, it stays
      eager and never waits for a compile (a handful of images never does).
    - The compiled rate known but not the cost of this compile (a warm inductor cache never timed):
      the generic warm prior stands in for it.
    No per-CPU constant: the prior is one for every CPU and only ever weighs whether to find out."""
    prior = compile_prior(device)
    if left <= 0:
        return "eager", "no images left"
    if compiled_s is None:
        could = left * eager_s * (1.0 - 1.0 / prior.plausible)
        cost = prior.warm_s
        if could > cost and left > trial_images:
            return "measure", (
                f"at a plausible {prior.plausible:.1f}x the {left} images left would save {could:.0f} s, more "
                f"than a warm compile ({cost:.0f} s, {prior.source})"
            )
        return "eager", (
            f"even at a plausible {prior.plausible:.1f}x the {left} images left would save {could:.0f} s, "
            f"less than a warm compile ({cost:.0f} s), or too few to time: not worth measuring"
        )
    if compile_s is None:
        compile_s = prior.warm_s if warm else prior.cold_s
    saved = left * (eager_s - compiled_s)
    action = "compile" if saved > compile_s else "eager"
    return action, f"{left} images x {1000 * (eager_s - compiled_s):.1f} ms saved = {saved:.0f} s vs {compile_s:.0f} s"
