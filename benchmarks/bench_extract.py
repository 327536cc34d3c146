"""Extraction: `rt extract`'s library path vs the loop a user would write by hand, and the forward-only
ceiling, on the same generated photo-like JPEGs, the same model and the same thread count.

Each side runs in its own fresh Python process, as a user would run it, and the sides are interleaved
(baseline, tuned baseline, ours, ceiling, then again) so machine load hits them alike. Timed: from just
after the imports (torch, timm, torchvision, h5py and our modules on both sides) to the features being on disk (model creation, listing, the loop, the HDF5 write).

- **baseline**: exactly the issue's loop (on ``--device``; the CPU by default): ``timm.create_model(name, num_classes=0)``, torchvision
  ``ImageFolder`` with timm's eval transform for the model, ``DataLoader(batch_size=32, num_workers=0)``,
  fp32, ``torch.no_grad()``, features appended to a list and written to HDF5 with h5py at the end. The
  process is left as a notebook leaves it: no ``mallopt``, no ``OMP_WAIT_POLICY``.
- **baseline+tuned**: the same loop in a process with :func:`resnet_transfer.base.runtime.tune_process`
  applied first (the allocator and OpenMP settings `rt` applies), so the table shows how much of the gain
  is process tuning and how much is the loop.
- **ours**: ``tune_process()`` (as the `rt` entry point does), then ``extract(ExtractConfig(...))`` with its
  defaults (precision auto = bf16 on CPUs with avx512_bf16, channels_last, inference_mode).
- **ceiling**: ``tune_process()``, the same model with the same forward settings as ours on pre-made
  tensors (no decode, no file), the same number of images, on the same clock as ours (model creation and
  the first, cold batch included), so the ratio is what decoding and writing cost. Also printed: the
  ratio of the loops alone (ours: its images/s from the first batch to the last chunk written; the
  ceiling: from the first batch to the last) and the ceiling's warm rate (first batch excluded).
- **bound** (:mod:`benchmarks.pipeline_bound`): forward only, in one process, the library's eager and
  compiled forwards, the plain frozen compile and int8, then the decode per image per thread of these
  photos; ``1 / (forward_s + decode_s / cores)`` per forward, printed beside ours' steady rates.
- **rt-process-auto / -on**: `rt extract` (``python -m resnet_transfer extract``) timed as a whole process,
  interpreter start to exit, ``--compile auto`` / ``on``. Every child of one benchmark run shares one
  speed-records file (``RT_SPEED_RECORDS`` in the work dir), so ``auto`` decides from what the earlier sides
  measured on this host, as a user's later runs would.

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

from benchmarks.common import TORCH_PRELUDE as _PRELUDE
from benchmarks.common import (
    command_line,
    emit,
    fmt,
    isa_summary,
    machine_info,
    make_phone_jpegs,
    make_photo_jpegs,
    median,
    ratio,
    run_child,
)
from benchmarks.extract_accuracy import ACCURACY
from benchmarks.pipeline_bound import BOUND, bound_figures, process_argv, run_process, summary_lines

NAME = "extract"

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

_TIMING = """
import resnet_transfer.backbone.compiled as _rc
CALLS = []  # (seconds since t0 when the forward call returned, images, compiled-in-this-call)
_orig_call = _rc.CompiledForward.__call__
def _timed_call(self, x):
    before = self.compile_s
    out = _orig_call(self, x)
    if self.device.type == "cuda":
        torch.cuda.synchronize()
    CALLS.append((time.perf_counter() - t0, int(x.shape[0]), before is None and self.compile_s is not None))
    return out
_rc.CompiledForward.__call__ = _timed_call
def timing(n_total):
    # setup: clock start to the end of the cold batch (the one that compiled, else the first): model
    # creation, listing, compile, the cold first batch. steady: the images after it over the time after it.
    if not CALLS:
        return {"setup_s": None, "steady_img_s": None, "compiled": False, "compile_s": None}
    k = max([i for i, c in enumerate(CALLS) if c[2]] or [0])
    rest = CALLS[k + 1:]
    steady = sum(c[1] for c in rest) / (rest[-1][0] - CALLS[k][0]) if rest else None
    comp = [i for i, c in enumerate(CALLS) if c[2]]
    return {"setup_s": CALLS[k][0], "steady_img_s": steady, "compiled": bool(comp),
            "compile_s": (CALLS[k][0] - (CALLS[k - 1][0] if k else 0.0)) if comp else None}
"""

OURS = (
    _PRELUDE
    + """
