"""This host's speed records (resnet_transfer.speed_records) and the decisions taken from them: `--compile
auto` compiles where the host measured a gain that repays the compile, stays eager where it did not, and
says which figures it used. No timing is asserted: the figures here are written by the tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from resnet_transfer.backbone import compiled_forward, int8_hint
from resnet_transfer.backbone import speed_records as speed_records
from resnet_transfer.backbone.quantized import SCHEME
from resnet_transfer.base import Reporter, set_reporter

CPU = torch.device("cpu")
WORK = "convnet|fp32|4x3x16x16"


@pytest.fixture
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "speed-records.json"
    monkeypatch.setenv("RT_SPEED_RECORDS", str(path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # its warm-cache markers
    return path


@pytest.fixture
def reporter() -> Iterator[Reporter]:
    rep = Reporter(verbose=False)
    prev = set_reporter(rep)
    try:
        yield rep
    finally:
        set_reporter(prev)


def _as_host(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    info = {"cpu": name, "isa": [], "cores": 2, "threads": 2, "torch": torch.__version__, "device": "cpu"}
    monkeypatch.setattr(speed_records, "host_info", lambda device: dict(info))


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return net.eval().to(memory_format=torch.channels_last)


def _run(mode: str, n_images: int, key: str, batches: int = 4) -> Any:
    """``batches`` batches of 4 through the library's forward, then its ``finish()`` (the records)."""
    fwd = compiled_forward(_net(), CPU, "fp32", mode, n_images=n_images, key=key, model="convnet")
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(batches):
            fwd(x)
    fwd.finish()
    return fwd


