"""The GPU run, prepared for the first lent CUDA device: one script, its own photos and features, one JSON line.

    python -m benchmarks gpu --minutes 5

Each part checks the time left (``--minutes``, the whole run's budget) and is skipped, with the reason in the
JSON, when it would not fit:

1. ResNet-50 forward only (random tensors already on the device, channels_last, ``--precision`` autocast,
   batch ``--batch``): eager and ``torch.compile``'d img/s (the compile's seconds apart).
2. `rt extract` of ``--images`` generated 500x375 JPEGs as a whole process (spawn to exit, ``--device cuda
   --compile auto``), once with the CPU decode threads (``RT_GPU_DECODE=0``) and once with the JPEGs decoded
   on the GPU (images/gpu_decode.py): img/s each.
3. `rt fit-head` on ``--rows`` cached rows (synthetic float16 features written through the cache writer,
   tests/planted.py): seconds, whole process.
4. The finetune train step of ResNet-50 with layer4 (and the head) trainable, batch ``--batch`` / 2 at 224 px,
   autocast, fused AdamW: eager and compiled img/s.

Without a CUDA device it says so and exits with code 2 (nothing is measured): the CPU figures have their
own benchmarks (``extract``, ``train_step``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, command_line, emit, fmt, machine_info, make_photo_jpegs, median

NAME = "gpu"
NO_CUDA = "no CUDA device is visible here: `python -m benchmarks gpu` measures the GPU path only"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="time budget of the whole run")
    ap.add_argument("--images", type=int, default=4000, help="photos for the rt extract part")
    ap.add_argument("--rows", type=int, default=100_000, help="cached rows for the fit-head part")
    ap.add_argument("--batch", type=int, default=256, help="forward batch (the train step uses half)")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "bf16"))
    ap.add_argument("--rounds", type=int, default=20, help="timed batches per forward / train arm")
    return ap.parse_args(argv)


class Budget:
    def __init__(self, minutes: float) -> None:
        self.end = time.monotonic() + 60.0 * minutes

    def left(self) -> float:
        return self.end - time.monotonic()


def _timed(fn: Any, rounds: int, images: int) -> list[float]:
    import torch

    out = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(images / (time.perf_counter() - t))
    return out


def forward_part(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from resnet_transfer.backbone import build_backbone

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    net = build_backbone("resnet50", "none").net.cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)

    def run(fn: Any) -> Any:
        def go() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                fn(x)

        return go

    eager = run(net)
    eager()
    compiled = run(torch.compile(net))
    t = time.perf_counter()
    compiled()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t
    samples: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(2):  # interleaved halves
        samples["eager"] += _timed(eager, args.rounds // 2, args.batch)
        samples["compiled"] += _timed(compiled, args.rounds // 2, args.batch)
    return {"img_s": {k: median(v) for k, v in samples.items()}, "samples": samples, "compile_s": compile_s}


def extract_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from benchmarks.pipeline_bound import process_argv, run_process

    photos = make_photo_jpegs(work / "photos", args.images)
    argv = [*process_argv(str(photos), str(work / "f.h5"), "resnet50", None, "auto"), "--device", "cuda"]
    argv += ["--batch-size", str(args.batch)]
    env = {"RT_SPEED_RECORDS": str(work / "records.json")}
    out: dict[str, Any] = {}
    for name, flag in (("cpu-decode", "0"), ("gpu-decode", "1"), ("cpu-decode-again", "0"), ("gpu-decode-again", "1")):
        wall, said = run_process(argv, {**env, "RT_GPU_DECODE": flag})
        out[name] = {"wall_s": wall, "img_s": args.images / wall, "compile_auto": said}
    return out


def fit_head_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import os
    import subprocess

    sys.path.insert(0, str(REPO / "tests"))
    from planted import write_planted

    sets = write_planted(work / "rows", args.rows, 4000, 0)
    full = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "resnet_transfer", "fit-head", "--cache", str(sets.train), "--out", str(work / "head")]
    t = time.perf_counter()
    proc = subprocess.run([*cmd, "--overwrite"], env=full, capture_output=True, text=True)
    return {"seconds": time.perf_counter() - t, "rc": proc.returncode, "stderr_tail": proc.stderr[-400:]}


def train_part(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from resnet_transfer.backbone import build_backbone
    from resnet_transfer.finetuning import FreezePolicy
    from resnet_transfer.finetuning.start import adamw
    from resnet_transfer.head import HeadModule
    from resnet_transfer.models import Classifier

    dev, batch = torch.device("cuda"), max(1, args.batch // 2)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    bb = build_backbone("resnet50", "none", 224)
    head = HeadModule(bb.num_features, 100)
    policy = FreezePolicy(bb.stage_groups(), head, "layer4", lr_mult=1.0)
    policy.apply(0)
    policy.train_mode(0)
    model = Classifier(bb.net.to(dev).to(memory_format=torch.channels_last), head.to(dev))
    x = torch.randn(batch, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), device=dev)
    opt = adamw(policy.param_groups(0.01), 1e-4, dev)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def make(fn: Any) -> Any:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype):
                loss = torch.nn.functional.cross_entropy(fn(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        return step

    eager, compiled = make(model), make(torch.compile(model))
    eager()
    t = time.perf_counter()
    compiled()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t
    samples = {"eager": _timed(eager, args.rounds, batch), "compiled": _timed(compiled, args.rounds, batch)}
    return {"img_s": {k: median(v) for k, v in samples.items()}, "samples": samples, "compile_s": compile_s}


PARTS = (("forward", 60.0), ("extract", 120.0), ("fit_head", 60.0), ("finetune_layer4", 60.0))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"benchmarks gpu: {NO_CUDA}", file=sys.stderr)
        raise SystemExit(2)
    from resnet_transfer.base import tune_process

    tune_process()
    budget = Budget(args.minutes)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rt-bench-gpu-") as tmp:
        work = Path(tmp)
        runs = {
            "forward": lambda: forward_part(args),
            "extract": lambda: extract_part(args, work),
            "fit_head": lambda: fit_head_part(args, work),
            "finetune_layer4": lambda: train_part(args),
        }
        for name, need_s in PARTS:
            if budget.left() < need_s:
                figures[name] = {"skipped": f"{budget.left():.0f} s of the --minutes budget left, needs ~{need_s:.0f}"}
                continue
            try:
                figures[name] = runs[name]()
            except Exception as exc:  # one part failing leaves the others' figures
                figures[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    summary = [f"device: {torch.cuda.get_device_name(0)}"]
    for name, f in figures.items():
        if "img_s" in f and isinstance(f["img_s"], dict):
            summary.append(f"{name}: " + ", ".join(f"{k} {fmt(v)} img/s" for k, v in f["img_s"].items()))
        elif name == "extract" and "cpu-decode" in f:
            summary.append("rt extract: " + ", ".join(f"{k} {fmt(v['img_s'])} img/s" for k, v in f.items()))
        else:
            summary.append(f"{name}: {f}")
    result = {
        "bench": NAME,
        "figures": figures,
        "machine": {**machine_info("cuda"), "gpu": torch.cuda.get_device_name(0)},
        "command": command_line(NAME, argv),
    }
    return emit(result, summary)


if __name__ == "__main__":
    main()
