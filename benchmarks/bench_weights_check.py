"""What checking a cached weights file costs: `backbone.weights_cache.check_weights_file` on torchvision-named
checkpoints (ResNet-18, ResNet-50: random-init weights of the real files' sizes) the first time (sha256 of
the file) and when remembered (a stat and a small JSON read), beside ``torch.load`` of the same file, which
every run that uses the file pays anyway. The file is in the OS page cache (it was just written): a cold
read from disk costs the disk's time once more, for the hash as for the load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, emit, fmt, machine_info, median, ratio, summarize


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks weights_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="ResNet-18 only, 2 repeats: a smoke test")
    p.add_argument("--repeats", type=int, default=None, help="default 5")
    p.add_argument("--archs", default=None, help="comma-separated torchvision ResNets (default resnet18,resnet50)")
    return p.parse_args(argv)


def _timed(fn: Any, repeats: int, before: Any = None) -> list[float]:
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _one(arch: str, work: Path, repeats: int) -> dict[str, Any]:
    import hashlib

    import torch
    import torchvision.models as tvm

    from resnet_transfer.backbone import check_weights_file, record_file

    torch.manual_seed(0)
    tmp = work / f"{arch}.incoming"
    torch.save(tvm.get_model(arch, weights=None).state_dict(), tmp)
    path = work / f"{arch}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(path)

    def forget() -> None:
        record_file().unlink(missing_ok=True)

    first = _timed(lambda: check_weights_file(path, arch, "-"), repeats, before=forget)
    remembered = _timed(lambda: check_weights_file(path, arch, "-"), repeats)
    assert check_weights_file(path, arch, "-") == "remembered"
    load = _timed(lambda: torch.load(path, map_location="cpu", weights_only=True), repeats)
    mb = path.stat().st_size / 1e6
    return {
        "file_mb": round(mb, 1),
        "first_s": summarize(first),
        "remembered_s": summarize(remembered),
        "torch_load_s": summarize(load),
        "first_over_load": ratio(median(first), median(load)),
        "remembered_over_load": ratio(median(remembered), median(load)),
        "hash_mb_per_s": ratio(mb, median(first)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    archs = (args.archs or ("resnet18" if args.quick else "resnet18,resnet50")).split(",")
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rt-bench-weights-") as tmp:
        saved = os.environ.get("RT_CACHE_DIR")
        os.environ["RT_CACHE_DIR"] = str(Path(tmp) / "record")
        try:
            for arch in archs:
                figures[arch] = _one(arch.strip(), Path(tmp), repeats)
        finally:
            if saved is None:
                os.environ.pop("RT_CACHE_DIR", None)
            else:
                os.environ["RT_CACHE_DIR"] = saved
    lines = [
        f"{a}: {f['file_mb']} MB; first check {fmt(f['first_s']['median'] * 1e3, 0)} ms "
        f"({fmt(f['hash_mb_per_s'], 0)} MB/s, {fmt(f['first_over_load'], 2)}x torch.load's "
        f"{fmt(f['torch_load_s']['median'] * 1e3, 0)} ms); remembered {fmt(f['remembered_s']['median'] * 1e3, 2)} ms"
        for a, f in figures.items()
    ]
    result = {
        "bench": "weights_check",
        "figures": figures,
        "machine": machine_info(),
        "command": command_line("weights_check", argv),
    }
    return emit(result, lines)


if __name__ == "__main__":
    main()
