"""int8: the forward `rt extract --precision int8` runs (resnet_transfer.backbone.quantized: torchao PT2E with the
``X86InductorQuantizer``, calibrated on fixed crops of the photos scikit-learn ships, compiled by inductor)
vs the compiled and the eager bf16 forward, forward-only, interleaved in one process.

Reports img/s per round (raw samples and medians), the time to quantise and compile, and the feature cosine
of each path against fp32 eager on held-out real-photo crops. With ``--probe-run RUN`` (a finished
``recipes/offline_digits`` run directory) it also extracts the recipe's target train/test sets with its
source model in bf16 and in int8 and compares linear-probe accuracy (`rt curve`, the same k-subsets and
seeds on both, paired differences with a 95% interval). Needs ``pip install 'resnet_transfer[int8]'``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, emit, fmt, isa_summary, machine_info, median, plain_frozen_compile, ratio

NAME = "int8"


def probe_check(run: Path, ks: str, seeds: int, work: Path) -> dict[str, Any]:
    """bf16 vs int8 features of the recipe's target sets (its source model), and the probe on each."""
    import numpy as np

    from resnet_transfer.cache import ExtractConfig, FeatureCache, extract
    from resnet_transfer.head import read_model_dir
    from resnet_transfer.tools import CurveConfig, curve, t_interval

    model = run / "models" / "source"
    ident = read_model_dir(model).identity  # the source model's own architecture and input size
    size = int(ident.transform.input_size)
    caches: dict[str, dict[str, Path]] = {}
    seconds: dict[str, float] = {}
    # int8: the default calibration (fixed photo crops), and --calibration on the target's training pool
    sides = {"bf16": ("bf16", None), "int8": ("int8", None), "int8-own": ("int8", run / "data" / "target" / "train")}
    for side, (prec, calib) in sides.items():
        caches[side] = {}
        for part in ("train", "test"):
            out = work / side / f"{part}.h5"
            t = time.perf_counter()
            extract(ExtractConfig(data=run / "data" / "target" / part, out=out, model=ident.model, weights=str(model),
                                  image_size=size, precision=prec, compile="off", overwrite=True,
                                  calibration=calib))  # fmt: skip
            seconds[f"{side}_{part}_extract_s"] = time.perf_counter() - t
            caches[side][part] = out
    cosine = {}
    for side in ("int8", "int8-own"):
        cos = []
        for part in ("train", "test"):
            with FeatureCache(caches["bf16"][part]) as a, FeatureCache(caches[side][part]) as b:
                assert list(a.paths) == list(b.paths)
                fa, fb = np.asarray(a.features(), np.float64), np.asarray(b.features(), np.float64)
            cos.append((fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1) + 1e-12))
        c = np.concatenate(cos)
        cosine[side] = {
            "min": float(c.min()),
            "p1": float(np.quantile(c, 0.01)),
            "median": float(np.median(c)),
            "share_below_0.99": float((c < 0.99).mean()),
        }
    k_list = [int(k) for k in ks.split(",")]
    rows: dict[str, dict[str, list[float]]] = {}
    for prec in sides:
        rep = curve(CurveConfig(train=caches[prec]["train"], test=caches[prec]["test"], ks=k_list, seeds=seeds,
                                out=work / prec / "curve", knn=False, plot=False)).report  # fmt: skip
        for r in rep["curve"]:
            if r["method"] == "probe":
                rows.setdefault(str(r["k"]), {})[prec] = r["scores"]
    paired: dict[str, Any] = {}
    for k, by in rows.items():
        paired[k] = {f"{side}_mean": float(np.mean(v)) for side, v in by.items()}
        for side in ("int8", "int8-own"):
            mean, lo, hi = t_interval([100 * (b - a) for a, b in zip(by["bf16"], by[side])])
            paired[k][f"{side}_minus_bf16_points"] = {"mean": mean, "low": lo, "high": hi}
        paired[k]["scores"] = by
    return {
        "feature_cosine_vs_bf16": cosine,
        "probe": paired,
        "seconds": seconds,
        "image_size": size,
        "model": f"{ident.arch} @{size} (the offline recipe's source model)",
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks int8", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--weights", default="none", help="none | a checkpoint path (real weights quantise differently)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--no-int8", action="store_true", help="only compiled vs eager bf16 (no torchao needed)")
    p.add_argument("--probe-run", type=Path, default=None, help="a finished offline_digits run: probe bf16 vs int8")
    p.add_argument("--probe-ks", default="5,10,50,0", help="k per class for the probe check (0: all)")
    p.add_argument("--probe-seeds", type=int, default=10)
    p.add_argument("--no-speed", action="store_true", help="only the probe check")
    p.add_argument(
        "--record",
        action="store_true",
        help="write the measured rates to this host's speed records (what --compile auto and the int8 hint read)",
    )
    args = p.parse_args(argv)
    try:
        if not args.no_int8:
            import torchao  # noqa: F401
    except ImportError:
        print("torchao is not installed (pip install torchao); running with --no-int8", file=sys.stderr)
        args.no_int8 = True

    result: dict[str, Any] = {
        "bench": NAME,
        "figures": {},
        "raw": {},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {**machine_info("cpu"), "isa": isa_summary()},
        "command": command_line(NAME, argv),
    }
    lines: list[str] = []
    if not args.no_speed:
        speed_lines = _speed(args, result)
        lines += speed_lines
    if args.probe_run is not None and not args.no_int8:
        with tempfile.TemporaryDirectory() as tmp:
            probe = probe_check(args.probe_run, args.probe_ks, args.probe_seeds, Path(tmp))
        result["figures"]["probe_check"] = probe
        lines.append(
            f"probe on {args.probe_run} (source ResNet-18 @{probe['image_size']}), bf16 vs int8 with the default "
            "calibration (int8) and --calibration on the target's training pool (int8-own):"
        )
        for side, c in probe["feature_cosine_vs_bf16"].items():
            lines.append(
                f"  feature cosine {side} vs bf16: min {c['min']:.4f}, 1st percentile {c['p1']:.4f}, median "
                f"{c['median']:.5f}, share below 0.99 {c['share_below_0.99']:.3f}"
            )
        for k, r in probe["probe"].items():
            cells = []
            for side in ("int8", "int8-own"):
                d = r[f"{side}_minus_bf16_points"]
                lo = fmt(d["low"], 2) if d["low"] is not None else "n/a"
                hi = fmt(d["high"], 2) if d["high"] is not None else "n/a"
                cells.append(f"{side} {r[side + '_mean']:.3f} ({fmt(d['mean'], 2)} pt [{lo}, {hi}])")
            lines.append(f"  k={k}: bf16 {r['bf16_mean']:.3f}, " + ", ".join(cells))
        if args.record:
            drop = _record_probe(probe)
            lines.append(
                f"  recorded this host's probe check: int8 at most {drop:.2f} points below bf16 (the int8 hint)"
            )
    return emit(result, lines)