def test_two_hosts_figures_pick_both_ways(
    records: Path, reporter: Reporter, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One file, two hosts, the same model and shape: where compiling measured 4x faster (and a 20 s
    compile) 1,000 images repay it; where it measured 1.03x they do not. The decision and its line follow
    the host, and each run adds its own samples to its host's entry."""
    _as_host(monkeypatch, "host with matrix units")
    speed_records.record(CPU, WORK, eager_s=0.040, compiled_s=0.010, compile_cold_s=20.0)
    _as_host(monkeypatch, "host without")
    speed_records.record(CPU, WORK, eager_s=0.040, compiled_s=0.039, compile_cold_s=20.0)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the decision is under test, not inductor

    _as_host(monkeypatch, "host with matrix units")
    fast = _run("auto", 1000, key=str(tmp_path / "a"))
    _as_host(monkeypatch, "host without")
    slow = _run("auto", 1000, key=str(tmp_path / "b"))

    assert fast.compiled is True and slow.compiled is False
    lines = [m for m in reporter.messages if m.startswith("compile auto")]
    assert len(lines) == 2 and all("measured on this host" in m for m in lines), lines
    assert "compiled 10.0 ms/img, compile 20 s cold) -> compile" in lines[0]
    assert "compiled 39.0 ms/img, compile 20 s cold) -> eager" in lines[1]
    hosts = json.loads(records.read_text())["hosts"]
    assert len(hosts) == 2
    by_cpu = {h["host"]["cpu"]: h["work"][WORK] for h in hosts.values()}
    assert len(by_cpu["host with matrix units"]["compiled_s"]) == 2  # this run's compiled rate was added
    assert len(by_cpu["host with matrix units"]["compile_cold_s"]) == 2
    assert len(by_cpu["host without"]["eager_s"]) == 2 and len(by_cpu["host without"]["compiled_s"]) == 1


def test_with_nothing_recorded_a_small_job_stays_eager_and_says_so(
    records: Path, reporter: Reporter, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _as_host(monkeypatch, "a new host")
    fwd = _run("auto", 1000, key=str(tmp_path / "c"))
    assert fwd.compiled is False  # 1,000 images of a tiny net: even a plausible gain is worth no compile
    (line,) = [m for m in reporter.messages if m.startswith("compile auto")]
    assert "not worth measuring" in line and "-> eager" in line
    # the eager run recorded its rate: the next run on this host has a measured eager figure
    assert set(speed_records.read(CPU, WORK)) == {"eager_s"}


def test_a_warm_inductor_cache_weighs_the_warm_compile_time(
    records: Path, reporter: Reporter, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Measured: eager 40 ms, compiled 20 ms, 90 s cold, 5 s warm. 1,000 images repay the warm compile
    only: the run compiles when inductor's cache holds the model, not when it does not."""
    _as_host(monkeypatch, "h")
    for _ in range(3):  # (three samples: this test's own eager runs add one each, far faster)
        speed_records.record(CPU, WORK, eager_s=0.040, compiled_s=0.020, compile_cold_s=90.0, compile_warm_s=5.0)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    cold = _run("auto", 1000, key=str(tmp_path / "d"))
    fwd = compiled_forward(_net(), CPU, "fp32", "auto", 1000, str(tmp_path / "d"), "convnet")
    fwd._shape = (4, 3, 16, 16)
    assert fwd.cached_compile_s() is None  # the cold run decided eager: nothing marks the cache warm
    fwd.compile_s = 4.0
    fwd._write_record()  # what a compiled run leaves next to inductor's cache
    warm = _run("auto", 1000, key=str(tmp_path / "d"))
    assert cold.compiled is False and warm.compiled is True
    lines = [m for m in reporter.messages if m.startswith("compile auto")]
    assert "compile 90 s cold) -> eager" in lines[0] and "compile 5 s warm) -> compile" in lines[1]


def test_records_are_per_host_and_ignore_a_corrupt_file(records: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _as_host(monkeypatch, "one")
    speed_records.record(CPU, WORK, eager_s=0.05)
    _as_host(monkeypatch, "two")
    assert speed_records.read(CPU, WORK) == {}  # another host's figures are not this one's
    records.write_text('{"format": "resnet_transfer.speed_records", "hosts": {"x": ')  # torn by hand
    assert speed_records.read(CPU, WORK) == {}
    speed_records.record(CPU, WORK, eager_s=0.07, compiled_s=None)
    assert speed_records.read(CPU, WORK) == {"eager_s": pytest.approx(0.07)}
    for v in (0.01, 0.02, 0.03, 0.04, 0.05, 0.06):
        speed_records.record(CPU, WORK, eager_s=v)
    assert speed_records.read(CPU, WORK)["eager_s"] == pytest.approx(0.04)  # median of the last five


def test_work_and_host_ids() -> None:
    assert speed_records.work_id("resnet50", "int8@0a1b2c", (32, 3, 224, 224)) == "resnet50|int8|32x3x224x224"
    info = speed_records.host_info(CPU)
    assert {"cpu", "isa", "cores", "threads", "torch"} <= set(info)
    other = {**info, "threads": info["threads"] + 1}
    assert speed_records.host_id(info) != speed_records.host_id(other)


def test_the_int8_hint_follows_this_hosts_figures_and_the_job_size(records: Path) -> None:
    """int8 measured 2x the compiled forward with 15 s to quantise and compile: a 1,000-image job does not
    repay it, a 10,000-image job does, once this host's probe check found int8 within 0.5 points of bf16
    (none recorded, or a larger drop: no hint); where int8 measured only 1.25x there is never a hint."""
    shape = (32, 3, 224, 224)
    speed_records.record(CPU, speed_records.work_id("netA", "bf16", shape), eager_s=0.015, compiled_s=0.010)
    speed_records.record(CPU, speed_records.work_id("netA", "int8", shape), int8_s=0.005, int8_setup_s=15.0)
    assert int8_hint(CPU, "netA", "bf16", shape, 10_000) is None  # no probe check on this host yet
    speed_records.record_probe(CPU, SCHEME, "resnet18", 0.9)
    assert int8_hint(CPU, "netA", "bf16", shape, 10_000) is None  # the probe lost 0.9 points
    speed_records.record_probe(CPU, "another-scheme", "resnet18", 0.1)
    assert int8_hint(CPU, "netA", "bf16", shape, 10_000) is None  # a probe of another quantisation recipe
    speed_records.record_probe(CPU, SCHEME, "resnet18", 0.2)
    assert int8_hint(CPU, "netA", "bf16", shape, 1000) is None
    hint = int8_hint(CPU, "netA", "bf16", shape, 10_000)
    assert hint is not None and hint.startswith("hint: --precision int8 ran 2.0x") and "about 35 s less" in hint
    assert "(resnet18, measured here) was 0.20 points" in hint
    assert int8_hint(CPU, "netA", "int8", shape, 10_000) is None  # already int8
    assert int8_hint(CPU, "netA", "bf16", (16, 3, 224, 224), 10_000) is None  # not measured
    speed_records.record(CPU, speed_records.work_id("netB", "bf16", shape), compiled_s=0.010)
    speed_records.record(CPU, speed_records.work_id("netB", "int8", shape), int8_s=0.008, int8_setup_s=1.0)
    assert int8_hint(CPU, "netB", "bf16", shape, 10**7) is None


def test_rt_extract_prints_the_int8_hint_from_this_hosts_records(
    records: Path, reporter: Reporter, image_folder: Path, tmp_path: Path
) -> None:
    from resnet_transfer.cache import ExtractConfig, extract

    shape = (32, 3, 32, 32)
    speed_records.record(CPU, speed_records.work_id("resnet18", "fp32", shape), eager_s=0.1)
    cfg = ExtractConfig(
        data=image_folder, out=tmp_path / "f.h5", model="resnet18", weights="none", image_size=32, precision="fp32"
    )
    extract(cfg)
    assert not [m for m in reporter.messages if m.startswith("hint:")]
    speed_records.record(CPU, speed_records.work_id("resnet18", "int8", shape), int8_s=0.01, int8_setup_s=0.5)
    speed_records.record_probe(CPU, SCHEME, "resnet18", 0.1)
    extract(ExtractConfig(**{**cfg.__dict__, "overwrite": True}))
    (hint,) = [m for m in reporter.messages if m.startswith("hint:")]
    assert "--precision int8" in hint and "these 24 images" in hint
