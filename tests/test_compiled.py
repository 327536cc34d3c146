"""The compile choice (runtime.resolve_compile) and the forward pass extract/predict call
(compiled.compiled_forward). The compile itself is slow on 2 cores (30-120 s): those tests are marked
slow; run them with ``PYTHONPATH=$PWD python -m pytest -q -m slow tests/test_compiled.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from resnet_transfer.backbone import artefact, build_backbone, compiled_forward
from resnet_transfer.backbone import compiled as compiled_mod
from resnet_transfer.base import CompilePrior, UsageError, compile_plan, resolve_compile
from resnet_transfer.base import runtime as runtime
from resnet_transfer.cli import app

CPU = torch.device("cpu")
GAINING = CompilePrior(
    "test", speedup=2.0, cold_s=40.0, warm_s=10.0, eager_s_per_image=0.04, source="test", plausible=2.0
)


@pytest.fixture(autouse=True)
def jit_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are of the decision and inductor's JIT compile: no compiled package kept on disk (those
    have their own tests, tests/test_compiled_artefact.py)."""
    monkeypatch.setenv("RT_COMPILE_ARTEFACTS", "off")


@pytest.fixture
def gaining_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "compile_prior", lambda device: GAINING)


def test_on_and_off_are_taken_as_given() -> None:
    assert resolve_compile("on", 1, CPU) is True
    assert resolve_compile("OFF", 10**9, CPU) is False


def test_unknown_mode_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--compile"):
        resolve_compile("sometimes", 10, CPU)
    with pytest.raises(UsageError):
        compiled_forward(torch.nn.Identity(), CPU, "fp32", "fast")


def test_auto_compiles_when_the_images_repay_it(gaining_host: None) -> None:
    # gain per image = 0.04 * (1 - 1/2) = 0.02 s; a 40 s cold compile needs more than 2000 images
    assert resolve_compile("auto", 1999, CPU) is False
    assert resolve_compile("auto", 2001, CPU) is True
    # measured figures replace the prior's: the eager rate, the compile time, the compiled rate
    assert resolve_compile("auto", 2001, CPU, eager_s_per_image=0.01) is False
    assert resolve_compile("auto", 600, CPU, compile_s=10.0) is True
    assert resolve_compile("auto", 10**6, CPU, 0.04, 10.0, compiled_s_per_image=0.04) is False


def test_auto_never_compiles_where_no_gain_is_expected(monkeypatch: pytest.MonkeyPatch) -> None:
    none = CompilePrior("cpu", 1.0, 40.0, 10.0, 0.08, "test")
    monkeypatch.setattr(runtime, "compile_prior", lambda device: none)
    assert resolve_compile("auto", 10**9, CPU) is False


def test_the_prior_is_one_conservative_guess_for_every_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """No per-ISA table: an AMX host and a host without matrix units get the same prior (their own
    measurements replace it)."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    amx = runtime.compile_prior(CPU)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})
    assert runtime.compile_prior(CPU) == amx
    assert amx.speedup <= 1.2 and amx.cold_s >= 30
    assert runtime.compile_prior(torch.device("cuda")).kind == "cuda"


def _tiny() -> tuple[torch.nn.Module, str]:
    bb = build_backbone("resnet18", "none", 32)
    return bb.net.eval().to(memory_format=torch.channels_last), bb.identity.to_json()


def _batch(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)


def test_off_is_the_eager_forward_in_float32() -> None:
    net, _ = _tiny()
    x = _batch(4)
    with torch.inference_mode():
        out = compiled_forward(net, CPU, "fp32", "off")(x)
        ref = net(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)


def test_auto_decides_on_the_second_batch_and_stays_eager_for_a_small_job(gaining_host: None) -> None:
    net, key = _tiny()
    fwd = compiled_forward(net, CPU, "fp32", "auto", n_images=12, key=key)
    with torch.inference_mode():
        fwd(_batch(4))
        assert fwd.compiled is None  # the cold first batch is not timed
        fwd(_batch(4, 1))
        assert fwd.compiled is False
        fwd(_batch(4, 2))
    assert fwd.compile_s is None


def test_hooks_keep_the_forward_eager() -> None:
    net, key = _tiny()
    h = net.layer2.register_forward_hook(lambda *a: None)
    try:
        fwd = compiled_forward(net, CPU, "fp32", "on", 100, key)
        assert fwd.compiled is False and "hooks" in fwd.note
    finally:
        h.remove()


def test_cli_rejects_an_unknown_compile_mode(image_folder: Path, tmp_path: Path) -> None:
    args = ["extract", "--data", str(image_folder), "--out", str(tmp_path / "f.h5"), "--model", "resnet18"]
    res = CliRunner().invoke(app, [*args, "--weights", "none", "--image-size", "32", "--compile", "maybe"])
    assert res.exit_code == 2, res.output
    assert "--compile" in res.output


@pytest.mark.slow
def test_compiled_features_match_eager_and_the_compile_is_recorded(tmp_path: Path) -> None:
    """Compiled (inductor, freezing) bf16 features vs eager bf16: cosine >= 0.999 per row; the batch shape
    it was not compiled for runs eager; the compile time is recorded next to inductor's cache."""
    net, key = _tiny()
    x = _batch(8)
    with torch.inference_mode():
        ref = compiled_forward(net, CPU, "bf16", "off")(x)
        fwd = compiled_forward(net, CPU, "bf16", "on", 16, key)
        out = fwd(x)
        tail = fwd(x[:3])
    assert fwd.compiled is True and fwd.compile_s is not None and fwd.compile_s > 0
    assert torch.nn.functional.cosine_similarity(out, ref).min() >= 0.999
    assert torch.nn.functional.cosine_similarity(tail, ref[:3]).min() >= 0.999
    record = fwd._record_path()
    assert record is not None and record.is_relative_to(compiled_mod.inductor_cache_dir())
    assert json.loads(record.read_text())["compile_s"] == pytest.approx(fwd.compile_s, abs=0.01)
    assert fwd.cached_compile_s() == pytest.approx(fwd.compile_s, abs=0.01)