def _speed(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    import torch

    from resnet_transfer.backbone import build_backbone, compiled_forward
    from resnet_transfer.base import tune_process

    tune_process()
    cpu = torch.device("cpu")
    bb = build_backbone(args.model, args.weights, args.image_size)
    net = bb.net.eval().to(memory_format=torch.channels_last)
    from resnet_transfer.backbone import calibration_batch

    test = calibration_batch(bb.transform, args.batch, seed=1)  # held-out crops (the calibration set is seed 0)
    setup: dict[str, float] = {}
    with torch.inference_mode():
        ref = net(test).float()
        eager = compiled_forward(net, cpu, "bf16", "off")
        comp = compiled_forward(net, cpu, "bf16", "on", 10**6, bb.identity.to_json())
        t = time.perf_counter()
        comp(test)
        setup["compiled_bf16_compile_s"] = time.perf_counter() - t
        paths: dict[str, Any] = {"eager_bf16": eager, "compiled_bf16": comp}
        plain = plain_frozen_compile(
            net, torch.bfloat16
        )  # the reference the library's compiled forward must stay within 0.9x of
        t = time.perf_counter()
        plain(test)
        setup["plain_frozen_bf16_compile_s"] = time.perf_counter() - t
        paths["plain_frozen_bf16"] = plain
        if not args.no_int8:
            from resnet_transfer.backbone import Int8Forward

            q = Int8Forward(net, bb.transform, cpu)  # what `rt extract --precision int8` runs
            q(test)
            setup["int8_quantise_s"] = float(q.quantize_s or 0.0)
            setup["int8_compile_s"] = float(q.compile_s or 0.0)
            paths["int8_compiled"] = q
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
    result["figures"].update(
        {
            "img_s_median": med,
            "compiled_vs_eager_bf16": ratio(med["compiled_bf16"], med["eager_bf16"]),
            "int8_vs_compiled_bf16": ratio(med.get("int8_compiled", float("nan")), med["compiled_bf16"]),
            "int8_vs_eager_bf16": ratio(med.get("int8_compiled", float("nan")), med["eager_bf16"]),
            "library_compiled_vs_plain_frozen": ratio(med["compiled_bf16"], med["plain_frozen_bf16"]),
            "cosine_vs_fp32": cosine,
            "setup_s": setup,
        }
    )
    result["raw"]["img_s_samples"] = samples
    f = result["figures"]
    lines = [f"{args.model} ({args.weights}) @{args.image_size}, batch {args.batch}, {args.rounds} rounds, img/s:"]
    for k in paths:
        lines.append(
            f"  {k:14s} median {fmt(med[k])} (samples {' '.join(fmt(v) for v in samples[k])}); "
            f"cosine vs fp32 min {cosine[k]['min']:.5f}"
        )
    lines.append(
        f"  compiled / eager bf16 {fmt(f['compiled_vs_eager_bf16'], 2)}x, int8 / compiled bf16 "
        f"{fmt(f['int8_vs_compiled_bf16'], 2)}x, int8 / eager bf16 {fmt(f['int8_vs_eager_bf16'], 2)}x; setup s: "
        + ", ".join(f"{k} {fmt(v)}" for k, v in setup.items())
    )
    lines.append(
        f"  the library's compiled bf16 / the plain frozen compile {fmt(f['library_compiled_vs_plain_frozen'], 2)}x "
        "(needs >= 0.9)"
    )
    if args.record:
        _record(bb, args, med, setup)
        lines.append("  recorded as this host's figures (speed records: --compile auto, the int8 hint)")
    return lines


def _record_probe(probe: dict[str, Any]) -> float:
    """The probe check into this host's speed records: the largest mean drop (points) of int8 (default
    calibration) against bf16 over the k's, which `rt extract`'s int8 hint requires within 0.5."""
    import torch

    from resnet_transfer.backbone import record_probe
    from resnet_transfer.backbone.quantized import SCHEME

    drop = max(-r["int8_minus_bf16_points"]["mean"] for r in probe["probe"].values())
    record_probe(torch.device("cpu"), SCHEME, probe.get("model", "the offline recipe's source model"), drop)
    return drop


def _record(bb: Any, args: argparse.Namespace, med: dict[str, float], setup: dict[str, float]) -> None:
    """This run's forward-only figures into this host's speed records (both sides measured the same way)."""
    import torch

    from resnet_transfer.backbone.speed_records import record, work_id

    cpu, shape = torch.device("cpu"), (args.batch, 3, args.image_size, args.image_size)
    arch = bb.identity.arch
    record(cpu, work_id(arch, "bf16", shape), eager_s=1 / med["eager_bf16"], compiled_s=1 / med["compiled_bf16"])
    if "int8_compiled" in med:
        q_setup = setup.get("int8_quantise_s", 0.0) + setup.get("int8_compile_s", 0.0)
        record(cpu, work_id(arch, "int8", shape), int8_s=1 / med["int8_compiled"], int8_setup_s=q_setup)


if __name__ == "__main__":
    main()
