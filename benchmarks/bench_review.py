"""`rt review` at scale: a 20,000-row cache served by the real command, paged through by an HTTP client.

Builds a cache of ``--rows`` rows (``--dim`` float16 features, written through the project's CacheWriter) with
one small JPEG per row and a linear head of ``--classes`` classes, starts ``rt review --cache --head --root``
in its own process and measures, from another process (httpx, a browser's six connections for images):

- start-up: from launching the command to its printed URL (reads the cache, the head's verdicts on every
  row, the neighbour index);
- first page: the page, ``/api/info`` and the first ``/api/rows`` (what the grid needs before it draws),
  cold; then that page's thumbnails, made on demand (cold) and from disk (warm);
- paging: every page of the cache in turn (``/api/rows``, and the side panel ``/api/row/N`` of its first row:
  probabilities and 8 neighbours by blockwise cosine over all rows), latency per request;
- memory: the server's resident set (``VmRSS``) after start-up, after the first page, after paging every row
  (and, unless ``--no-thumbs``, after every row's thumbnail was made and served), and its peak (``VmHWM``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, command_line, emit, fmt, machine_info, summarize

PAGE = 120


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks review", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=2048, help="feature width (ResNet-50's 2048)")
    p.add_argument("--classes", type=int, default=37)
    p.add_argument("--quick", action="store_true", help="2,000 rows, no full thumbnail pass: a smoke test")
    p.add_argument("--no-thumbs", action="store_true", help="skip making every row's thumbnail")
    p.add_argument("--workdir", type=Path, default=None)
    return p.parse_args(argv)


def build(work: Path, rows: int, dim: int, classes: int) -> tuple[Path, Path, Path]:
    """The images (96x72 JPEGs), the cache and a head; reused when already in ``work``."""
    from PIL import Image, ImageDraw

    from resnet_transfer.backbone import BackboneIdentity
    from resnet_transfer.cache import CacheWriter
    from resnet_transfer.images import TransformConfig

    root, cache, head = work / "images", work / "train.h5", work / "head"
    names = [f"class{c:02d}" for c in range(classes)]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, rows)
    paths = [f"{names[y]}/{i:06d}.jpg" for i, y in enumerate(labels)]
    if not cache.exists():
        for i, p in enumerate(paths):
            f = root / p
            f.parent.mkdir(parents=True, exist_ok=True)
            img = Image.new("RGB", (96, 72), tuple(int(v) for v in rng.integers(0, 255, 3)))
            ImageDraw.Draw(img).ellipse([i % 40, i % 30, 40 + i % 50, 30 + i % 40], fill=(255, 255, 255))
            img.save(f, quality=85)
        centres = rng.normal(size=(classes, dim)).astype(np.float32)
        X = np.maximum(centres[labels] + 0.8 * rng.normal(size=(rows, dim)).astype(np.float32), 0)
        ident = BackboneIdentity("timm:resnet50", "resnet50", "none", "random:seed=0", TransformConfig(224, 256), dim)
        keys = [f"{i:032x}" for i in range(rows)]
        with CacheWriter(cache, ident, names, dtype="float16") as w:
            for lo in range(0, rows, 4096):
                hi = min(rows, lo + 4096)
                w.write_part(paths[lo:hi], [int(v) for v in labels[lo:hi]], X[lo:hi], keys=keys[lo:hi])
            w.finalize()
        _write_head(head, ident, names, centres)
    return root, cache, head


def _write_head(out: Path, ident: Any, names: list[str], centres: np.ndarray) -> None:
    import torch

    from resnet_transfer.head import HEAD_FILE, HeadModule, write_model_dir

    k, d = centres.shape
    module = HeadModule(d, k)
    with torch.no_grad():
        module.net.weight.copy_(torch.as_tensor(centres / np.linalg.norm(centres, axis=1, keepdims=True) * 4))
        module.net.bias.zero_()
    write_model_dir(out, "head", ident, names, dict(module.config), {HEAD_FILE: module.state_dict()})


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _timed(client: Any, url: str) -> float:
    t = time.perf_counter()
    r = client.get(url)
    r.raise_for_status()
    return time.perf_counter() - t


def _thumbs(client: Any, rows: list[dict[str, Any]]) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(6) as pool:  # a browser's six connections per host
        for r in pool.map(lambda row: client.get(row["thumb"]), rows):
            r.raise_for_status()
    return time.perf_counter() - t


def measure(root: Path, cache: Path, head: Path, thumbs_dir: Path, all_thumbs: bool) -> dict[str, Any]:
    import httpx

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "resnet_transfer", "review", "--cache", str(cache), "--head", str(head)]
    cmd += ["--root", str(root), "--thumbs", str(thumbs_dir), "--manifest", str(root.parent / "review.csv")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        url = proc.stdout.readline().strip() if proc.stdout else ""
        start = time.perf_counter() - t0
        if not url.startswith("http"):
            raise RuntimeError(f"rt review printed {url!r}")
        base = url.split("/?", 1)[0]
        out: dict[str, Any] = {"startup_s": start, "rss_mb": {"started": rss_mb(proc.pid)}}
        limits = httpx.Limits(max_connections=6)
        with httpx.Client(base_url=base, follow_redirects=True, timeout=60, limits=limits) as client:
            t = time.perf_counter()
            client.get(url).raise_for_status()  # the page itself (the token becomes a cookie)
            client.get("/api/info").raise_for_status()
            first = client.get("/api/rows", params={"offset": 0, "limit": PAGE})
            first.raise_for_status()
            out["first_page_s"] = time.perf_counter() - t
            rows = first.json()["rows"]
            out["first_page_thumbs_cold_s"] = _thumbs(client, rows)
            out["first_page_thumbs_warm_s"] = _thumbs(client, rows)
            out["wrong_by_loss_first_page_s"] = _timed(client, f"/api/rows?verdict=wrong&sort=loss&limit={PAGE}")
            out["rss_mb"]["first_page"] = rss_mb(proc.pid)
            total = first.json()["total"]
            pages, details = [], []
            for offset in range(0, total, PAGE):
                pages.append(_timed(client, f"/api/rows?offset={offset}&limit={PAGE}"))
                details.append(_timed(client, f"/api/row/{offset}"))
            out["page_s"], out["detail_s"] = summarize(pages), summarize(details)
            out["pages"] = len(pages)
            out["rss_mb"]["all_rows_paged"] = rss_mb(proc.pid)
            if all_thumbs:
                t = time.perf_counter()
                for offset in range(PAGE, total, PAGE):
                    page_rows = client.get(f"/api/rows?offset={offset}&limit={PAGE}").json()["rows"]
                    _thumbs(client, page_rows)
                out["all_thumbs_s"] = time.perf_counter() - t
                out["rss_mb"]["all_thumbs"] = rss_mb(proc.pid)
            out["rss_mb"]["peak"] = rss_mb(proc.pid, "VmHWM")
            out["rows"] = total
    finally:
        proc.terminate()
        proc.wait(20)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    rows = 2000 if args.quick and args.rows == 20_000 else args.rows
    all_thumbs = not (args.no_thumbs or args.quick)
    with tempfile.TemporaryDirectory(prefix="rt-bench-review-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        root, cache, head = build(work, rows, args.dim, args.classes)
        build_s = time.perf_counter() - t
        thumbs_dir = work / "thumbs"
        if thumbs_dir.exists():
            import shutil

            shutil.rmtree(thumbs_dir)  # cold thumbnails each run
        (root.parent / "review.csv.journal").unlink(missing_ok=True)
        figures = measure(root, cache, head, thumbs_dir, all_thumbs)
    rss = figures["rss_mb"]
    result = {
        "bench": "review",
        "figures": {**figures, "build_s": build_s},
        "config": {"rows": rows, "dim": args.dim, "classes": args.classes, "page": PAGE, "images": "96x72 JPEG"},
        "machine": machine_info(),
        "command": command_line("review", argv),
    }
    lines = [
        f"{rows} rows x {args.dim} (float16), {args.classes} classes, pages of {PAGE}",
        f"start-up (launch -> URL printed): {fmt(figures['startup_s'], 2)} s",
        f"first page (page + info + rows): {fmt(1000 * figures['first_page_s'])} ms; its {PAGE} thumbnails "
        f"cold {fmt(1000 * figures['first_page_thumbs_cold_s'])} ms, warm {fmt(1000 * figures['first_page_thumbs_warm_s'])} ms",
        f"wrong, by loss, first page: {fmt(1000 * figures['wrong_by_loss_first_page_s'])} ms",
        f"paging {figures['pages']} pages: /api/rows median {fmt(1000 * figures['page_s']['median'])} ms "
        f"(max {fmt(1000 * figures['page_s']['max'])}); side panel median {fmt(1000 * figures['detail_s']['median'])} ms "
        f"(max {fmt(1000 * figures['detail_s']['max'])})",
        "server RSS MB: " + ", ".join(f"{k} {fmt(v)}" for k, v in rss.items()),
    ]
    if "all_thumbs_s" in figures:
        lines.append(f"every row's thumbnail made and served: {fmt(figures['all_thumbs_s'])} s")
    return emit(result, lines)


if __name__ == "__main__":
    main()