def _conv_bn() -> torch.nn.Module:
    """A convolution and its BatchNorm, flattened: what freezing folds (the BN into the conv), in a graph
    with no kernel of inductor's own to build (the conv is oneDNN's), so it compiles in seconds."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), bn, torch.nn.Flatten())
    return net.eval().to(memory_format=torch.channels_last)


def test_the_compiled_cpu_forward_is_frozen() -> None:
    """The weights are folded into the compiled graph (inductor's freezing passes ran: the BNs were folded
    into the convolutions). ``torch.compile(options={"freezing": True})`` leaves the count at zero."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    net = _conv_bn()
    x = _batch(4)
    with torch.inference_mode():
        ref = net(x)
        fwd = compiled_forward(net, CPU, "fp32", "on", 8, "conv-bn")
        out = fwd(x)
        again = fwd(x)
    assert fwd.compiled is True
    assert counters["inductor"]["binary_folding"] >= 1, dict(counters["inductor"])
    assert torch.allclose(out, ref, atol=1e-4) and torch.equal(out, again)


# ------------------------------------------------------------------ `auto` measures what it does not know


def test_plan_with_both_figures_weighs_the_images_left() -> None:
    # 1,000 images x (40 - 20) ms = 20 s saved against the compile's cost
    assert compile_plan(1000, 0.040, 0.020, 19.0, False, CPU)[0] == "compile"
    assert compile_plan(1000, 0.040, 0.020, 21.0, False, CPU)[0] == "eager"
    assert compile_plan(10**6, 0.040, 0.041, 1.0, True, CPU)[0] == "eager"  # measured slower: never


def test_plan_measures_an_unknown_compile_only_where_it_could_repay(gaining_host: None) -> None:
    # GAINING: plausible 2x, warm 10 s. 1,000 x 40 ms x 0.5 = 20 s could be saved > 10 s: measure
    action, why = compile_plan(1000, 0.040, None, None, False, CPU)
    assert action == "measure" and "plausible" in why
    assert compile_plan(400, 0.040, None, None, False, CPU)[0] == "eager"  # 8 s < 10 s
    # a handful of images never waits for a compile, however slow each one is
    assert compile_plan(8, 30.0, None, None, False, CPU, trial_images=24)[0] == "eager"
    assert compile_plan(0, 0.040, None, None, False, CPU)[0] == "eager"


def test_plan_without_a_timed_warm_compile_uses_the_generic_warm_prior(gaining_host: None) -> None:
    # compiled rate known, the warm compile never timed: 1,000 x 15 ms = 15 s > the prior's 10 s warm
    assert compile_plan(1000, 0.040, 0.025, None, True, CPU)[0] == "compile"
    assert compile_plan(1000, 0.040, 0.025, None, False, CPU)[0] == "eager"  # cold: the prior's 40 s


