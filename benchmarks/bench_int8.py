"""int8 first look: torchao PT2E (``X86InductorQuantizer``, calibrated on crops of real photographs) +
``torch.compile`` vs the compiled and the eager bf16 forward, forward-only, interleaved in one process.

Reports img/s per round (raw samples and medians), the time to quantise and compile, and the feature cosine
of each path against fp32 eager on held-out real-photo crops. Needs ``pip install torchao`` (0.18 works
with torch 2.14.1; torch 2.14 no longer ships PT2E under ``torch.ao``). A first look, not an option of
`rt` yet: see docs/performance.md for the decision.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from benchmarks.common import _shipped_photos, command_line, emit, fmt, isa_summary, machine_info, median, ratio

NAME = "int8"


def _photo_batch(n: int, size: int, seed: int) -> Any:
    """``n`` normalised crops (size x size) of the shipped photographs, at random places and scales."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _shipped_photos()
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        s = int(min(h, w) * rng.uniform(0.3, 1.0))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        img = Image.fromarray(p[y : y + s, x : x + s]).resize((size, size), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def _quantize(net: Any, calib: Any, batch: int) -> Any:
    import torch
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = torch.export.export(net, (calib[:batch],)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    for lo in range(0, len(calib), batch):
        prepared(calib[lo : lo + batch])
    return convert_pt2e(prepared)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks int8", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--weights", default="none", help="none | a checkpoint path (real weights quantise differently)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--calib", type=int, default=128, help="real-photo crops to calibrate on")
    p.add_argument("--no-int8", action="store_true", help="only compiled vs eager bf16 (no torchao needed)")
    args = p.parse_args(argv)
    try:
        if not args.no_int8:
            import torchao  # noqa: F401
    except ImportError:
        print("torchao is not installed (pip install torchao); running with --no-int8", file=sys.stderr)
        args.no_int8 = True

    import torch

    from resnet_transfer.backbones import build_backbone
    from resnet_transfer.compiled import compiled_forward
    from resnet_transfer.runtime import tune_process

    tune_process()
    cpu = torch.device("cpu")
    bb = build_backbone(args.model, args.weights, args.image_size)
    net = bb.net.eval().to(memory_format=torch.channels_last)
    calib = _photo_batch(args.calib, args.image_size, seed=0)
    test = _photo_batch(args.batch, args.image_size, seed=1)
    setup: dict[str, float] = {}
    with torch.inference_mode():
        ref = net(test).float()
        eager = compiled_forward(net, cpu, "bf16", "off")
        comp = compiled_forward(net, cpu, "bf16", "on", 10**6, bb.identity.to_json())
        t = time.perf_counter()
        comp(test)
        setup["compiled_bf16_compile_s"] = time.perf_counter() - t
    paths: dict[str, Any] = {"eager_bf16": eager, "compiled_bf16": comp}
    if not args.no_int8:
        t = time.perf_counter()
        with torch.no_grad():
            qnet = _quantize(net, calib, args.batch)
        setup["int8_quantise_s"] = time.perf_counter() - t
    import torch._inductor.config as ic

    with torch.no_grad(), ic.patch(freezing=True):
        if not args.no_int8:
            paths["int8_compiled"] = torch.compile(qnet)
            t = time.perf_counter()
            paths["int8_compiled"](test)
            setup["int8_compile_s"] = time.perf_counter() - t
        cosine = {}
        for name, fn in paths.items():
            c = torch.nn.functional.cosine_similarity(fn(test).float(), ref, dim=1)
            cosine[name] = {"min": float(c.min()), "median": float(c.median())}
        samples: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                t = time.perf_counter()
                fn(test)
                fn(test)
                samples[name].append(2 * args.batch / (time.perf_counter() - t))
    med = {k: median(v) for k, v in samples.items()}
    result = {
        "bench": NAME,
        "figures": {
            "img_s_median": med,
            "compiled_vs_eager_bf16": ratio(med["compiled_bf16"], med["eager_bf16"]),
            "int8_vs_compiled_bf16": ratio(med.get("int8_compiled", float("nan")), med["compiled_bf16"]),
            "int8_vs_eager_bf16": ratio(med.get("int8_compiled", float("nan")), med["eager_bf16"]),
            "cosine_vs_fp32": cosine,
            "setup_s": setup,
        },
        "raw": {"img_s_samples": samples},
        "config": vars(args),
        "machine": {**machine_info("cpu"), "isa": isa_summary()},
        "command": command_line(NAME, argv),
    }
    lines = [f"{args.model} ({args.weights}) @{args.image_size}, batch {args.batch}, {args.rounds} rounds, img/s:"]
    for k in paths:
        lines.append(
            f"  {k:14s} median {fmt(med[k])} (samples {' '.join(fmt(v) for v in samples[k])}); "
            f"cosine vs fp32 min {cosine[k]['min']:.5f}"
        )
    lines.append(
        f"  compiled / eager bf16 {fmt(result['figures']['compiled_vs_eager_bf16'], 2)}x, int8 / compiled bf16 {fmt(result['figures']['int8_vs_compiled_bf16'], 2)}x, int8 / eager bf16 "
        f"{fmt(result['figures']['int8_vs_eager_bf16'], 2)}x; setup s: "
        + ", ".join(f"{k} {fmt(v)}" for k, v in setup.items())
    )
    return emit(result, lines)


if __name__ == "__main__":
    main()
