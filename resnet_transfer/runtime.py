"""Process-level performance settings and device/precision choices, resolved once.

On small CPU machines two things matter more than anything in the model code (see shared measurements):
glibc returning activation buffers to the OS after every batch (page faults double the forward time), and
OpenMP threads spinning while another process holds a core. :func:`tune_process` fixes both.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from .errors import UsageError

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
    """``auto`` -> fp16 on CUDA, bf16 on CPUs with native bf16 (avx512_bf16/AMX), else fp32."""
    p = precision.lower()
    if p not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError(f"--precision {precision!r} is not known", "use auto, fp32, bf16 or fp16")
    if p != "auto":
        if p == "fp16" and device.type == "cpu":
            raise UsageError("--precision fp16 is for CUDA", "use bf16 or fp32 on the CPU")
        return p
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(device: Any, precision: str) -> AbstractContextManager[Any]:
    import torch

    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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