class _Clock:
    """A fake ``time`` module for compiled.py: eager and compiled calls advance it by set amounts."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _Slow(torch.nn.Module):
    def __init__(self, clock: _Clock, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds = clock, seconds
        self.lin = torch.nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.seconds
        return self.lin(x.mean((2, 3), keepdim=True))


def _measured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, compiled_batch_s: float) -> tuple[Any, list[str]]:
    """An `auto` forward on a host with no records, eager 0.4 s per batch of 4 (fake clock), 'compiled'
    ``compiled_batch_s`` per batch; 20 batches. Returns the forward and its log lines."""
    from resnet_transfer.base import Reporter, set_reporter

    monkeypatch.setenv("RT_SPEED_RECORDS", str(tmp_path / "records.json"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(runtime, "compile_prior", lambda device: GAINING)
    clock = _Clock()
    monkeypatch.setattr(compiled_mod, "time", clock)
    compiles: list[int] = []

    def fake_compile(fn: Any, **kw: Any) -> Any:
        compiles.append(1)

        def run(x: torch.Tensor) -> torch.Tensor:
            out = fn(x)
            clock.now += compiled_batch_s - 0.4  # the eager module inside added 0.4
            return out

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    rep = Reporter(verbose=False)
    prev = set_reporter(rep)
    try:
        fwd = compiled_forward(_Slow(clock, 0.4), CPU, "fp32", "auto", n_images=2000, key="k", model="fake")
        with torch.inference_mode():
            for i in range(20):
                fwd(_batch(4, i))
        fwd.finish()
    finally:
        set_reporter(prev)
    assert len(compiles) == 1  # at most one compile to find out
    return fwd, [m for m in rep.messages if m.startswith("compile auto")]


def test_auto_measures_once_and_keeps_the_compile_where_it_is_faster(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from resnet_transfer.backbone import speed_records

    fwd, lines = _measured(monkeypatch, tmp_path, compiled_batch_s=0.1)
    assert fwd.compiled is True
    assert len(lines) == 2 and "compiling once to measure" in lines[0] and "-> compiled for" in lines[1]
    rec = speed_records.read(CPU, fwd.work)
    assert rec["eager_s"] == pytest.approx(0.1) and rec["compiled_s"] == pytest.approx(0.025)
    assert "compile_cold_s" in rec


def test_auto_measures_once_and_goes_back_to_eager_where_the_compile_is_slower(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from resnet_transfer.backbone import speed_records

    fwd, lines = _measured(monkeypatch, tmp_path, compiled_batch_s=0.5)
    assert fwd.compiled is False
    assert "-> eager for" in lines[1]
    rec = speed_records.read(CPU, fwd.work)
    assert rec["compiled_s"] > rec["eager_s"]  # recorded: the next run decides without measuring
    # the next run reads both figures and stays eager without compiling
    fwd2, lines2 = _measured_again(monkeypatch, tmp_path)
    assert fwd2.compiled is False and "measured on this host (" in lines2[0]


def _measured_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Any, list[str]]:
    from resnet_transfer.base import Reporter, set_reporter

    clock = _Clock()
    monkeypatch.setattr(compiled_mod, "time", clock)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: pytest.fail("compiled again"))
    rep = Reporter(verbose=False)
    prev = set_reporter(rep)
    try:
        fwd = compiled_forward(_Slow(clock, 0.4), CPU, "fp32", "auto", n_images=2000, key="k", model="fake")
        with torch.inference_mode():
            for i in range(6):
                fwd(_batch(4, i))
    finally:
        set_reporter(prev)
    return fwd, [m for m in rep.messages if m.startswith("compile auto")]


def test_a_failing_compile_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RT_SPEED_RECORDS", str(tmp_path / "records.json"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    def broken(fn: Any, **kw: Any) -> Any:
        def run(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    net, key = _tiny()
    fwd = compiled_forward(net, CPU, "fp32", "auto", n_images=10**6, key=key)
    fwd.compiled, fwd._shape = True, (4, 3, 32, 32)
    fwd._compile()
    with torch.inference_mode():
        out = fwd(_batch(4))
    assert out.shape == (4, net.num_features) and fwd.compiled is False and "failed" in fwd.note


def test_a_small_rt_extract_never_compiles(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: `rt extract --compile auto` of a handful of images on a host with no records never
    compiles (torch.compile would fail the test) and leaves an eager figure only."""
    monkeypatch.setenv("RT_SPEED_RECORDS", str(tmp_path / "records.json"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("a small job compiled"))
    monkeypatch.setenv("RT_COMPILE_ARTEFACTS", str(tmp_path / "compiled"))
    monkeypatch.setattr(artefact, "build", lambda *a, **k: pytest.fail("a small job built a package"))
    out = tmp_path / "f.h5"
    argv = ["extract", "--data", str(image_folder), "--out", str(out), "--model", "resnet18", "--weights", "none"]
    res = CliRunner().invoke(app, [*argv, "--image-size", "32", "--batch-size", "4", "--compile", "auto"])
    assert res.exit_code == 0, res.output
    assert out.exists()
    records = json.loads((tmp_path / "records.json").read_text())
    (host,) = records["hosts"].values()
    assert all("compiled_s" not in w and "compile_cold_s" not in w for w in host["work"].values())
    assert not (tmp_path / "compiled").exists()