import h5py, timm, torchvision  # imported before the clock, as on the baseline side
import resnet_transfer.backbone.networks, resnet_transfer.cache.extraction, resnet_transfer.images.data
from resnet_transfer.cache import ExtractConfig, extract
t0 = 0.0
"""
    + _TIMING
    + """
if ARGS.get("no_draft"):  # the benchmark's switch: full decode, recorded as such in the identity
    import dataclasses
    import resnet_transfer.backbone.networks as B
    _build = B.build_backbone
    def _no_draft(*a, **k):
        bb = _build(*a, **k)
        t = dataclasses.replace(bb.transform, draft=False)
        return B.Backbone(net=bb.net, identity=B.with_transform(bb.identity, t), stages=bb.stages)
    B.build_backbone = _no_draft
t0 = time.perf_counter()
r = extract(ExtractConfig(data=ARGS["data"], out=ARGS["out"], model=ARGS["model"], weights="none",
                          image_size=ARGS.get("size"), device=ARGS["device"], overwrite=True,
                          workers=ARGS.get("workers"), precision=ARGS.get("precision", "auto"),
                          compile=ARGS.get("compile", "auto")))
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "images": r.rows, "loop_images_per_s": r.images_per_s, **timing(r.rows)}))
"""
)

CEILING = (
    _PRELUDE
    + """
import h5py, timm, torchvision  # imported before the clock, as on the other sides
from resnet_transfer.backbone import build_backbone
from resnet_transfer.backbone import compiled_forward
from resnet_transfer.base import resolve_device, resolve_precision
t0 = 0.0
"""
    + _TIMING
    + """
t0 = time.perf_counter()
dev = resolve_device(ARGS["device"])
prec = resolve_precision(ARGS.get("precision", "auto"), dev)
bb = build_backbone(ARGS["model"], "none", ARGS.get("size"))
net = bb.net.to(dev).eval().to(memory_format=torch.channels_last)
s = bb.transform.input_size
n, bs = ARGS["images"], 32
g = torch.Generator().manual_seed(0)
x = torch.randn(bs, 3, s, s, generator=g).to(dev).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    fwd = compiled_forward(net, dev, prec, ARGS["compile"], n, bb.identity.to_json())
    t_loop = time.perf_counter()
    done = 0
    while done < n:
        k = min(bs, n - done)
        fwd(x[:k]).cpu()
        done += k
t1 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "images": n, "precision": prec, "loop_seconds": t1 - t_loop, **timing(n)}))
"""
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run (resnet18, 64 images, 1 repeat): a smoke test")
    p.add_argument("--full", action="store_true", help="GPU-sized run (2,048 images, 5 repeats, no baseline+tuned)")
    p.add_argument("--models", nargs="+", default=None, help="default: resnet18 resnet50")
    p.add_argument("--images", type=int, default=None, help="images per run (default 192)")
    p.add_argument("--phone-images", type=int, default=None, help="12 MP JPEGs per phone run (default 48; 0: none)")
    p.add_argument("--repeats", type=int, default=None, help="runs per side (default 3); medians reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads on every side (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (ours and the ceiling; the baseline is on CPU)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the model's own, 224)")
    p.add_argument("--workers", type=int, default=None, help="ours: DataLoader workers (default: rt's choice)")
    p.add_argument("--no-baseline", action="store_true", help="skip the hand-written baselines")
    p.add_argument("--no-tuned", action="store_true", help="skip the baseline+tuned side")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled sides (ours and ceiling)")
    p.add_argument("--no-cold", action="store_true", help="skip the compiled sides on an empty inductor cache")
    p.add_argument("--cold-repeats", type=int, default=None, help="rounds with the cold sides (default: all)")
    p.add_argument("--phone-compiled", action="store_true", help="also the phone workload compiled (warm cache)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the bf16 / compile / draft feature comparison")
    p.add_argument("--workdir", type=Path, default=None, help="where the images go (default: a temp dir)")
    p.add_argument(
        "--photos",
        choices=("synthetic", "shipped"),
        default="synthetic",
        help="synthetic photo-like JPEGs, or crops of the photographs scikit-learn/-image ship",
    )
    p.add_argument("--no-bound", action="store_true", help="skip the pipeline bound (forward only + decode)")
    p.add_argument("--no-int8", action="store_true", help="the bound without the int8 forward")
    p.add_argument("--no-process", action="store_true", help="skip `rt extract` timed as a whole process")
    return p.parse_args(argv)


def _sides(args: argparse.Namespace, phone: Path | None, work: Path, model: str) -> dict[str, tuple[str, dict]]:
    """Every side of one model's round, in run order. ``ic`` names the inductor cache each side runs with:
    ``warm`` (one directory per model, filled by an untimed compile first), ``cold`` (a fresh one per run),
    or the user's own (eager sides never compile)."""
    sides: dict[str, tuple[str, dict[str, Any]]] = {}
    if not args.no_baseline:
        sides["baseline"] = (BASELINE, {"tune": False})
        if not (args.full or args.no_tuned):
            sides["baseline+tuned"] = (BASELINE, {"tune": True})
    sides["ours"] = (OURS, {"tune": True, "workers": args.workers, "compile": "auto", "ic": "warm"})
    sides["ceiling-eager"] = (CEILING, {"tune": True, "compile": "off"})
    if not args.no_compile:
        sides["ours-compiled-warm"] = (OURS, {"tune": True, "workers": args.workers, "compile": "on", "ic": "warm"})
        sides["ceiling-compiled-warm"] = (CEILING, {"tune": True, "compile": "on", "ic": "warm"})
        if not args.no_cold:
            sides["ours-compiled-cold"] = (OURS, {"tune": True, "workers": args.workers, "compile": "on", "ic": "cold"})
            sides["ceiling-compiled-cold"] = (CEILING, {"tune": True, "compile": "on", "ic": "cold"})
    if not args.no_bound:
        sides["bound"] = (BOUND, {"kind": "bound", "int8": not args.no_int8, "ic": "warm"})
    if not args.no_process and not args.device.startswith("cuda"):
        sides["rt-process-auto"] = ("", {"kind": "process", "compile": "auto", "ic": "warm"})
        if not args.no_compile:
            sides["rt-process-on"] = ("", {"kind": "process", "compile": "on", "ic": "warm"})
    if phone is not None:
        ph = {"tune": True, "workers": args.workers, "data": str(phone), "ic": "warm"}
        sides["ours-phone"] = (OURS, {**ph, "compile": "auto"})
        sides["ours-phone-no-draft"] = (OURS, {**ph, "compile": "auto", "no_draft": True})
        if args.phone_compiled and not args.no_compile:
            sides["ours-phone-compiled-warm"] = (OURS, {**ph, "compile": "on"})
    return sides


