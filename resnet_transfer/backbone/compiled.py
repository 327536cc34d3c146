"""The inference forward pass, eager or compiled by inductor: ``net(x)`` under the run's autocast, on
channels_last input, pooled features back as float32.

:func:`compiled_forward` returns a callable used in place of ``net(x)`` by extract and predict. On the CPU
the compiled graph is *frozen* (:func:`frozen_call`: the weights become constants, BatchNorm folds into the
convolutions). With ``mode="auto"`` it runs the first batches eager, times them, and asks
:func:`runtime.compile_plan` with what this host measured before for the same model, precision and batch
shape (:mod:`speed_records`: eager and compiled seconds per image, compile seconds with an empty and a warm
inductor cache): compile when the images still to run repay the compile; stay eager when they do not;
and where the compiled rate was never measured here and the job is large enough that a compile could repay
itself at a plausible speed-up, *measure*: compile in-line after :data:`TRIAL_BATCHES` timed eager
batches, time as many compiled ones, keep the faster for the rest of the job (a compile that fails falls
back to eager), and say so in one log line. (In-line rather than in a background thread: on 2-4 cores the
compile's CPU time would be taken from the eager batches beside it anyway, and dynamo is not documented
as thread-safe.) Every run records what it measured
(:meth:`CompiledForward.finish`). Inductor's own cache (its usual place, ``TORCHINDUCTOR_CACHE_DIR`` or
``/tmp/torchinductor_<user>``) keeps the compiled kernels; next to it a small record per model and shape
says the cache holds them (so the warm compile time applies). A compiled function serves the batch shape
it was compiled for (``dynamic=False``); other shapes (the last, partial batch) run eager, which on the CPU
costs less than a recompile or padding. On the CPU the compile goes into a package kept on disk
(:mod:`.artefact`: AOTInductor, dynamic batch), which later runs load in a fraction of a second instead of
compiling again (a package that cannot be built falls back to this JIT compile); it serves every batch size,
the last partial batch too. Modules with forward hooks (``--cut`` maps are captured by hooks)
stay eager: hooks are Python side effects.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base import COMPILE_MODES, compile_plan, get_reporter, resolve_compile
from .artefact import ArtefactForward, artefact_path
from .speed_records import StepTimer, work_id

RECORD_DIR = "resnet_transfer"  # inside inductor's cache dir: the record dies with inductor's cache
TRIAL_BATCHES = 3  # `auto` measuring: eager batches timed before the compile, compiled batches after it


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
        model: str = "",
    ) -> None:
        m = str(mode).lower()
        if m not in COMPILE_MODES:
            resolve_compile(m, 0, device)  # raises the UsageError
        self.device = device
        self.mode = m
        self.precision = precision
        self.model = model or "unnamed"
        self.n_images = int(n_images)
        self.eager = _AutocastForward(net, device.type, _precision_dtype(precision))
        self.identity = key
        self._artefact: Path | bool | None = False  # False: not looked up yet (artefact_path)
        self._loaded = False  # this run loaded a compiled package from disk instead of compiling
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
        self._calls = 0
        self._warm: bool | None = None  # inductor's cache held this model when the compile started
        self._eager_t = StepTimer()  # full-shape eager batches after the cold first one
        self._compiled_t = StepTimer()  # full-shape compiled batches after the compiling one
        self._timed = device.type == "cpu"  # (on CUDA a per-batch timing would need a synchronize)
        self._finished = False
        self._measuring = False  # `auto` is timing compiled batches against eager ones

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        if self._fn is not None and shape == self._shape:
            if self.compile_s is None:
                return self._first_compiled(x)
            out = self._run(self._fn, x, self._compiled_t)
            if self._measuring and self._compiled_t.images >= TRIAL_BATCHES * shape[0]:
                self._settle()
            return out
        if self._fn is not None and self.compile_s is not None and self._any_batch(shape):
            return self._fn(x)  # a package serves a partial batch too (untimed)
        if self._shape is None:
            self._shape = shape
        if self.compiled is None and shape == self._shape:
            if self.mode == "on" or self._seen >= 1:
                return self._decide_and_run(x)
            if self._package_decides():
                return self._first_compiled(x)
            return self._eager(x)  # the cold first batch: not a fair eager timing
        return self._eager(x)

    def _any_batch(self, shape: tuple[int, ...]) -> bool:
        return isinstance(self._fn, ArtefactForward) and self._shape is not None and shape[1:] == self._shape[1:]

    def artefact(self) -> Path | None:
        """The compiled package's file for this forward (:mod:`.artefact`), None where none is kept."""
        if self._artefact is False:
            chw = tuple((self._shape or (0,))[1:])
            self._artefact = artefact_path(self.eager.net, self.identity, self.model, self.precision, self.device, chw)
        return self._artefact if isinstance(self._artefact, Path) else None

    def _run(self, fn: Any, x: torch.Tensor, timer: StepTimer | None) -> torch.Tensor:
        if timer is None or not self._timed:
            return fn(x)
        t = time.perf_counter()
        out = fn(x)
        _sync(self.device)
        timer.add(time.perf_counter() - t, x.shape[0])
        return out

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        timed = self._calls > 0 and tuple(x.shape) == self._shape
        self._calls += 1
        self._seen += x.shape[0]
        return self._run(self.eager, x, self._eager_t if timed else None)

    def _decide_and_run(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "auto":  # time this batch eager, then decide for the rest
            self._timed = True  # (on CUDA each timed batch synchronizes: only until decided)
            out = self._eager(x)
            left = self.n_images - self._seen
            action, line = self._auto(left, self._eager_t.per_image or 0.0)
            if action == "measure" and self._eager_t.images < TRIAL_BATCHES * x.shape[0]:
                return out  # a few more eager batches first: the figure the compiled ones must beat
            self._timed = self.device.type == "cpu"
            self.compiled = action != "eager"
            if self.compiled:
                self._measuring = action == "measure"
                self._timed = self._timed or self._measuring
                self._compile()
            get_reporter().info(line)
            return out
        self.compiled = True
        self._compile()
        return self._first_compiled(x)

    def _package_decides(self) -> bool:
        """``auto`` at the first batch where a compiled package is on disk and this host recorded both rates:
        when they say compile, load it now rather than run eager batches only to time them again."""
        if self.mode != "auto" or self.device.type != "cpu":
            return False
        from .speed_records import read

        rec = read(self.device, self.work)
        path = self.artefact()
        if "eager_s" not in rec or "compiled_s" not in rec or path is None or not path.exists():
            return False
        action, line = self._auto(self.n_images, rec["eager_s"])
        if action != "compile":
            return False
        self.compiled = True
        self._compile()
        get_reporter().info(line)
        return True

    def _auto(self, left: int, eager_now: float) -> tuple[str, str]:
        """The ``auto`` action for ``left`` images (:func:`runtime.compile_plan`) and its log line."""
        from .speed_records import read

        rec = read(self.device, self.work)
        package = self.artefact() is not None and self.artefact().exists()  # type: ignore[union-attr]
        warm = package or self.cached_compile_s() is not None  # the warm cost (or a load) applies
        eager = rec.get("eager_s", eager_now)
        compiled = rec.get("compiled_s")
        cost = rec.get("load_s") if package else rec.get("compile_warm_s") if warm else rec.get("compile_cold_s")
        trial = 2 * TRIAL_BATCHES * (self._shape or (1,))[0]  # the compiled batches to time, with room to gain
        action, why = compile_plan(left, eager, compiled, cost, warm, self.device, trial)
        if action == "measure":
            return action, (
                f"compile auto: no compiled figure on this host for {self.work} (eager {eager * 1000:.1f} ms/img "
                f"measured now); {why} -> compiling once to measure it ({'warm' if warm else 'cold'} inductor "
                f"cache), then keeping the faster for the rest and recording both"
            )
        if compiled is None:
            return action, f"compile auto: eager {eager * 1000:.1f} ms/img; {why} -> eager for {left} images left"
        figures = f"eager {eager * 1000:.1f} ms/img, compiled {compiled * 1000:.1f} ms/img"
        state = "warm" if warm else "cold"
        if package:
            figures += f", load of the compiled package {cost:.1f} s" if cost is not None else ", a compiled package"
        else:
            figures += (
                f", compile {cost:.0f} s {state}" if cost is not None else f", a {state} compile not timed here yet"
            )
        verdict = "compile" if action == "compile" else "eager"
        return action, f"compile auto: measured on this host ({figures}) -> {verdict} for {left} images left ({why})"

    def _settle(self) -> None:
        """After the trial batches of a ``measure``: keep the faster of compiled and eager (both timed in this
        run, in the same loop) for the rest of the job, and say so."""
        self._measuring = False
        self._timed = self.device.type == "cpu"
        eager, compiled = self._eager_t.per_image, self._compiled_t.per_image
        keep = eager is None or (compiled is not None and compiled < eager)
        if not keep:
            self._fn, self.compiled = None, False
        left = self.n_images - self._seen - self._compiled_t.images - (self._shape or (0,))[0]
        get_reporter().info(
            f"compile auto: measured on this host for {self.work}: eager {1000 * (eager or 0):.1f} ms/img, "
            f"compiled {1000 * (compiled or 0):.1f} ms/img, {self._cost_said()} -> {'compiled' if keep else 'eager'} for the ~{max(0, left)} "
            "images left; recorded for later runs"
        )

    @property
    def work(self) -> str:
        """This forward's entry in the speed records (:func:`speed_records.work_id`)."""
        return work_id(self.model, self.precision, self._shape or ())

    def _cost_said(self) -> str:
        if self._loaded:
            return f"compiled package loaded from disk in {self.compile_s or 0:.1f} s"
        what = "compile (package kept for later runs)" if isinstance(self._fn, ArtefactForward) else "compile"
        return f"{what} {self.compile_s or 0:.0f} s {'warm' if self._warm else 'cold'}"

    def _compile(self) -> None:
        self._warm = self.cached_compile_s() is not None
        path = self.artefact() if self.device.type == "cpu" else None
        self._fn = ArtefactForward(self.eager, path, self.precision) if path is not None else self._jit()

    def _jit(self) -> Any:
        fn = torch.compile(self.eager, dynamic=False)
        return frozen_call(fn) if self.device.type == "cpu" else fn

    def _call_first(self, x: torch.Tensor) -> torch.Tensor:
        """The compiling (or package-loading) call; a package that cannot be had falls back to the JIT compile."""
        if isinstance(self._fn, ArtefactForward):
            try:
                out = self._fn(x)
                self._loaded = bool(self._fn.loaded)
                return out
            except Exception as exc:
                get_reporter().warn(
                    f"compile: no compiled package ({type(exc).__name__}: {str(exc)[:200]}); "
                    "inductor's JIT compile instead"
                )
                self._fn = self._jit()
        return self._fn(x)

    def _first_compiled(self, x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        try:
            out = self._call_first(x)
        except Exception as exc:  # inductor could not compile here (no C++ compiler, an unsupported op)
            if self.mode == "on":
                raise
            self._fn, self.compiled, self._measuring = None, False, False
            self.note = f"the compile failed ({type(exc).__name__}: {str(exc)[:200]}); eager instead"
            get_reporter().warn(f"compile auto: {self.note}")
            return self._eager(x)
        _sync(self.device)
        self.compile_s = time.perf_counter() - t
        if not self._loaded:
            self._write_record()
        return out

    def finish(self) -> None:
        """Record what this run measured on this host (once; the end of extract's and predict's loops)."""
        if self._finished or self._shape is None:
            return
        self._finished = True
        from .speed_records import record

        figure = "load_s" if self._loaded else "compile_warm_s" if self._warm else "compile_cold_s"
        compile_s = {figure: self.compile_s}
        record(
            self.device,
            self.work,
            eager_s=self._eager_t.per_image,
            compiled_s=self._compiled_t.per_image,
            **(compile_s if self.compile_s is not None else {}),
        )

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


def frozen_call(fn: Any) -> Any:
    """``fn`` (a ``torch.compile`` result) called under inductor's ``freezing`` flag and ``no_grad``: weights
    become constants folded into the kernels (BN into the convolutions, oneDNN's packed weights).

    The flag must be set in inductor's config while dynamo *traces*, which happens lazily inside the first
    call (and any recompile): dynamo decides then whether parameters are graph constants. Passing
    ``options={"freezing": True}`` to ``torch.compile`` does not do that on torch 2.14 (no folding happens;
    half the speed on an AMX host, docs/performance.md), so every call runs under the patched config."""
    import torch._inductor.config as ic

    def call(x: torch.Tensor) -> torch.Tensor:
        with ic.patch(freezing=True), torch.no_grad():
            return fn(x)

    return call


def _shape_tag(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _sync(device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compiled_forward(
    net: nn.Module,
    device: Any,
    precision: str,
    mode: str = "auto",
    n_images: int = 0,
    key: str = "",
    model: str = "",
) -> CompiledForward:
    """The forward pass extract and predict call in place of ``net(x)`` (see the module doc).

    ``net`` must already be on ``device``, in eval mode, channels_last; ``key`` names the model (its
    backbone identity JSON) for the record next to inductor's cache; ``model`` (its architecture name, e.g.
    ``resnet50``) for this host's speed records; ``n_images`` is how many images this run will
    forward (the auto rule weighs the compile against them). Call it under ``torch.inference_mode()``;
    call ``finish()`` after the last batch to record the speeds measured."""
    return CompiledForward(net, device, precision, mode, n_images, key, model)
