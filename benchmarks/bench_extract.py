"""Extraction: `rt extract`'s library path vs the loop a user would write by hand, and the forward-only
ceiling, on the same generated photo-like JPEGs, the same model and the same thread count.

Each side runs in its own fresh Python process, as a user would run it, and the sides are interleaved
(baseline, tuned baseline, ours, ceiling, then again) so machine load hits them alike. Timed: from just
after the imports (torch, timm, torchvision, h5py and our modules on both sides) to the features being on disk (model creation, listing, the loop, the HDF5 write).

- **baseline**: exactly the issue's loop (on ``--device``; the CPU by default): ``timm.create_model(name, num_classes=0)``, torchvision
  ``ImageFolder`` with timm's eval transform for the model, ``DataLoader(batch_size=32, num_workers=0)``,
  fp32, ``torch.no_grad()``, features appended to a list and written to HDF5 with h5py at the end. The
  process is left as a notebook leaves it: no ``mallopt``, no ``OMP_WAIT_POLICY``.
- **baseline+tuned**: the same loop in a process with :func:`resnet_transfer.runtime.tune_process`
  applied first (the allocator and OpenMP settings `rt` applies), so the table shows how much of the gain
  is process tuning and how much is the loop.
- **ours**: ``tune_process()`` (as the `rt` entry point does), then ``extract(ExtractConfig(...))`` with its
  defaults (precision auto = bf16 on CPUs with avx512_bf16, channels_last, inference_mode).
- **ceiling**: ``tune_process()``, the same model with the same forward settings as ours on pre-made
  tensors (no decode, no file), the same number of images, on the same clock as ours (model creation and
  the first, cold batch included), so the ratio is what decoding and writing cost. Also printed: the
  ratio of the loops alone (ours: its images/s from the first batch to the last chunk written; the
  ceiling: from the first batch to the last) and the ceiling's warm rate (first batch excluded).

Also measured, in one more process: the cosine similarity of bf16 vs fp32 features (must be >= 0.999
for bf16 to be the default), of rt's fused resize+crop vs torchvision's Resize + CenterCrop, and of JPEG
draft-mode decoding vs a full decode on large photos.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, emit, fmt, machine_info, make_photo_jpegs, median, ratio, run_child

NAME = "extract"

_PRELUDE = """
import os, time
if ARGS.get("tune"):
    from resnet_transfer.runtime import tune_process
    tune_process()
import torch
torch.set_num_threads(ARGS["threads"])
"""

BASELINE = (
    _PRELUDE
    + """
import h5py, numpy as np, timm, timm.data, torchvision
from torch.utils.data import DataLoader
t0 = time.perf_counter()
dev = torch.device(ARGS["device"])
model = timm.create_model(ARGS["model"], pretrained=False, num_classes=0).eval().to(dev)
kw = {"input_size": (3, ARGS["size"], ARGS["size"])} if ARGS.get("size") else {}
tf = timm.data.create_transform(**timm.data.resolve_data_config(kw, model=model))
ds = torchvision.datasets.ImageFolder(ARGS["data"], transform=tf)
loader = DataLoader(ds, batch_size=32, shuffle=False, num_workers=0)
feats, labels = [], []
with torch.no_grad():
    for x, y in loader:
        feats.append(model(x.to(dev)).cpu().numpy())
        labels.append(y.numpy())
with h5py.File(ARGS["out"], "w") as f:
    f.create_dataset("features", data=np.concatenate(feats))
    f.create_dataset("labels", data=np.concatenate(labels))
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "images": len(ds)}))
"""
)

OURS = (
    _PRELUDE
    + """
import h5py, timm, torchvision  # imported before the clock, as on the baseline side
import resnet_transfer.backbones, resnet_transfer.cache, resnet_transfer.data, resnet_transfer.report
from resnet_transfer.extract import ExtractConfig, extract
t0 = time.perf_counter()
r = extract(ExtractConfig(data=ARGS["data"], out=ARGS["out"], model=ARGS["model"], weights="none",
                          image_size=ARGS.get("size"), device=ARGS["device"], overwrite=True,
                          workers=ARGS.get("workers"), precision=ARGS.get("precision", "auto")))
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "images": r.rows, "loop_images_per_s": r.images_per_s}))
"""
)

CEILING = (
    _PRELUDE
    + """
import h5py, timm, torchvision  # imported before the clock, as on the other sides
from resnet_transfer.backbones import build_backbone
from resnet_transfer.runtime import autocast, resolve_device, resolve_precision
t0 = time.perf_counter()
dev = resolve_device(ARGS["device"])
prec = resolve_precision(ARGS.get("precision", "auto"), dev)
bb = build_backbone(ARGS["model"], "none", ARGS.get("size"))
net = bb.net.to(dev).eval().to(memory_format=torch.channels_last)
s = bb.transform.input_size
n, bs = ARGS["images"], 32
g = torch.Generator().manual_seed(0)
x = torch.randn(bs, 3, s, s, generator=g).to(dev).contiguous(memory_format=torch.channels_last)
def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()
with torch.inference_mode(), autocast(dev, prec):
    sync()
    t_loop = time.perf_counter()
    done, first = 0, None
    while done < n:
        k = min(bs, n - done)
        net(x[:k]).float().cpu()
        done += k
        if first is None:
            sync()
            first = time.perf_counter() - t_loop
    sync()