def _env(kw: dict[str, Any], work: Path, model: str, r: int, side: str) -> dict[str, str]:
    env = {"OMP_WAIT_POLICY": ""} if not kw.get("tune") else {}
    env["RT_SPEED_RECORDS"] = str(work / "speed-records.json")  # this run's own host figures, not the user's
    if kw.get("ic") == "warm":
        env["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-warm-{model}")
    elif kw.get("ic") == "cold":
        env["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-cold-{model}-{side}-{r}")
    return env


def _ratios(med: dict[str, float], x: dict[str, float]) -> dict[str, Any]:
    """The ceiling is the faster forward-only path by steady state (compiled or eager); ratios vs it."""
    eager, comp = x.get("ceiling-eager:steady", float("nan")), x.get("ceiling-compiled-warm:steady", float("nan"))
    best = "ceiling-compiled-warm" if comp == comp and comp > eager else "ceiling-eager"
    out: dict[str, Any] = {"ceiling": best, "ceiling_steady_img_s": x.get(f"{best}:steady")}
    for ours in ("ours", "ours-compiled-warm", "ours-phone", "ours-phone-no-draft", "ours-phone-compiled-warm"):
        if f"{ours}:steady" in x:
            out[f"{ours}_vs_ceiling_steady"] = ratio(x[f"{ours}:steady"], x[f"{best}:steady"])
    pairs = [("ours", "ceiling-eager"), ("ours", best), ("ours-compiled-warm", "ceiling-compiled-warm"),
             ("ours-compiled-cold", "ceiling-compiled-cold"), ("ours-compiled-cold", best)]  # fmt: skip
    for a, b in pairs:
        if a in med and b in med:
            out[f"{a}_vs_{b}_whole_run"] = ratio(med[a], med[b])
    for b in ("baseline", "baseline+tuned"):
        if b in med:
            out[f"ours_vs_{b}"] = ratio(med["ours"], med[b])
            if "ours-compiled-warm" in med:
                out[f"ours-compiled-warm_vs_{b}"] = ratio(med["ours-compiled-warm"], med[b])
    return out


def _unlink_chunks(out: Path) -> None:
    import shutil

    shutil.rmtree(out.with_name(out.name + ".chunks"), ignore_errors=True)


