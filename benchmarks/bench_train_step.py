"""The finetune train step: fp32 vs bf16 autocast, eager vs ``torch.compile``, side by side in one process.

For each shape (model, image size, batch, what trains) the full train step (forward under autocast,
cross-entropy, backward, fused AdamW step) runs interleaved fp32 / bf16 (and, with ``--compile``, the
compiled step in both precisions, its compile time reported apart), ``--rounds`` timed steps each after a
warm-up. Medians and every sample are printed; this is what ``rt finetune --precision auto`` decides by
(resnet_transfer/precision_probe.py) and what docs/finetune.md quotes.

    python -m benchmarks train_step [--quick] [--compile] [--rounds 7]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks.common import command_line, emit, fmt, machine_info, median, ratio, summarize

SHAPES = {
    # name: (model, image size, batch, unfreeze)
    "r18-32-b64-all": ("resnet18", 32, 64, "all"),
    "r18-64-b32-all": ("resnet18", 64, 32, "all"),
    "r18-128-b32-layer4": ("resnet18", 128, 32, "layer4"),
    "r50-224-b16-layer4": ("resnet50", 224, 16, "layer4"),
}
QUICK = ("r18-32-b64-all", "r18-64-b32-all")


def _step_fn(model: Any, policy: Any, x: Any, y: Any, precision: str, compiled: bool) -> Any:
    import torch

    from resnet_transfer.base import autocast
    from resnet_transfer.finetuning.start import adamw

    groups = policy.param_groups(0.01)
    opt = adamw(groups, 1e-4, torch.device("cpu"))

    def fwd_bwd() -> Any:
        with autocast(torch.device("cpu"), precision):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        return loss

    fn = torch.compile(fwd_bwd) if compiled else fwd_bwd

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        fn()
        opt.step()

    return step


def _shape(name: str, rounds: int, do_compile: bool) -> dict[str, Any]:
    import torch

    from resnet_transfer.backbone import build_backbone
    from resnet_transfer.finetuning import FreezePolicy
    from resnet_transfer.head import HeadModule
    from resnet_transfer.models import Classifier

    model_name, size, batch, unfreeze = SHAPES[name]
    bb = build_backbone(model_name, "none", size)
    head = HeadModule(bb.num_features, 10)
    policy = FreezePolicy(bb.stage_groups(), head, unfreeze, lr_mult=1.0)
    policy.apply(0)
    policy.train_mode(0)
    bb.net.to(memory_format=torch.channels_last)
    model = Classifier(bb.net, head)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=g)
    arms = {p: _step_fn(model, policy, x, y, p, False) for p in ("fp32", "bf16")}
    compile_s: dict[str, float] = {}
    if do_compile:
        for p in ("fp32", "bf16"):
            fn = _step_fn(model, policy, x, y, p, True)
            t = time.perf_counter()
            fn()  # compiles (forward and backward graphs)
            compile_s[p] = time.perf_counter() - t
            arms[f"{p}+compile"] = fn
    for fn in arms.values():
        fn()  # warm-up
    ms: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(rounds):
        for a, fn in arms.items():
            t = time.perf_counter()
            fn()
            ms[a].append((time.perf_counter() - t) * 1000)
    med = {a: median(v) for a, v in ms.items()}
    return {
        "shape": {"model": model_name, "image_size": size, "batch": batch, "unfreeze": unfreeze},
        "median_ms": med,
        "bf16_over_fp32": ratio(med["bf16"], med["fp32"]),
        "compile_s": compile_s,
        "raw_ms": {a: summarize(v) for a, v in ms.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks train_step")
    ap.add_argument("--quick", action="store_true", help="the two ResNet-18 shapes only")
    ap.add_argument("--compile", action="store_true", help="also the torch.compile'd step (compile time shown)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of: {', '.join(SHAPES)}")
    args = ap.parse_args(argv)
    import torch

    from resnet_transfer.base import tune_process

    tune_process()
    names = args.shapes.split(",") if args.shapes else list(QUICK if args.quick else SHAPES)
    figures = {n: _shape(n, args.rounds, args.compile) for n in names}
    summary = []
    for n, f in figures.items():
        m = f["median_ms"]
        line = f"{n}: fp32 {fmt(m['fp32'])} ms, bf16 {fmt(m['bf16'])} ms (bf16/fp32 {fmt(f['bf16_over_fp32'], 2)})"
        for p in ("fp32", "bf16"):
            if f"{p}+compile" in m:
                line += f"; {p}+compile {fmt(m[p + '+compile'])} ms (compile {fmt(f['compile_s'][p])} s)"
        summary.append(line)
    result = {
        "bench": "train_step",
        "figures": figures,
        "machine": {**machine_info("cpu"), "threads": torch.get_num_threads()},
        "command": command_line("train_step", argv),
    }
    return emit(result, summary)


if __name__ == "__main__":
    main()
