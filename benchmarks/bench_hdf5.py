"""HDF5 cache I/O: write and read MB/s of the feature cache, and whether minibatch reads can starve head
training.

- **cache write**: the real writer path, ``CacheWriter.write_part`` (one fsync'ed HDF5 chunk file per 256
  rows, as `rt extract` commits them) then ``finalize`` (the index over them), for float16 and float32.
  MB/s counts the feature bytes stored.
- **layout context**: plain h5py writes of the same array with the cache's chunking and compression none,
  lzf and gzip-1, their file sizes, and random-minibatch read times (why the cache is uncompressed).
- **reads**: ``FeatureCache.features()`` (everything), ``iter_chunks`` (whole-chunk streaming, what
  ``fit_chunks`` uses) and random 256-row minibatches via ``FeatureCache.features(rows)``, against one
  head-training step (linear head, 256 rows, forward + backward + AdamW step). The share is
  read / (read + step). Reads come from the OS page cache (the file was just written): that is the
  common case for a cache that fits in RAM; a cold disk read is slower and is not measured here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import command_line, emit, fmt, machine_info, median, ratio


def _identity(dim: int) -> Any:
    from resnet_transfer.backbone import BackboneIdentity
    from resnet_transfer.images import TransformConfig

    return BackboneIdentity("resnet50", "resnet50", "none", "random:seed=0", TransformConfig(), dim)


def _write_cache(path: Path, X: np.ndarray, y: np.ndarray, dtype: str) -> float:
    from resnet_transfer.cache import CacheWriter

    classes = [f"c{i}" for i in range(int(y.max()) + 1)]
    t = time.perf_counter()
    with CacheWriter(path, _identity(X.shape[1]), classes, dtype=dtype, overwrite=True) as w:
        for lo in range(0, len(X), 256):
            hi = min(len(X), lo + 256)
            w.write_part([f"img_{i:07d}.jpg" for i in range(lo, hi)], y[lo:hi].tolist(), X[lo:hi])
        w.finalize()
    return time.perf_counter() - t


def _head_step_seconds(dim: int, classes: int, batch: int, repeats: int) -> list[float]:
    import torch

    from resnet_transfer.head import HeadModule

    torch.manual_seed(0)
    head = HeadModule(dim, classes)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    xb = torch.randn(batch, dim)
    yb = torch.randint(0, classes, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(head(xb), yb)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks hdf5", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run (4,096 rows, 1 repeat): a smoke test")
    p.add_argument("--full", action="store_true", help="100,000 rows (about 0.4 GB as float16)")
    p.add_argument("--rows", type=int, default=None, help="rows (default 20,000)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--classes", type=int, default=37)
    p.add_argument("--batch", type=int, default=256, help="minibatch rows")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (write) / 20 (minibatch reads)")
    p.add_argument("--workdir", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import h5py

    from resnet_transfer.cache import FEATURE_CHUNK_ROWS, FeatureCache

    args = parse(argv)
    n = args.rows or (4096 if args.quick else 100_000 if args.full else 20_000)
    repeats = args.repeats or (1 if args.quick else 3)
    mb_repeats = 5 if args.quick else 20
    rng = np.random.default_rng(0)
    # post-ReLU-like features: non-negative, many zeros, so compression figures are realistic
    X = np.maximum(rng.normal(0.0, 1.0, size=(n, args.dim)).astype(np.float32), 0.0)
    y = rng.integers(0, args.classes, size=n)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rt-bench-hdf5-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for dtype in ("float16", "float32"):
            mb = n * args.dim * np.dtype(dtype).itemsize / 1e6
            path = work / f"cache-{dtype}.h5"
            w_s = [_write_cache(path, X, y, dtype) for _ in range(repeats)]
            with FeatureCache(path) as c:
                r_all = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    c.features()
                    r_all.append(time.perf_counter() - t)
                r_chunks = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    for _xb, _yb in c.iter_chunks(shuffle=True):
                        pass
                    r_chunks.append(time.perf_counter() - t)
                r_mb = []
                for _ in range(mb_repeats):
                    rows = rng.choice(n, size=args.batch, replace=False)
                    t = time.perf_counter()
                    c.features(rows)
                    r_mb.append(time.perf_counter() - t)
            figures[f"cache_{dtype}"] = {
                "feature_mb": round(mb, 1),
                "file_mb": round(path.stat().st_size / 1e6, 1),
                "write_mb_s": mb / median(w_s),
                "read_all_mb_s": mb / median(r_all),
                "read_chunks_mb_s": mb / median(r_chunks),
                "random_minibatch_ms": 1e3 * median(r_mb),
                "chunk_stream_per_minibatch_ms": 1e3 * median(r_chunks) * args.batch / n,
                "samples_s": {"write": w_s, "read_all": r_all, "read_chunks": r_chunks, "minibatch": r_mb},
            }
            path.unlink(missing_ok=True)
        # layout context: the same float16 array with the cache's chunking, three compressions
        X16 = X.astype(np.float16)
        chunks = (min(FEATURE_CHUNK_ROWS, n), args.dim)
        layouts: dict[str, dict[str, Any]] = {
            "none": {},
            "lzf": {"compression": "lzf"},
            "gzip1": {"compression": "gzip", "compression_opts": 1},
        }
        for comp, kw in layouts.items():
            path = work / f"layout-{comp}.h5"
            w_s = []
            for _ in range(repeats):
                t = time.perf_counter()
                with h5py.File(path, "w") as f:
                    f.create_dataset("features", data=X16, chunks=chunks, **kw)
                w_s.append(time.perf_counter() - t)
            r_mb = []
            with h5py.File(path, "r") as f:
                ds = f["features"]
                for _ in range(max(3, mb_repeats // 4)):
                    rows = np.sort(rng.choice(n, size=args.batch, replace=False))
                    t = time.perf_counter()
                    ds[rows]
                    r_mb.append(time.perf_counter() - t)
            figures[f"layout_f16_{comp}"] = {
                "file_mb": round(path.stat().st_size / 1e6, 1),
                "write_mb_s": X16.nbytes / 1e6 / median(w_s),
                "random_minibatch_ms": 1e3 * median(r_mb),
            }
            path.unlink(missing_ok=True)
    step = _head_step_seconds(args.dim, args.classes, args.batch, mb_repeats * 2)
    step_ms = 1e3 * median(step)
    figures["head_step_ms"] = step_ms
    for dtype in ("float16", "float32"):
        f = figures[f"cache_{dtype}"]
        f["random_read_share"] = ratio(f["random_minibatch_ms"], f["random_minibatch_ms"] + step_ms)
        f["chunk_read_share"] = ratio(f["chunk_stream_per_minibatch_ms"], f["chunk_stream_per_minibatch_ms"] + step_ms)
    result = {
        "bench": "hdf5",
        "figures": figures,
        "config": {"rows": n, "dim": args.dim, "batch": args.batch, "repeats": repeats, "chunk_rows": chunks[0]},
        "machine": machine_info(),
        "command": command_line("hdf5", argv),
    }
    lines = [f"{n} x {args.dim} features, {chunks[0]}-row chunks, medians of {repeats} (reads of {mb_repeats}):"]
    for dtype in ("float16", "float32"):
        f = figures[f"cache_{dtype}"]
        lines.append(
            f"cache {dtype}: {f['file_mb']} MB; write {fmt(f['write_mb_s'])} MB/s (parts + finalize), "
            f"read all {fmt(f['read_all_mb_s'])} MB/s, chunk stream {fmt(f['read_chunks_mb_s'])} MB/s"
        )
        lines.append(
            f"  random {args.batch}-row minibatch {fmt(f['random_minibatch_ms'], 2)} ms vs head step "
            f"{fmt(step_ms, 2)} ms: read share {fmt(100 * f['random_read_share'])}% "
            f"(chunk streaming: {fmt(100 * f['chunk_read_share'])}%)"
        )
    for comp in ("none", "lzf", "gzip1"):
        f = figures[f"layout_f16_{comp}"]
        lines.append(
            f"layout f16 {comp}: {f['file_mb']} MB, write {fmt(f['write_mb_s'])} MB/s, "
            f"random minibatch {fmt(f['random_minibatch_ms'], 2)} ms"
        )
    return emit(result, lines)


if __name__ == "__main__":
    main()
