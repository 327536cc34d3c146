"""Peak memory of extraction as the dataset grows: 1k vs 10k small images must stay flat (<= +10%).

Each run is a fresh process that applies ``tune_process()`` (as `rt` does) and calls ``extract()``; its
peak resident set size is the kernel's own high-water mark for that process (``ru_maxrss`` from
``wait4``). Sized to finish in a few minutes on 2 cores: resnet18 at ``--image-size 64`` on 96x72 JPEGs
(the per-image buffers are small, so any per-image growth - lists, leaked tensors - shows up clearly).
With the default workers (0 on a 2-core CPU) all decoding happens in the measured process.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, emit, fmt, machine_info, make_photo_jpegs, median, ratio, run_child

CHILD = """
from resnet_transfer.base import tune_process
tune_process()
import time, torch
torch.set_num_threads(ARGS["threads"])
from resnet_transfer.cache import ExtractConfig, extract
t = time.perf_counter()
r = extract(ExtractConfig(data=ARGS["data"], out=ARGS["out"], model=ARGS["model"], weights="none",
                          image_size=ARGS["size"], overwrite=True, device=ARGS["device"]))
print(json.dumps({"rows": r.rows, "seconds": time.perf_counter() - t}))
"""


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100 vs 1,000 images, 1 run: a smoke test")
    p.add_argument("--full", action="store_true", help="1k vs 10k images at 224 px with resnet50")
    p.add_argument("--small", type=int, default=None, help="images in the small run (default 1,000)")
    p.add_argument("--large", type=int, default=None, help="images in the large run (default 10,000)")
    p.add_argument("--model", default=None, help="default resnet18 (resnet50 with --full)")
    p.add_argument("--image-size", type=int, default=None, help="default 64 (224 with --full)")
    p.add_argument("--repeats", type=int, default=None, help="runs per size (default 2)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import os

    args = parse(argv)
    small = args.small or (100 if args.quick else 1000)
    large = args.large or (1000 if args.quick else 10_000)
    model = args.model or ("resnet50" if args.full else "resnet18")
    size = args.image_size or (224 if args.full else 64)
    photo = (500, 375) if args.full else (96, 72)
    repeats = args.repeats or (1 if args.quick else 2)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    with tempfile.TemporaryDirectory(prefix="rt-bench-memory-") as tmp:
        work = Path(args.workdir or tmp)
        # one set of images; the small run uses a manifest of its first `small` files
        data = make_photo_jpegs(work / "photos", large, size=photo, seed=0, vary=False)
        files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpg"))
        manifests = {}
        for count in (small, large):
            m = data / f"first-{count}.csv"
            m.write_text("path,label\n" + "".join(f"{f},{f.split('/')[0]}\n" for f in files[:count]))
            manifests[count] = m
        rss: dict[int, list[float]] = {small: [], large: []}
        secs: dict[int, list[float]] = {small: [], large: []}
        for r in range(repeats):
            for count in (small, large):
                out = work / f"mem-{count}-{r}.h5"
                res = run_child(
                    CHILD,
                    {
                        "data": str(manifests[count]),
                        "out": str(out),
                        "model": model,
                        "size": size,
                        "threads": threads,
                        "device": args.device,
                    },
                )
                if res["rows"] != count:
                    raise RuntimeError(f"expected {count} rows, got {res['rows']}")
                rss[count].append(res["max_rss_mb"])
                secs[count].append(res["seconds"])
                out.unlink(missing_ok=True)
    m_small, m_large = median(rss[small]), median(rss[large])
    growth = ratio(m_large, m_small) - 1.0
    result = {
        "bench": "memory",
        "figures": {
            "peak_rss_mb_median": {str(small): m_small, str(large): m_large},
            "growth": growth,
            "target_growth_max": 0.10,
            "peak_rss_mb_samples": {str(k): v for k, v in rss.items()},
            "seconds_median": {str(k): median(v) for k, v in secs.items()},
        },
        "config": {
            "model": model,
            "image_size": size,
            "photo_size": f"{photo[0]}x{photo[1]}",
            "repeats": repeats,
            "threads": threads,
            "workers": "rt default",
        },
        "machine": {**machine_info(args.device), "threads": threads},
        "command": command_line("memory", argv),
    }
    lines = [
        f"{model} @ {size}px on {photo[0]}x{photo[1]} JPEGs, peak RSS (ru_maxrss of the extracting process), "
        f"median of {repeats}:",
        f"{small} images: {fmt(m_small)} MB ({fmt(median(secs[small]))} s); {large} images: {fmt(m_large)} MB "
        f"({fmt(median(secs[large]))} s)",
        f"growth {fmt(100 * growth)}% (target <= +10%)",
    ]
    return emit(result, lines)


if __name__ == "__main__":
    main()