def _run_model(
    args: argparse.Namespace, model: str, common: dict, work: Path, phone: Path | None, repeats: int
) -> dict:
    sides = _sides(args, phone, work, model)
    samples: dict[str, list[float]] = {k: [] for k in sides}
    extra: dict[str, list[Any]] = {}
    if not args.no_compile:  # fill the warm inductor cache as a user's first compiled run does: a cold sample
        code, kw = sides["ours-compiled-warm"]
        res = run_child(code, {**common, **kw, "model": model, "out": str(work / "prewarm.h5")},
                        env=_env(kw, work, model, 0, "prewarm"))  # fmt: skip
        samples["ours-compiled-cold"] = [*samples.get("ours-compiled-cold", []), res["images"] / res["seconds"]]
        for key in ("steady_img_s", "setup_s", "compile_s"):
            extra.setdefault(f"ours-compiled-cold:{key.removesuffix('_img_s')}", []).append(res[key])
        print(f"  [{model} first compiled run, empty cache] ours: setup {fmt(res['setup_s'])} s", file=sys.stderr)
    bound_runs: list[dict[str, Any]] = []
    for r in range(repeats):
        for side, (code, kw) in sides.items():
            if kw.get("ic") == "cold" and args.cold_repeats is not None and r >= args.cold_repeats:
                continue
            out = str(work / f"{side}-{model}-{r}.h5")
            env = _env(kw, work, model, r, side)
            if kw.get("kind") == "bound":  # forward only + decode: no whole-run sample
                samples.pop(side, None)
                bound_runs.append(run_child(code, {**common, **kw, "model": model}, env=env))
                print(f"  [{model} run {r + 1}/{repeats}] bound: {bound_runs[-1]['img_s']}", file=sys.stderr)
                continue
            if kw.get("kind") == "process":
                argv = process_argv(common["data"], out, model, common.get("size"), kw["compile"])
                seconds, said = run_process(argv, env)
                res = {"images": common["images"], "seconds": seconds}
                if said:
                    extra.setdefault(f"{side}:compile_auto", []).append(said)
                    print(f"  [{model} run {r + 1}/{repeats}] {side}: {said}", file=sys.stderr)
            else:
                res = run_child(code, {**common, **kw, "model": model, "out": out}, env=env)
            samples[side].append(res["images"] / res["seconds"])
            for key in ("steady_img_s", "setup_s", "compile_s", "compiled", "loop_images_per_s", "precision"):
                if res.get(key) is not None:
                    extra.setdefault(f"{side}:{key.removesuffix('_img_s')}", []).append(res[key])
            print(
                f"  [{model} run {r + 1}/{repeats}] {side}: {samples[side][-1]:.1f} img/s whole run, "
                f"steady {fmt(res.get('steady_img_s') or float('nan'))}, setup {fmt(res.get('setup_s') or float('nan'))} s"
                f"{', compiled' if res.get('compiled') else ''}",
                file=sys.stderr,
            )
            Path(out).unlink(missing_ok=True)
            _unlink_chunks(Path(out))
    med = {k: median(v) for k, v in samples.items()}
    xmed = {
        k: median(v) for k, v in extra.items() if v and isinstance(v[0], (int, float)) and not isinstance(v[0], bool)
    }
    entry: dict[str, Any] = {
        "img_s_whole_run_median": med,
        "img_s_whole_run_samples": samples,
        "detail_median": xmed,
        "detail_samples": extra,
        "precision": (extra.get("ceiling-eager:precision") or [None])[0],
        **_ratios(med, xmed),
    }
    if bound_runs:
        merged = {
            "img_s": {k: [v for b in bound_runs for v in b["img_s"][k]] for k in bound_runs[0]["img_s"]},
            "decode_s_per_image": [v for b in bound_runs for v in b["decode_s_per_image"]],
            "setup_s": bound_runs[0]["setup_s"],
        }
        entry["bound"] = {**bound_figures(merged, common["threads"]), "raw": bound_runs}
        ref = entry["bound"]["bound_img_s"].get("library-compiled", float("nan"))
        for side in ("ours", "ours-compiled-warm", "ours-compiled-cold"):
            if f"{side}:steady" in xmed:
                entry[f"{side}_steady_vs_bound"] = ratio(xmed[f"{side}:steady"], ref)
        for side in ("rt-process-auto", "rt-process-on"):
            if side in med:
                entry[f"{side}_whole_process_vs_bound"] = ratio(med[side], ref)
    if not args.no_accuracy and not args.device.startswith("cuda"):
        acc_args = {**common, "model": model, "phone": str(phone) if phone else None, "compiled": not args.no_compile}
        try:
            entry["cosine"] = run_child(ACCURACY, acc_args, env=_env({"ic": "warm"}, work, model, 0, "acc"))
        except RuntimeError as exc:  # keep the timings of this model when the comparison child fails
            entry["cosine_error"] = str(exc)[-2000:]
            print(f"  [{model}] accuracy child failed: {str(exc)[-2000:]}", file=sys.stderr)
    return entry


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import os

    args = parse(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    models = args.models or (["resnet18"] if args.quick else ["resnet18", "resnet50"])
    n = args.images or (64 if args.quick else 2048 if args.full else 192)
    n_phone = args.phone_images if args.phone_images is not None else (0 if args.quick else 48)
    repeats = args.repeats or (1 if args.quick else 5 if args.full else 3)
    threads = args.threads or cores
    size = args.image_size or (112 if args.quick else None)
    with tempfile.TemporaryDirectory(prefix="rt-bench-extract-") as tmp:
        work = Path(args.workdir or tmp)
        if args.photos == "shipped":  # crops of real photographs, 500x375 (1 in 4 portrait), q90
            data = make_phone_jpegs(work / "photos-shipped", n, size=(500, 375), seed=0)
        else:
            data = make_photo_jpegs(work / "photos", n, size=(500, 375), seed=0)
        phone = make_phone_jpegs(work / "phone", n_phone, seed=1) if n_phone else None
        common = {"data": str(data), "threads": threads, "images": n, "size": size, "device": args.device}
        per_model = {model: _run_model(args, model, common, work, phone, repeats) for model in models}
    cmd = command_line(NAME, argv)
    result = {
        "bench": NAME,
        "figures": per_model,
        "config": {
            "images": n,
            "photo_size": "500x375 (+-10%, 1 in 4 portrait), JPEG q90",
            "photos": args.photos,
            "phone_images": n_phone,
            "phone_size": "4032x3024 (1 in 4 portrait), shipped photos upscaled + noise, JPEG q90",
            "repeats": repeats,
            "threads": threads,
            "device": args.device,
            "image_size": size or "model default (224)",
            "batch": 32,
            "workers_ours": args.workers if args.workers is not None else "rt default",
        },
        "machine": {**machine_info(args.device), "threads": threads, "isa": isa_summary()},
        "command": cmd,
    }
    return emit(result, _summary(per_model, n, n_phone, threads, repeats))


def _summary(per_model: dict[str, Any], n: int, n_phone: int, threads: int, repeats: int) -> list[str]:
    lines = [
        f"{n} photos 500x375 (+ {n_phone} 12 MP phone JPEGs), batch 32, {threads} threads, {repeats} runs per side.",
        "img/s medians: whole run (clock from after imports to features on disk) | steady (after the cold or "
        "compiling batch) | setup s (model creation + compile + cold first batch)",
    ]
    for model, e in per_model.items():
        m, x = e["img_s_whole_run_median"], e["detail_median"]
        lines.append(f"{model} ({e['precision']}), the ceiling = {e['ceiling']}:")
        for side in m:
            steady, setup = x.get(f"{side}:steady", float("nan")), x.get(f"{side}:setup_s", float("nan"))
            comp = x.get(f"{side}:compile_s")
            lines.append(
                f"  {side:26s} whole {fmt(m[side]):>6s} | steady {fmt(steady):>6s} | setup {fmt(setup):>5s} s"
                + (f" (compile+first batch {fmt(comp)} s)" if comp else "")
            )
        lines.append(
            "  ratios: "
            + ", ".join(
                f"{k} {fmt(v, 2)}" for k, v in e.items() if k.endswith(("steady", "run")) or k.startswith("ours_vs")
            )
        )
        lines += summary_lines(e)
        c = e.get("cosine") or {}
        if c:
            lines.append(f"  cosine bf16 vs fp32: min {c['bf16_vs_fp32']['min']:.5f} (needs >= 0.999)")
            lines.append(
                f"  cosine fused resize+crop vs torchvision Resize+CenterCrop: min {c['fused_vs_torchvision']['min']:.6f}"
            )
            if "compiled_vs_eager_bf16" in c:
                lines.append(
                    f"  cosine compiled vs eager (bf16): min {c['compiled_vs_eager_bf16']['min']:.6f} (needs >= 0.999)"
                )
            if "draft_vs_full" in c:
                d = c["phone_decode_img_s_one_core"]
                lines.append(
                    f"  12 MP JPEGs, decode+transform on one core: PIL full {fmt(d['pil_full'])}, PIL draft "
                    f"{fmt(d['pil_draft'])}, torchvision decode_jpeg + torch resize {fmt(d['tv_decode_jpeg_torch_resize'])} "
                    f"img/s; cosine draft vs full min {c['draft_vs_full']['min']:.5f}, "
                    f"torchvision vs PIL full min {c['tv_decode_vs_pil_full']['min']:.5f}"
                )
    return lines


if __name__ == "__main__":
    main()
