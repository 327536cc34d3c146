"""kill -9 at any moment of `rt extract` never leaves an unreadable cache, and the next run completes it,
equal to an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from resnet_transfer.cache import FeatureCache, chunk_dir
from tests.conftest import make_image_folder

ARGS = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "4", "--chunk-rows", "4"]


def _cmd(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "resnet_transfer", "-q", "extract", "--data", str(data), "--out", str(out), *ARGS]


def _env() -> dict[str, str]:
    return {**os.environ, "RT_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _assert_consistent(out: Path) -> None:
    """Whatever a kill left must be readable: a complete cache (every row finite) or none, and only whole
    chunk files."""
    import h5py

    if out.exists():
        assert np.isfinite(FeatureCache(out).features()).all()
    for p in chunk_dir(out).glob("chunk-*.h5"):
        with h5py.File(p, "r") as f:
            assert len(f["keys"]) == len(f["features"])


def _reference(data: Path, tmp: Path) -> FeatureCache:
    tmp.mkdir(exist_ok=True)
    ref = tmp / "ref.h5"
    subprocess.run(_cmd(data, ref), check=True, env=_env(), timeout=600)
    return FeatureCache(ref)


def _finish_and_compare(data: Path, out: Path, ref: FeatureCache) -> None:
    subprocess.run(_cmd(data, out), check=True, env=_env(), timeout=600)
    got = FeatureCache(out)
    assert sorted(zip(got.paths, got.keys, got.labels)) == sorted(zip(ref.paths, ref.keys, ref.labels))
    order = [ref.paths.index(p) for p in got.paths]
    np.testing.assert_array_equal(got.features(), ref.features(order))
    referenced = set(got.locations()[0])
    assert {p.name for p in chunk_dir(out).glob("chunk-*.h5")} == referenced  # no chunk left unused


def test_kill_after_first_chunk_then_resume(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8, seed=5)
    ref = _reference(data, tmp_path)
    out = tmp_path / "c.h5"
    proc = subprocess.Popen(_cmd(data, out), env=_env())
    deadline = time.monotonic() + 300
    while not any(chunk_dir(out).glob("chunk-*.h5")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None  # killed in the middle: after its first chunk file, before the index
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _assert_consistent(out)
    _finish_and_compare(data, out, ref)


@pytest.mark.slow
def test_repeated_random_kills(tmp_path: Path) -> None:
    """Kill the same run again and again at random moments; every intermediate state is readable and the
    final cache equals an uninterrupted one."""
    data = make_image_folder(tmp_path / "data", per_class=20, seed=6)
    t0 = time.monotonic()
    ref = _reference(data, tmp_path)
    full = time.monotonic() - t0
    out = tmp_path / "c.h5"
    rng = random.Random(0)
    _kill_repeatedly(data, out, rng, 12, full)
    _finish_and_compare(data, out, ref)
    # then the dataset changes (edits, deletions, moves between class folders, additions) and the update is
    # killed again and again: still readable at every step, and at the end equal to a fresh extraction
    _edit_dataset(data, rng)
    ref2 = _reference(data, tmp_path / "ref2")
    _kill_repeatedly(data, out, rng, 6, full / 3)
    _finish_and_compare(data, out, ref2)


def _kill_repeatedly(data: Path, out: Path, rng: random.Random, trials: int, full: float) -> None:
    for _ in range(trials):
        proc = subprocess.Popen(_cmd(data, out), env=_env())
        time.sleep(rng.uniform(0.5, max(1.0, full)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        _assert_consistent(out)


def _edit_dataset(data: Path, rng: random.Random) -> None:
    from tests.conftest import draw_image

    files = sorted(p for p in data.rglob("*") if p.is_file())
    picks = rng.sample(files, 12)
    gen = np.random.default_rng(11)
    for p in picks[:4]:  # edited in place
        draw_image(p.parent.name, gen, size=50).save(p, format="PNG")
    for p in picks[4:7]:  # deleted
        p.unlink()
    for p in picks[7:10]:  # moved to another class folder
        other = "circle" if p.parent.name != "circle" else "square"
        p.rename(data / other / f"moved_{p.name}")
    make_image_folder(data, per_class=3, seed=12)  # added


@pytest.mark.slow
def test_finetune_repeated_random_kills(tmp_path: Path) -> None:
    """kill -9 `rt finetune` at random moments: every checkpoint left behind loads (weights only), each
    next run resumes from it, and the final model equals an uninterrupted run's, bit for bit."""
    from safetensors.torch import load_file

    from resnet_transfer.finetuning import load_checkpoint

    data = make_image_folder(tmp_path / "data", per_class=10, seed=7)
    args = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--unfreeze", "all"]
    args += ["--epochs", "4", "--batch-size", "8", "--data", str(data), "--checkpoint-every", "1"]
    ft = [sys.executable, "-m", "resnet_transfer", "-q", "finetune"]
    t0 = time.monotonic()
    subprocess.run([*ft, *args, "--out", str(tmp_path / "ref")], check=True, env=_env(), timeout=900)
    full = time.monotonic() - t0
    out = tmp_path / "cut"
    rng = random.Random(1)
    kills = 0
    for _ in range(10):
        if (out / "meta.json").exists():
            break  # finished between two kills
        resume = (out / "checkpoints" / "last.pt").exists()
        cmd = [*ft, "--resume", str(out)] if resume else [*ft, *args, "--out", str(out)]
        proc = subprocess.Popen(cmd, env=_env())
        time.sleep(rng.uniform(0.3 * full, 0.6 * full))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if (out / "checkpoints" / "last.pt").exists():
            assert load_checkpoint(out)["epoch"] >= 1
    assert kills >= 2
    if not (out / "meta.json").exists():
        subprocess.run([*ft, "--resume", str(out)], check=True, env=_env(), timeout=900)
    for name in ("backbone.safetensors", "head.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(out / name))
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), name
