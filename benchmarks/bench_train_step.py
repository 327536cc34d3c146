"""The finetune train step: fp32 vs bf16 autocast, eager vs ``torch.compile``, side by side in one process.

For each shape (model, image size, batch, what trains) the full train step (forward under autocast,
cross-entropy, backward, fused AdamW step) runs interleaved fp32 / bf16 (and, with ``--compile``, the
compiled step in both precisions, its compile time reported apart), ``--rounds`` timed steps each after a
warm-up. Medians and every sample are printed; this is what ``rt finetune --precision auto`` decides by
(resnet_transfer/precision_probe.py) and what docs/finetune.md quotes.

    python -m benchmarks train_step [--quick] [--compile] [--rounds 7]
    python -m benchmarks train_step --finetune [--ft-shape r18-64-b32-all] [--images 480] [--epochs 3]

``--finetune``: `rt finetune` (the library call, `--workers 0` as on a small CPU box, its own `--precision
auto` and `--compile auto`) on ``--images`` generated 500x375 photos, against the bare step of the same model,
shape, precision and compile (the ones the run chose, read from its report.json) timed before and after it in
the same process. Printed: the steady epochs' training img/s (epochs after the first), the bare step's img/s,
their ratio, and where the rest of an epoch goes: the feed alone (decode + augment + collate of one epoch,
nothing trained), validation seconds, and the epoch's wall time outside ``train_one_epoch`` (checkpoint,
reporter).
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


def _train_setup(name: str, classes: int) -> tuple[Any, Any, Any, Any]:
    """The model of shape ``name`` (random init, its freeze policy applied, channels-last) with one fixed
    random batch of ``classes`` labels: ``(model, policy, x, y)``."""
    import torch

    from resnet_transfer.backbone import build_backbone
    from resnet_transfer.finetuning import FreezePolicy
    from resnet_transfer.head import HeadModule
    from resnet_transfer.models import Classifier

    model_name, size, batch, unfreeze = SHAPES[name]
    bb = build_backbone(model_name, "none", size)
    head = HeadModule(bb.num_features, classes)
    policy = FreezePolicy(bb.stage_groups(), head, unfreeze, lr_mult=1.0)
    policy.apply(0)
    policy.train_mode(0)
    bb.net.to(memory_format=torch.channels_last)
    model = Classifier(bb.net, head)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), generator=g)
    return model, policy, x, y


def _shape(name: str, rounds: int, do_compile: bool) -> dict[str, Any]:
    model_name, size, batch, unfreeze = SHAPES[name]
    model, policy, x, y = _train_setup(name, 10)
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


def _bare_step_img_s(name: str, precision: str, compiled: bool, rounds: int) -> list[float]:
    batch = SHAPES[name][2]
    model, policy, x, y = _train_setup(name, 4)
    fn = _step_fn(model, policy, x, y, precision, compiled)
    fn()
    fn()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(batch / (time.perf_counter() - t))
    return out


def _rates(history: list[dict[str, Any]], images: int, batch: int) -> list[dict[str, Any]]:
    n = (images - round(images * 0.1)) // batch * batch  # the training images of an epoch (drop_last)
    return [{"train_img_s_": n / r["train_seconds"], "epoch_img_s_": n / r["seconds"]} for r in history]


_COMPILED = ("compiled", "compile")


def finetune_vs_step(
    name: str, images: int, epochs: int, rounds: int, work: Any, decode_ahead_arm: bool = True
) -> dict[str, Any]:
    """`rt finetune`'s steady epochs against the bare step (module doc), in this process."""
    import json

    from benchmarks.common import make_photo_jpegs
    from resnet_transfer.finetuning import FinetuneConfig, finetune

    model_name, size, batch, unfreeze = SHAPES[name]
    photos = make_photo_jpegs(work / "photos", images)
    cfg = FinetuneConfig(
        out=work / "ft", data=photos, model=model_name, weights="none", image_size=size, unfreeze=unfreeze,
        epochs=epochs, batch_size=batch, workers=0, patience=0, probe_epochs=0, val_fraction=0.1, overwrite=True,
    )  # fmt: skip
    serial: dict[str, Any] = {}
    if decode_ahead_arm:  # the same run with the feed as it was: decode in the main thread between steps
        from resnet_transfer.finetuning import feeds

        before = feeds.ImageFeed.train_batches
        feeds.ImageFeed.train_batches = lambda self, g: self._batches(  # type: ignore[method-assign]
            self.train_ds, self._loader(self.train_ds, True, g, self.drop_last)
        )
        try:
            t0 = time.perf_counter()
            finetune(cfg)
            serial = {"run_wall_s": time.perf_counter() - t0}
            rep0 = json.loads((work / "ft" / "report.json").read_text())["history"]
            serial["train_img_s"] = [r["train_img_s_"] for r in _rates(rep0, images, batch)[1:]]
        finally:
            feeds.ImageFeed.train_batches = before  # type: ignore[method-assign]
    bare_before: list[float] = []
    if serial:  # the bare step before the measured run too (the host drifts by 10% between minutes)
        rep0 = json.loads((work / "ft" / "report.json").read_text())
        c0 = (rep0.get("precision_choice") or {}).get("compile") or {}
        bare_before = _bare_step_img_s(name, rep0["precision"], c0.get("kept", c0.get("action")) in _COMPILED, rounds)
    t0 = time.perf_counter()
    finetune(cfg)
    wall = time.perf_counter() - t0
    report = json.loads((work / "ft" / "report.json").read_text())
    choice = report.get("precision_choice") or {}
    precision = report["precision"]
    compiled = (choice.get("compile") or {}).get("kept", (choice.get("compile") or {}).get("action")) in _COMPILED
    hist = report["history"]
    steady = hist[1:] or hist
    rates = _rates(hist, images, batch)[1:] or _rates(hist, images, batch)
    train_img_s = [r["train_img_s_"] for r in rates]
    bare = bare_before + _bare_step_img_s(name, precision, compiled, rounds)
    import torch

    from resnet_transfer.backbone import build_backbone
    from resnet_transfer.finetuning.feeds import build_feed  # the feed alone: one epoch, nothing trained

    feeding = build_feed(cfg, build_backbone(model_name, "none", size), None, torch.device("cpu"))
    t = time.perf_counter()
    n_feed = sum(len(yb) for _, yb in feeding.feed.train_batches(torch.Generator().manual_seed(0)))
    feed_s = time.perf_counter() - t
    bare += _bare_step_img_s(name, precision, compiled, rounds)
    return {
        "shape": name,
        "precision": precision,
        "compiled": compiled,
        "compile_choice": choice.get("compile"),
        "finetune_train_img_s": train_img_s,
        "bare_step_img_s": bare,
        "epoch_over_bare": ratio(median(train_img_s), median(bare)),
        "finetune_epoch_img_s_with_validation": [r["epoch_img_s_"] for r in rates],
        "serial_decode_arm": serial,
        "where": {
            "train_seconds": [r["train_seconds"] for r in steady],
            "epoch_seconds": [r["seconds"] for r in steady],
            "validation_seconds": [r["seconds"] - r["train_seconds"] for r in steady],
            "feed_alone_seconds_per_epoch": feed_s,
            "feed_alone_img_s": n_feed / feed_s,
            "run_wall_s": wall,
            "outside_epochs_s": wall - sum(r["seconds"] for r in hist),
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks train_step")
    ap.add_argument("--quick", action="store_true", help="the two ResNet-18 shapes only")
    ap.add_argument("--compile", action="store_true", help="also the torch.compile'd step (compile time shown)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of: {', '.join(SHAPES)}")
    ap.add_argument("--finetune", action="store_true", help="rt finetune's steady epochs vs the bare step")
    ap.add_argument("--ft-shape", default="r18-64-b32-all", choices=list(SHAPES))
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)
    if args.finetune:
        return _finetune_main(args, argv)
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


def _finetune_main(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    import os
    import tempfile
    from pathlib import Path

    import torch

    from resnet_transfer.base import tune_process

    tune_process()
    with tempfile.TemporaryDirectory(prefix="rt-bench-ft-") as tmp:
        f = finetune_vs_step(args.ft_shape, args.images, args.epochs, args.rounds, Path(tmp))
    w = f["where"]
    summary = [
        f"{f['shape']} {f['precision']}{' compiled' if f['compiled'] else ''}: rt finetune steady epochs "
        f"{fmt(median(f['finetune_train_img_s']))} img/s (train part), bare step {fmt(median(f['bare_step_img_s']))} "
        f"img/s: {fmt(f['epoch_over_bare'], 2)}x (goal >= 0.9)",
        f"  the same run with the decode between steps (as before): "
        f"{fmt(median(f['serial_decode_arm'].get('train_img_s', [])))} img/s; whole epochs with validation "
        f"{fmt(median(f['finetune_epoch_img_s_with_validation']))} img/s",
        f"  where the rest goes: feed alone {fmt(w['feed_alone_img_s'])} img/s "
        f"({fmt(w['feed_alone_seconds_per_epoch'])} s/epoch), validation {[round(v, 2) for v in w['validation_seconds']]} s, "
        f"outside the epochs {fmt(w['outside_epochs_s'])} s of {fmt(w['run_wall_s'])} s",
    ]
    result = {
        "bench": "train_step",
        "finetune": f,
        "machine": {**machine_info("cpu"), "threads": torch.get_num_threads(), "load_avg": os.getloadavg()},
        "command": command_line("train_step", argv),
    }
    return emit(result, summary)


if __name__ == "__main__":
    main()
