"""The compiled package kept on disk (backbone/artefact.py): its key, its reuse, and the fallbacks when it is
corrupt, wrong or cannot be built. The fast tests fake the AOTInductor build (a real one takes ~20 s on 2
vCPU); the slow one builds, reuses and invalidates a real package:
``PYTHONPATH=$PWD python -m pytest -q -m slow tests/test_compiled_artefact.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from resnet_transfer.backbone import artefact, build_backbone, compiled_forward
from resnet_transfer.base import Reporter, set_reporter

CPU = torch.device("cpu")


@pytest.fixture
def packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "compiled"
    monkeypatch.setenv("RT_COMPILE_ARTEFACTS", str(folder))
    # this test's own speed records: the session's file holds what earlier tests' extracts measured (e.g. a
    # compile that did not pay for the same model and shape), which would decide for these tests
    monkeypatch.setenv("RT_SPEED_RECORDS", str(tmp_path / "speed-records.json"))
    return folder


def _tiny(seed: int = 0) -> tuple[torch.nn.Module, str]:
    bb = build_backbone("resnet18", "none", 32)
    if seed:
        with torch.no_grad():
            bb.net.conv1.weight.add_(float(seed))
    return bb.net.eval().to(memory_format=torch.channels_last), bb.identity.to_json()


def _batch(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)


def _path(net: torch.nn.Module, ident: str, precision: str = "fp32", chw: tuple[int, ...] = (3, 32, 32)) -> Any:
    return artefact.artefact_path(net, ident, "resnet18", precision, CPU, chw)


def test_the_key_changes_with_weights_precision_shape_and_torch(
    packages: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, ident = _tiny()
    p = _path(net, ident)
    assert p is not None and p.parent == packages and p.suffix == ".pt2"
    assert _path(_tiny()[0], ident) == p  # the same weights (seeded init) in another model object: reused
    assert _path(_tiny(seed=1)[0], ident) != p  # other weights baked in: another package
    assert _path(net, ident, "bf16") != p
    assert _path(net, ident, chw=(3, 64, 64)) != p
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert _path(net, ident) != p


def test_packages_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RT_COMPILE_ARTEFACTS", "off")
    net, ident = _tiny()
    assert artefact.artefact_dir() is None and _path(net, ident) is None


def _fake_build(monkeypatch: pytest.MonkeyPatch, runner: Any) -> list[Path]:
    """``build`` writes a marker file; ``load`` of a marker returns ``runner``, of anything else the real load."""
    built: list[Path] = []
    real_load = artefact.load

    def build(eager: Any, x: Any, path: Path) -> None:
        built.append(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"fake package")

    monkeypatch.setattr(artefact, "build", build)
    monkeypatch.setattr(artefact, "load", lambda p: runner if p.read_bytes() == b"fake package" else real_load(p))
    return built


def _run(net: torch.nn.Module, ident: str, x: torch.Tensor) -> tuple[Any, torch.Tensor, list[str]]:
    rep = Reporter(verbose=False)
    prev = set_reporter(rep)
    try:
        fwd = compiled_forward(net, CPU, "fp32", "on", 100, ident, "resnet18")
        with torch.inference_mode():
            out = fwd(x)
    finally:
        set_reporter(prev)
    return fwd, out, rep.messages + rep.warnings


def test_a_package_is_written_then_loaded_by_the_next_run(packages: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net, ident = _tiny()
    x = _batch(4)
    with torch.inference_mode():
        ref = net(x)
    built = _fake_build(monkeypatch, net)
    fwd, out, _ = _run(net, ident, x)
    assert built == [fwd.artefact()] and fwd._loaded is False and torch.allclose(out, ref)
    fwd2, out2, _ = _run(net, ident, x)
    assert len(built) == 1 and fwd2._loaded is True and torch.allclose(out2, ref)
    with torch.inference_mode():  # a package serves the last, partial batch too
        assert torch.allclose(fwd2(x[:3]), ref[:3])


def test_a_corrupt_package_is_deleted_and_built_again(packages: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net, ident = _tiny()
    built = _fake_build(monkeypatch, net)
    path = _path(net, ident)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    fwd, out, messages = _run(net, ident, _batch(4))
    assert built == [path] and fwd.compiled is True and fwd._loaded is False
    assert any("unusable" in m and "compiling it again" in m for m in messages)
    assert out.shape == (4, net.num_features)


def test_a_package_that_disagrees_with_eager_is_not_used(packages: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net, ident = _tiny()
    x = _batch(4)
    _fake_build(monkeypatch, lambda t: net(t) + 1.0)  # wrong features, every time
    calls: list[int] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(1) or fn)  # the JIT fallback
    fwd, out, messages = _run(net, ident, x)
    with torch.inference_mode():
        ref = net(x)
    assert calls == [1] and torch.allclose(out, ref)  # inductor's JIT compile ran instead
    assert any("ArtefactMismatch" in m and "JIT compile instead" in m for m in messages)
    assert not fwd.artefact().exists()  # nothing wrong left for the next run


def test_a_package_that_cannot_be_built_falls_back_to_eager_at_worst(
    packages: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*a: Any, **k: Any) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(artefact, "build", broken)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    net, ident = _tiny()
    rep = Reporter(verbose=False)
    prev = set_reporter(rep)
    try:
        fwd = compiled_forward(net, CPU, "fp32", "auto", 10**6, ident, "resnet18")
        fwd.compiled, fwd._shape = True, (4, 3, 32, 32)
        fwd._compile()
        with torch.inference_mode():
            out = fwd(_batch(4))
    finally:
        set_reporter(prev)
    assert out.shape == (4, net.num_features) and fwd.compiled is False and "failed" in fwd.note


@pytest.mark.slow
def test_a_real_package_is_built_reused_and_invalidated(packages: Path) -> None:
    """AOTInductor for real (~20 s a build on 2 vCPU): built once, loaded by the next forward with eager's
    features, and other weights get their own package."""
    net, ident = _tiny()
    x = _batch(8)
    with torch.inference_mode():
        ref = net(x)
    fwd, out, _ = _run(net, ident, x)
    assert fwd._loaded is False and fwd.artefact().exists() and torch.allclose(out, ref, atol=1e-3, rtol=1e-3)
    fwd2, out2, _ = _run(net, ident, x)
    assert fwd2._loaded is True and torch.allclose(out2, ref, atol=1e-3, rtol=1e-3)
    with torch.inference_mode():
        assert torch.allclose(fwd2(x[:3]), ref[:3], atol=1e-3, rtol=1e-3)
    other, ident2 = _tiny(seed=1)
    assert _path(other, ident2) != fwd.artefact()


def test_auto_loads_a_package_at_the_first_batch_where_the_records_say_compile(
    packages: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later run: this host recorded eager and compiled rates and the package is on disk, so `auto` loads it
    for the very first batch instead of running eager batches to time them again."""
    from resnet_transfer.backbone import speed_records, work_id

    net, ident = _tiny()
    x = _batch(4)
    _fake_build(monkeypatch, net)
    speed_records.record(CPU, work_id("resnet18", "fp32", tuple(x.shape)), eager_s=0.1, compiled_s=0.01, load_s=0.2)
    path = _path(net, ident)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"fake package")
    rep = Reporter(verbose=False)
    prev = set_reporter(rep)
    try:
        fwd = compiled_forward(net, CPU, "fp32", "auto", 1000, ident, "resnet18")
        with torch.inference_mode():
            fwd(x)
    finally:
        set_reporter(prev)
    assert fwd.compiled is True and fwd._loaded is True and fwd._eager_t.images == 0
    assert any("load of the compiled package 0.2 s" in m for m in rep.messages)
