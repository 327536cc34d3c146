"""Compiled forwards kept on disk: an AOTInductor package per host, model, weights, input shape and
precision, so that a run after the first *loads* the compiled forward (a fraction of a second) instead of
tracing and compiling it again (dynamo + inductor's FX graph cache: ~8 s warm on a 2-vCPU Xeon,
docs/performance.md).

The package is :func:`torch.export.export` of the forward under its autocast with a dynamic batch
dimension, compiled by :func:`torch._inductor.aoti_compile_and_package` with ``freezing`` (under
``no_grad``: that is what makes inductor fold BatchNorm into the convolutions and pre-pack the oneDNN
weights; without it the package runs ~3x slower on an AMX Xeon). Its file name holds a key over what
changes the compiled code or its baked-in constants: the backbone identity, a digest of the weights
themselves, precision, device, C x H x W, torch's version and this host's id (:mod:`speed_records`).
Files live in ``$RT_COMPILE_ARTEFACTS`` (``off`` turns them off), else ``compiled/`` next to the speed
records (``~/.cache/resnet_transfer/compiled``); each is written to a temporary sibling and renamed, so a
kill leaves no half file. Every loaded (or new) package is checked against the eager forward on the first
images of its first batch; one that cannot be loaded, or disagrees, is deleted with a warning and
compiled again (and where that fails, :mod:`compiled` falls back to inductor's JIT compile, then eager).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

ENV = "RT_COMPILE_ARTEFACTS"
VERSION = 1  # bump when the way a package is built changes
CHECK_IMAGES = 1  # images of the first batch run both ways to check a package
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}  # max |diff| over max |eager|


class ArtefactMismatch(RuntimeError):
    """A compiled package's features differ from the eager forward's."""


def artefact_dir() -> Path | None:
    """Where compiled packages are kept, or None when turned off (``RT_COMPILE_ARTEFACTS=off``)."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "false", "none"):
        return None
    if value:
        return Path(value)
    from .speed_records import records_path

    return records_path().parent / "compiled"


def weights_digest(net: nn.Module) -> str:
    """A digest of every tensor in ``net``'s state dict (names, dtypes, shapes, bytes): a package bakes the
    weights in as constants, so other weights (a finetuned checkpoint, a re-seeded init) need another."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in net.state_dict().items():
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def artefact_path(
    net: nn.Module, identity: str, model: str, precision: str, device: Any, chw: tuple[int, ...]
) -> Path | None:
    """The package file for this forward (None when packages are off or the device is not a CPU)."""
    folder = artefact_dir()
    if folder is None or device.type != "cpu":
        return None
    from .speed_records import host_id, host_info

    parts = [VERSION, identity, weights_digest(net), precision, device.type, list(chw), torch.__version__]
    text = json.dumps([*parts, host_id(host_info(device))])
    key = hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
    return folder / f"{safe}-{precision}-{'x'.join(str(int(s)) for s in chw)}-{key}.pt2"


def check(runner: Any, eager: nn.Module, x: torch.Tensor, precision: str) -> None:
    """Raise :class:`ArtefactMismatch` unless ``runner`` gives ``eager``'s features on ``x``'s first images."""
    xs = x[:CHECK_IMAGES]
    got, want = runner(xs).float(), eager(xs).float()
    scale = float(want.abs().max()) or 1.0
    diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    if not diff <= TOLERANCE.get(precision, 5e-2) * scale:
        raise ArtefactMismatch(f"features differ from eager by {diff:.3g} (scale {scale:.3g})")


def build(eager: nn.Module, x: torch.Tensor, path: Path) -> None:
    """Export ``eager`` with a dynamic batch dimension, compile it frozen, and write the package to
    ``path`` atomically."""
    import torch._inductor.config as ic

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.pt2")  # the packager wants a .pt2 name
    batch = torch.export.Dim("batch", min=1, max=max(4096, 2 * x.shape[0]))
    with torch.inference_mode(False), torch.no_grad(), ic.patch(freezing=True):
        example = x.clone()  # not an inference tensor: export traces it
        program = torch.export.export(eager, (example,), dynamic_shapes={"x": {0: batch}})
        try:
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(tmp), inductor_configs={"freezing": True}
            )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def load(path: Path) -> Any:
    return torch._inductor.aoti_load_package(str(path))


class ArtefactForward:
    """Callable ``fwd(x)``: on its first call loads the package at ``path`` (or builds it there), checks it
    against ``eager`` and runs it; it serves any batch size of the same C x H x W. ``loaded`` says
    whether the package came from disk (True) or was compiled by this run (False)."""

    def __init__(self, eager: nn.Module, path: Path, precision: str) -> None:
        self.eager, self.path, self.precision = eager, path, precision
        self.runner: Any = None
        self.loaded: bool | None = None

    def prepare(self, x: torch.Tensor) -> None:
        from ..base import get_reporter

        if self.path.exists():
            try:
                runner = load(self.path)
                check(runner, self.eager, x, self.precision)
                self.runner, self.loaded = runner, True
                return
            except Exception as exc:  # a truncated, foreign or stale file: never fatal
                get_reporter().warn(
                    f"{self.path}: cached compiled forward unusable ({type(exc).__name__}: {str(exc)[:160]}); "
                    "deleted, compiling it again"
                )
                self.path.unlink(missing_ok=True)
        try:
            build(self.eager, x, self.path)
            runner = load(self.path)
            check(runner, self.eager, x, self.precision)
        except BaseException:
            self.path.unlink(missing_ok=True)  # never leave a package that failed its check for the next run
            raise
        self.runner, self.loaded = runner, False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.runner is None:
            self.prepare(x)
        return self.runner(x)
