"""torchrun (gloo, CPU, 2 processes) tests for sharded `rt extract`, plus the pure helpers.

Every multi-process test launches ``python -m torch.distributed.run`` in a subprocess with a c10d rendezvous
on 127.0.0.1 at a free port. Comparisons use ``--precision fp32``: with bf16 autocast a rank's different batch
composition could change results in the last bits; in fp32 they agree to float16 storage precision.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from resnet_transfer.base import CacheError, RankReporter, Reporter, dist_env, shard_block
from resnet_transfer.cache import ExtractConfig, FeatureCache, chunk_dir, extract, runs
from tests.conftest import make_image_folder

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
FAST = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--precision", "fp32"]
SMALL = ["--batch-size", "2", "--chunk-rows", "2", "--workers", "0"]


# -------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(
    nproc: int, *args: object, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node nproc tests/dist_worker.py <args>`` on this machine only."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--max-restarts",
        "0",
        str(WORKER),
        *[str(a) for a in args],
    ]
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RT_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if env is None or k not in env:
            full_env.pop(k, None)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def reference(data: Path, out: Path, **kw: object) -> FeatureCache:
    extract(
        ExtractConfig(
            data=data, out=out, model="resnet18", weights="none", image_size=32, precision="fp32", batch_size=4, **kw
        )  # type: ignore[arg-type]
    )
    return FeatureCache(out)


def assert_same_cache(a: FeatureCache, b: FeatureCache) -> None:
    assert a.paths == b.paths
    assert a.classes == b.classes
    np.testing.assert_array_equal(a.labels, b.labels)
    assert sorted(a.skipped) == sorted(b.skipped)
    assert a.feature_dtype == b.feature_dtype and a.stages == b.stages
    np.testing.assert_allclose(a.features(), b.features(), rtol=2e-3, atol=2e-3)  # fp32 compute, fp16 storage
    for name in a.stages:
        rows = np.arange(a.n)
        np.testing.assert_allclose(a.stage(name, rows), b.stage(name, rows), rtol=2e-3, atol=2e-3)
    run_only = {"created", "last_run"}  # when, and what that run computed: not part of the rows
    same = {k for k in a.attrs if k not in run_only}
    assert same == {k for k in b.attrs if k not in run_only}
    assert {k: a.attrs[k] for k in same} == {k: b.attrs[k] for k in same}


def is_virtual(path: Path) -> bool:
    with h5py.File(path, "r") as f:
        return bool(f["features"].is_virtual)


# --------------------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(("n", "world"), [(0, 2), (1, 3), (12, 2), (13, 4), (5, 8)])
def test_shard_blocks_are_contiguous_and_cover_everything(n: int, world: int) -> None:
    blocks = [shard_block(n, r, world) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n))
    assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1


def test_runs_of_rows() -> None:
    assert runs([(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 4)]) == [
        (0, 0, 0, 2),
        (1, 0, 2, 2),
        (0, 2, 4, 1),
        (0, 4, 5, 1),
    ]


def chunk_ranks(out: Path) -> set[str]:
    """The ranks that wrote the chunk files of ``out`` (from their names, ``chunk-<time>-r0001-...``)."""
    return {p.name.split("-")[2] for p in chunk_dir(out).glob("chunk-*.h5")}


def test_env_detection_and_rank_reporter(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert not dist_env().active and dist_env().is_main
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = dist_env()
    assert env.active and not env.is_main and env.local_rank == 1
    inner = Reporter()
    rep = RankReporter(inner, 1)
    rep.info("progress")
    rep.warn("bad file")
    assert inner.messages == [] and inner.warnings == ["[rank 1] bad file"]


def test_virtual_cache_with_a_missing_chunk_is_refused(image_folder: Path, tmp_path: Path) -> None:
    a = reference(image_folder, tmp_path / "a.h5", chunk_rows=8)
    assert is_virtual(tmp_path / "a.h5") and a.n == 24
    a.close()
    first = sorted(chunk_dir(tmp_path / "a.h5").glob("chunk-*.h5"))[0]
    shutil.move(first, tmp_path / "gone.h5")
    with pytest.raises(CacheError, match=r"chunk file .*chunk-.*\.h5 is missing"):
        FeatureCache(tmp_path / "a.h5")


# ------------------------------------------------------------------------------------------ torchrun


def test_two_process_extract_equals_one_process(image_folder: Path, tmp_path: Path) -> None:
    ref = reference(image_folder, tmp_path / "one.h5")
    out = tmp_path / "two.h5"
    r = torchrun(2, "extract", "--data", image_folder, "--out", out, *FAST, "--batch-size", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert is_virtual(out)
    assert chunk_ranks(out) == {"r0000", "r0001"}  # both ranks computed, into one chunk folder
    assert_same_cache(ref, FeatureCache(out))
    assert FeatureCache(out).keys == ref.keys
    assert FeatureCache(out).attrs["root"] == str(image_folder.resolve())  # rank 0's index records it too


@pytest.mark.slow
def test_killed_shard_resumes_and_merge(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4, seed=3)  # 12 images, 6 per rank, 3 chunks each
    ref = reference(data, tmp_path / "one.h5")
    out = tmp_path / "two.h5"
    log = tmp_path / "parts.log"
    args = ["extract", "--data", data, "--out", out, *FAST, *SMALL]
    r = torchrun(2, *args, env={"RT_TEST_KILL_RANK": "1", "RT_TEST_KILL_AT_PART": "2", "RT_TEST_PART_LOG": str(log)})
    assert r.returncode != 0 and not out.exists()
    logged = [line.split() for line in log.read_text().splitlines()]
    assert (
        sum(int(b) for a, b in logged if a == "1") == 2
    )  # rank 1 committed one chunk, then died committing its second
    done = sum(int(b) for _, b in logged)
    log.unlink()
    r = torchrun(2, *args, "--merge", env={"RT_TEST_PART_LOG": str(log)})
    assert r.returncode == 0, r.stdout + r.stderr
    redone = sum(int(b) for _, b in (line.split() for line in log.read_text().splitlines()))
    assert redone == 12 - done  # only the missing rows were computed again
    assert not is_virtual(out) and not chunk_dir(out).exists()
    assert_same_cache(ref, FeatureCache(out))


@pytest.mark.slow
def test_incremental_sharded_extract_keeps_single_process_order(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3, seed=5)
    args = ["--data", data, *FAST, "--cut", "layer3"]
    out = tmp_path / "two.h5"
    r = torchrun(2, "extract", "--out", out, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.copy(out, tmp_path / "keep.h5")  # a virtual file: reads through the same shards
    single = tmp_path / "one.h5"
    reference(data, single, cut=["layer3"])
    make_image_folder(data, per_class=2, seed=6, classes=("circle", "zebra"))  # new rows and a new class
    reference(data, single, cut=["layer3"])  # one process appends them after the old rows
    r = torchrun(2, "extract", "--out", out, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert is_virtual(out)
    two = FeatureCache(out)
    assert_same_cache(FeatureCache(single), two)
    assert two.classes[-1] == "zebra" and two.n == 13
    np.testing.assert_array_equal(FeatureCache(tmp_path / "keep.h5").features(), two.features(range(9)))
    r = torchrun(2, "extract", "--out", out, *args)
    assert r.returncode == 0 and "nothing to compute" in r.stderr + r.stdout


# ------------------------------------------------------------------------------------------- finetune


def test_batch_sampler_slices_the_single_process_batches() -> None:
    import torch
    from torch.utils.data import BatchSampler, RandomSampler

    from resnet_transfer.base import DistributedBatchSampler

    data = list(range(11))
    for drop_last in (True, False):
        g1 = torch.Generator().manual_seed(3)
        single = list(BatchSampler(RandomSampler(data, generator=g1), 4, drop_last))
        parts = []
        for rank in range(2):
            g = torch.Generator().manual_seed(3)
            parts.append(list(DistributedBatchSampler(RandomSampler(data, generator=g), 4, drop_last, rank, 2)))
            assert torch.equal(g.get_state(), g1.get_state())  # the same random draws: resumable at any size
        assert [a + b for a, b in zip(*parts)] == single


def test_sync_bn_is_refused_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from resnet_transfer.base import UsageError, convert_sync_batchnorm

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="needs CUDA"):
        convert_sync_batchnorm(None, None, torch.device("cpu"))


def run_single(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "RT_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **env}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        full_env.pop(k, None)
    cmd = [sys.executable, str(WORKER), *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def assert_same_run(a: Path, b: Path, tol: float = 1e-5) -> None:
    import json

    from safetensors.numpy import load_file

    ha = json.loads((a / "report.json").read_text())["history"]
    hb = json.loads((b / "report.json").read_text())["history"]
    assert len(ha) == len(hb)
    for ra, rb in zip(ha, hb):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert ra[key] == pytest.approx(rb[key], abs=tol), (key, ra["epoch"])
        assert ra["lr"] == pytest.approx(rb["lr"]) and ra["trainable"] == rb["trainable"]
    for name in ("head.safetensors", "backbone.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            np.testing.assert_allclose(wa[k], wb[k], rtol=tol, atol=tol, err_msg=f"{name}:{k}")


@pytest.mark.slow
def test_two_process_finetune_equals_one_process_and_resumes_with_one(image_folder: Path, tmp_path: Path) -> None:
    """Cached layer3 maps (no augmentation), layer4 unfrozen at epoch 1 (so DDP is rebuilt), global batch 4.
    BatchNorm is kept in eval mode in both runs: per-rank batch statistics are the one legitimate
    difference on CPUs (no SyncBatchNorm there); everything else must agree."""
    cache = tmp_path / "l3.h5"
    reference(image_folder, cache, cut=["layer3"]).close()
    args = ["finetune", "--cache", cache, "--unfreeze", "layer4", "--schedule", "progressive", "--unfreeze-at", "1"]
    args += ["--epochs", "3", "--batch-size", "4", "--precision", "fp32", "--patience", "0", "--seed", "1"]
    env = {"RT_TEST_BN_EVAL": "1", "OMP_NUM_THREADS": "1"}
    r = run_single(*args, "--out", tmp_path / "one", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    r = torchrun(2, *args, "--out", tmp_path / "two", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")
    # killed after epoch 1 with 2 processes, resumed with 1: the same run
    r = torchrun(2, *args, "--out", tmp_path / "cut", env={**env, "RT_TEST_KILL_AFTER_EPOCH": "1"})
    assert r.returncode != 0 and not (tmp_path / "cut" / "meta.json").exists()
    r = run_single("finetune", "--resume", tmp_path / "cut", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_run(tmp_path / "one", tmp_path / "cut")
