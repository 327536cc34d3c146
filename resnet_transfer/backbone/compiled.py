"""The inference forward pass, eager or compiled by inductor: ``net(x)`` under the run's autocast, on
channels_last input, pooled features back as float32.

:func:`compiled_forward` returns a callable used in place of ``net(x)`` by extract and predict. With
``mode="auto"`` it runs the first two batches eager, times the second, and compiles only when the images
still to run repay the compile on this host (:func:`runtime.resolve_compile`). Inductor's own cache (its
usual place, ``TORCHINDUCTOR_CACHE_DIR`` or ``/tmp/torchinductor_<user>``) keeps the compiled artifact; next
to it we record, per model and shape, how long the last compile took, so a second run knows it will pay
the warm cost only. A compiled function serves the batch shape it was compiled for (``dynamic=False``);
other shapes (the last, partial batch) run eager, which on the CPU costs less than a recompile or padding.
Modules with forward hooks (``--cut`` maps are captured by hooks) stay eager: hooks are Python side effects.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base import COMPILE_MODES, get_reporter, resolve_compile

RECORD_DIR = "resnet_transfer"  # inside inductor's cache dir: the record dies with inductor's cache


class _AutocastForward(nn.Module):
    """``net(x)`` under autocast, float32 out: the whole region dynamo traces."""

    def __init__(self, net: nn.Module, device_type: str, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.net = net
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.net(x).float()
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.net(x).float()


def _precision_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def has_hooks(net: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def inductor_cache_dir() -> Path | None:
    """Inductor's cache directory, or None when its FX graph cache is off (nothing would be reused)."""
    import torch._inductor.config as ic
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) if ic.fx_graph_cache else None


class CompiledForward:
    """Callable ``fwd(x) -> float32 features``; ``compiled`` is None until decided (``auto``), then bool."""

    def __init__(
        self,
        net: nn.Module,
        device: Any,
        precision: str,
        mode: str = "auto",
        n_images: int = 0,
        key: str = "",
    ) -> None:
        m = str(mode).lower()
        if m not in COMPILE_MODES:
            resolve_compile(m, 0, device)  # raises the UsageError
        self.device = device
        self.mode = m
        self.n_images = int(n_images)
        self.eager = _AutocastForward(net, device.type, _precision_dtype(precision))
        self.key = self._record_key(key, precision, device)
        self.compiled: bool | None = False if m == "off" else None
        self.compile_s: float | None = None
        self.note = ""
        if self.compiled is None and has_hooks(net):
            self.compiled = False
            self.note = "forward hooks (stage maps) keep the forward eager"
            if m == "on":
                get_reporter().warn(f"--compile on: {self.note}")
        self._fn: Any = None
        self._shape: tuple[int, ...] | None = None
        self._seen = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        if self._fn is not None and shape == self._shape:
            return self._fn(x) if self.compile_s is not None else self._first_compiled(x)
        if self.compiled is None and self._shape is None:
            self._shape = shape
        if self.compiled is None and shape == self._shape:
            if self.mode == "on" or self._seen >= 1:
                return self._decide_and_run(x)
            return self._eager(x)  # the cold first batch: not a fair eager timing
        return self._eager(x)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        self._seen += x.shape[0]
        return self.eager(x)

    def _decide_and_run(self, x: torch.Tensor) -> torch.Tensor:
        per_image = None
        if self.mode == "auto":  # time this batch eager, then decide for the rest
            t = time.perf_counter()
            out = self._eager(x)
            _sync(self.device)
            per_image = (time.perf_counter() - t) / max(1, x.shape[0])
            left = self.n_images - self._seen
            self.compiled = resolve_compile("auto", left, self.device, per_image, self.cached_compile_s())
            if self.compiled:
                self._compile()
            get_reporter().info(
                f"compile auto: {'compiling' if self.compiled else 'eager'} for {left} images left "
                f"(eager {per_image * 1000:.1f} ms/img)"
            )
            return out
        self.compiled = True
        self._compile()
        return self._first_compiled(x)

    def _compile(self) -> None:
        options = {"freezing": True} if self.device.type == "cpu" else {}
        self._fn = torch.compile(self.eager, dynamic=False, options=options)

    def _first_compiled(self, x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        out = self._fn(x)
        _sync(self.device)
        self.compile_s = time.perf_counter() - t
        self._write_record()
        return out

    # ------------------------------------------------------------------ record next to inductor's cache

    @staticmethod
    def _record_key(key: str, precision: str, device: Any) -> str:
        text = json.dumps([key, precision, device.type, torch.__version__], sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def _record_path(self) -> Path | None:
        d = inductor_cache_dir()
        return (
            None if d is None or self._shape is None else d / RECORD_DIR / f"{self.key}-{_shape_tag(self._shape)}.json"
        )

    def cached_compile_s(self) -> float | None:
        """The compile time recorded for this model and shape when inductor's cache still holds it."""
        p = self._record_path()
        try:
            return float(json.loads(p.read_text())["compile_s"]) if p is not None else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_record(self) -> None:
        from ..base import atomic_write_json

        p = self._record_path()
        if p is None or self.compile_s is None:
            return
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(p, {"compile_s": round(self.compile_s, 2), "shape": list(self._shape or ())})
        except OSError:
            pass  # a read-only cache dir only costs the next run its estimate


def _shape_tag(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _sync(device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compiled_forward(
    net: nn.Module, device: Any, precision: str, mode: str = "auto", n_images: int = 0, key: str = ""
) -> CompiledForward:
    """The forward pass extract and predict call in place of ``net(x)`` (see the module doc).

    ``net`` must already be on ``device``, in eval mode, channels_last; ``key`` names the model (its
    backbone identity JSON) for the compile-time record; ``n_images`` is how many images this run will
    forward (the auto rule weighs the compile against them). Call it under ``torch.inference_mode()``."""
    return CompiledForward(net, device, precision, mode, n_images, key)
