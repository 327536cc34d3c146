"""The train step's compile (finetuning/step.py): decided from this host's speed records, measured once where
they have nothing, the faster kept; the precision probe's figures kept in the same records. Timings here are
injected (a fake clock); nothing asserts on a real timing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from resnet_transfer.backbone import read_speed
from resnet_transfer.base import CompilePrior, Reporter, set_reporter
from resnet_transfer.base import runtime as runtime
from resnet_transfer.finetuning import FinetuneConfig, finetune
from resnet_transfer.finetuning import step as step_mod

CPU = torch.device("cpu")
GAINING = CompilePrior("test", 2.0, 40.0, 10.0, 0.04, "test", plausible=2.0)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _Inner:
    """A stand-in for distributed.TrainForward: ``module`` and ``loss_weight``; each eager call costs 0.4 s."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.module = torch.nn.Linear(4, 3)
        self._module = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += 0.4
        return self.module(x)

    def loss_weight(self, n: int) -> float:
        return 1.0


def _steps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, compiled_step_s: float | None, n: int = 12
) -> tuple[Any, list[str]]:
    """``n`` steps of batch 4 through a TrainCompile on a host with the records in ``tmp_path``."""
    monkeypatch.setenv("RT_SPEED_RECORDS", str(tmp_path / "records.json"))
    monkeypatch.setattr(runtime, "compile_prior", lambda device: GAINING)
    clock = _Clock()
    monkeypatch.setattr(step_mod, "time", clock)
    inner = _Inner(clock)

    def fake_compile(module: Any, **kw: Any) -> Any:
        if compiled_step_s is None:
            pytest.fail("compiled although the records decide")

        def run(x: torch.Tensor) -> torch.Tensor:
            clock.now += compiled_step_s
            return module(x)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    rep = Reporter(verbose=False)
    prev = set_reporter(rep)
    try:
        fwd = step_mod.TrainCompile(inner, CPU, "fp32", "auto", total_steps=1000, batch=4, arch="fake")
        for _ in range(n):
            fwd(torch.randn(4, 4)).sum().backward()
            fwd.step_done(4)
        fwd.finish()
    finally:
        set_reporter(prev)
    return fwd, [m for m in rep.messages if m.startswith("compile auto")]


def test_a_long_run_measures_the_compiled_step_once_and_keeps_the_faster(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fwd, lines = _steps(monkeypatch, tmp_path, compiled_step_s=0.1)
    assert fwd.compiled is True and fwd.choice["kept"] == "compiled"
    assert "compiling once to measure" in lines[0] and "-> compiled for the rest" in lines[1]
    rec = read_speed(CPU, fwd.work)
    assert rec["eager_s"] == pytest.approx(0.1) and rec["compiled_s"] == pytest.approx(0.025)


def test_a_slower_compiled_step_goes_back_to_eager_and_the_next_run_does_not_compile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fwd, _ = _steps(monkeypatch, tmp_path, compiled_step_s=0.6)
    assert fwd.compiled is False and fwd.choice["kept"] == "eager"
    again, lines2 = _steps(monkeypatch, tmp_path, compiled_step_s=None)  # fails if it compiles
    assert again.compiled is False and "-> eager" in lines2[0]


def test_a_short_run_never_compiles(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RT_SPEED_RECORDS", str(tmp_path / "records.json"))
    clock = _Clock()
    monkeypatch.setattr(step_mod, "time", clock)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("a short run compiled"))
    fwd = step_mod.TrainCompile(_Inner(clock), CPU, "fp32", "auto", total_steps=10, batch=4, arch="fake")
    for _ in range(8):
        fwd(torch.randn(4, 4))
        fwd.step_done(4)
    assert fwd.compiled is False


def test_a_failing_compile_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(module: Any, **kw: Any) -> Any:
        def run(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    fwd = step_mod.TrainCompile(_Inner(_Clock()), CPU, "fp32", "auto", 10, 4, "fake")
    fwd._compile()
    out = fwd(torch.randn(4, 4))
    assert out.shape == (4, 3) and fwd.compiled is False and "no C++ compiler" in fwd.choice["failed"]


@pytest.mark.slow
def test_compile_on_trains_with_frozen_stages(image_folder: Path, tmp_path: Path) -> None:
    """`rt finetune --compile on` on torch's inductor: layer4 and the head train (frozen stages, BatchNorm in
    eval), the run finishes and says the step was compiled; its weights moved from the start."""
    cfg = FinetuneConfig(
        out=tmp_path / "ft", data=image_folder, model="resnet18", weights="none", image_size=32, unfreeze="layer4",
        epochs=2, batch_size=8, precision="fp32", workers=0, patience=0, compile="on",
    )  # fmt: skip
    finetune(cfg)
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["precision_choice"]["compile"]["mode"] == "on"
    assert "failed" not in report["precision_choice"]["compile"]