t1 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "images": n, "precision": prec, "loop_seconds": t1 - t_loop,
                  "steady_img_s": (n - min(bs, n)) / max(t1 - t_loop - first, 1e-9) if n > bs else None}))
"""
)

ACCURACY = (
    _PRELUDE
    + """
import numpy as np
from resnet_transfer.backbones import build_backbone
from resnet_transfer.data import ImageDataset, collate, eval_transform, list_images
bb = build_backbone(ARGS["model"], "none", ARGS.get("size"))
net = bb.net.eval().to(memory_format=torch.channels_last)
tf = eval_transform(bb.transform)

def feats(folder, precision, draft=None, transform=None):
    ds = ImageDataset(list_images(folder), transform or tf, draft=draft)
    xs, _, _ = collate([ds[i] for i in range(len(ds))])
    out = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for lo in range(0, len(xs), 32):
            out.append(net(xs[lo:lo + 32].contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(out)

def cos(a, b):
    c = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {"min": float(c.min()), "median": float(c.median())}

ref = feats(ARGS["data"], "fp32")
res = {"bf16_vs_fp32": cos(feats(ARGS["data"], "bf16"), ref)}
# rt's fused resize+crop vs torchvision's Resize + CenterCrop (the transform a user would write)
import torchvision.transforms as T
from resnet_transfer.data import _interpolation
c = bb.transform
two_step = T.Compose([T.Resize(c.resize_size, interpolation=_interpolation(c.interpolation)),
                      T.CenterCrop(c.input_size), T.ToTensor(), T.Normalize(c.mean, c.std)])
res["fused_vs_torchvision"] = cos(ref, feats(ARGS["data"], "fp32", transform=two_step))
if ARGS.get("large"):
    full = feats(ARGS["large"], "fp32")
    ds_full = ImageDataset(list_images(ARGS["large"]), tf)
    ds_draft = ImageDataset(list_images(ARGS["large"]), tf, draft=bb.transform.resize_size)
    def rate(ds):
        t = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        return len(ds) / (time.perf_counter() - t)
    res["draft_vs_full"] = cos(feats(ARGS["large"], "fp32", draft=bb.transform.resize_size), full)
    res["large_decode_img_s"] = {"full": rate(ds_full), "draft": rate(ds_draft)}
print(json.dumps(res))
"""
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run (resnet18, 64 images, 1 repeat): a smoke test")
    p.add_argument("--full", action="store_true", help="GPU-sized run (2,048 images, 5 repeats, no baseline+tuned)")
    p.add_argument("--models", nargs="+", default=None, help="default: resnet18 resnet50")
    p.add_argument("--images", type=int, default=None, help="images per run (default 192)")
    p.add_argument("--repeats", type=int, default=None, help="runs per side (default 3); medians reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads on every side (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (ours and the ceiling; the baseline is on CPU)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the model's own, 224)")
    p.add_argument("--workers", type=int, default=None, help="ours: DataLoader workers (default: rt's choice)")
    p.add_argument("--no-baseline", action="store_true", help="skip the hand-written baselines")
    p.add_argument("--no-accuracy", action="store_true", help="skip the bf16 / draft feature comparison")
    p.add_argument("--workdir", type=Path, default=None, help="where the images go (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import os

    args = parse(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    models = args.models or (["resnet18"] if args.quick else ["resnet18", "resnet50"])
    n = args.images or (64 if args.quick else 2048 if args.full else 192)
    repeats = args.repeats or (1 if args.quick else 5 if args.full else 3)
    threads = args.threads or cores
    size = args.image_size or (112 if args.quick else None)
    gpu = args.device.startswith("cuda")
    run_baseline = not args.no_baseline
    with tempfile.TemporaryDirectory(prefix="rt-bench-extract-") as tmp:
        work = Path(args.workdir or tmp)
        data = make_photo_jpegs(work / "photos", n, size=(500, 375), seed=0)
        large = None
        if not args.no_accuracy and not args.quick:
            large = make_photo_jpegs(work / "large", 32, size=(2000, 1500), seed=1)
        common = {"data": str(data), "threads": threads, "images": n, "size": size, "device": args.device}
        sides: dict[str, tuple[str, dict[str, Any]]] = {}
        if run_baseline:
            sides["baseline"] = (BASELINE, {"tune": False})
            if not args.full:
                sides["baseline+tuned"] = (BASELINE, {"tune": True})
        sides["ours"] = (OURS, {"tune": True, "workers": args.workers})
        sides["ceiling"] = (CEILING, {"tune": True})
        per_model: dict[str, Any] = {}
        for model in models:
            samples: dict[str, list[float]] = {k: [] for k in sides}
            extra: dict[str, list[Any]] = {
                "ours_loop_img_s": [],
                "ceiling_loop_img_s": [],
                "ceiling_steady_img_s": [],
                "ceiling_precision": [],
            }
            for r in range(repeats):
                for side, (code, kw) in sides.items():
                    out = str(work / f"{side}-{model}-{r}.h5")
                    env = {"OMP_WAIT_POLICY": ""} if not kw.get("tune") else {}
                    res = run_child(code, {**common, **kw, "model": model, "out": out}, env=env)
                    samples[side].append(res["images"] / res["seconds"])
                    print(f"  [{model} run {r + 1}/{repeats}] {side}: {samples[side][-1]:.1f} img/s", file=sys.stderr)
                    if side == "ours":
                        extra["ours_loop_img_s"].append(res["loop_images_per_s"])
                    if side == "ceiling":
                        extra["ceiling_precision"].append(res["precision"])
                        extra["ceiling_loop_img_s"].append(res["images"] / res["loop_seconds"])
                        if res.get("steady_img_s"):
                            extra["ceiling_steady_img_s"].append(res["steady_img_s"])
                    Path(out).unlink(missing_ok=True)
            med = {k: median(v) for k, v in samples.items()}
            entry: dict[str, Any] = {
                "img_s_median": med,
                "img_s_samples": samples,
                "ours_loop_img_s_median": median(extra["ours_loop_img_s"]),
                "ceiling_loop_img_s_median": median(extra["ceiling_loop_img_s"]),
                "ceiling_steady_img_s_median": median(extra["ceiling_steady_img_s"])
                if extra["ceiling_steady_img_s"]
                else None,
                "precision": extra["ceiling_precision"][0] if extra["ceiling_precision"] else None,
                "ours_vs_baseline": ratio(med["ours"], med.get("baseline", float("nan"))),
                "ours_vs_tuned_baseline": ratio(med["ours"], med.get("baseline+tuned", float("nan"))),
                "ours_vs_ceiling": ratio(med["ours"], med["ceiling"]),
                "ours_vs_ceiling_loop": ratio(median(extra["ours_loop_img_s"]), median(extra["ceiling_loop_img_s"])),
            }
            if not args.no_accuracy and not gpu:
                acc = run_child(ACCURACY, {**common, "model": model, "large": str(large) if large else None})
                entry["cosine"] = acc
            per_model[model] = entry
    cmd = command_line(NAME, argv)
    result = {
        "bench": NAME,
        "figures": per_model,
        "config": {
            "images": n,
            "photo_size": "500x375 (+-10%, 1 in 4 portrait), JPEG q90",
            "repeats": repeats,
            "threads": threads,
            "device": args.device,
            "image_size": size or "model default (224)",
            "batch": 32,
            "workers_ours": args.workers if args.workers is not None else "rt default",
        },
        "machine": {**machine_info(args.device), "threads": threads},
        "command": cmd,
    }
    lines = [f"{n} photos 500x375, batch 32, {threads} threads, {repeats} runs per side, medians in img/s:"]
    for model, e in per_model.items():
        m = e["img_s_median"]
        lines.append(
            f"{model} ({e['precision']}): baseline {fmt(m.get('baseline', float('nan')))}, "
            f"baseline+tuned {fmt(m.get('baseline+tuned', float('nan')))}, ours {fmt(m['ours'])} "
            f"(loop {fmt(e['ours_loop_img_s_median'])}), ceiling {fmt(m['ceiling'])} "
            f"(loop {fmt(e['ceiling_loop_img_s_median'])}, warm {fmt(e['ceiling_steady_img_s_median'] or float('nan'))})"
        )
        lines.append(
            f"  ours/baseline {fmt(e['ours_vs_baseline'], 2)}x (target >= 1.5), "
            f"ours/tuned baseline {fmt(e['ours_vs_tuned_baseline'], 2)}x, "
            f"ours/ceiling {fmt(e['ours_vs_ceiling'], 2)}x (target >= 0.9; loops only "
            f"{fmt(e['ours_vs_ceiling_loop'], 2)}x)"
        )
        if "cosine" in e:
            c = e["cosine"]
            lines.append(
                f"  cosine bf16 vs fp32: min {c['bf16_vs_fp32']['min']:.5f}, median "
                f"{c['bf16_vs_fp32']['median']:.5f} (needs >= 0.999)"
            )
            f = c["fused_vs_torchvision"]
            lines.append(
                f"  cosine fused resize+crop vs torchvision Resize+CenterCrop (fp32): min {f['min']:.6f}, "
                f"median {f['median']:.6f}"
            )
            if "draft_vs_full" in c:
                d = c["large_decode_img_s"]
                lines.append(
                    f"  draft decode on 2000x1500 photos: cosine min {c['draft_vs_full']['min']:.5f}, "
                    f"decode+transform {fmt(d['full'])} -> {fmt(d['draft'])} img/s"
                )
    return emit(result, lines)


if __name__ == "__main__":
    main()
