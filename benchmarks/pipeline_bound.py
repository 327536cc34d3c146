"""The pipeline bound of `python -m benchmarks extract`, and `rt extract` timed as a whole process.

**Bound.** One process, forward only on random tensors (batch 32, channels_last), interleaved rounds of
two batches per path: the library's eager forward, the library's compiled forward
(:func:`resnet_transfer.backbone.compiled_forward`, frozen), the *plain* frozen compile a user would write
(``torch._inductor.config.freezing = True``; ``torch.compile(model)`` called under ``inference_mode`` and
bf16 autocast: the reference the library must stay within 0.9x of) and, with torchao, the int8 forward
(:class:`resnet_transfer.backbone.Int8Forward`). Then the decode of the benchmark's own photos as the
decode threads do it (PIL decode with draft + the fused resize/crop to uint8), one image at a time on one
thread. With ``forward_s`` per image on all cores and ``decode_s`` per image per thread,
``bound = 1 / (forward_s + decode_s / cores)``: the two cores doing one batch's decode and then its
forward, each with every core, with nothing lost between them.

**Whole process.** `python -m resnet_transfer extract ...` (what the `rt` script runs) in a subprocess,
timed from spawn to exit: interpreter start, imports, model build, listing, compile, the loop, the write.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import REPO, fmt, ratio

BOUND = """
import os, time, statistics
from resnet_transfer.base import tune_process
tune_process()
import torch
torch.set_num_threads(ARGS["threads"])
from resnet_transfer.backbone import build_backbone
from resnet_transfer.backbone import compiled_forward
from resnet_transfer.images import ImageDataset, list_images
from resnet_transfer.base import resolve_precision
from resnet_transfer.images import eval_transform_uint8
cpu = torch.device("cpu")
prec = resolve_precision(ARGS.get("precision", "auto"), cpu)
bb = build_backbone(ARGS["model"], "none", ARGS.get("size"))
net = bb.net.eval().to(memory_format=torch.channels_last)
s, bs = bb.transform.input_size, 32
x = torch.randn(bs, 3, s, s, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
setup, paths = {}, {}
def timed_first(name, fn):
    t = time.perf_counter(); fn(x); setup[name] = time.perf_counter() - t; paths[name] = fn
with torch.inference_mode():
    paths["eager"] = compiled_forward(net, cpu, prec, "off")
    timed_first("library-compiled", compiled_forward(net, cpu, prec, "on", 10**6, bb.identity.to_json(), bb.identity.arch))
    import torch._inductor.config as ic
    from benchmarks.common import plain_frozen_compile  # inductor's global freezing flag, as its docs say
    timed_first("plain-frozen", plain_frozen_compile(net, {"bf16": torch.bfloat16, "fp32": None}[prec]))
    ic.freezing = False
    if ARGS.get("int8"):
        try:
            from resnet_transfer.backbone import Int8Forward
            timed_first("int8", Int8Forward(net, bb.transform, cpu, model=bb.identity.arch))
        except Exception as exc:  # no torchao: the bound without int8
            setup["int8_error"] = f"{type(exc).__name__}: {exc}"[:300]
    samples = {k: [] for k in paths}
    for _ in range(ARGS.get("rounds", 4)):
        for name, fn in paths.items():
            t = time.perf_counter(); fn(x); fn(x)
            samples[name].append(2 * bs / (time.perf_counter() - t))
ds = ImageDataset(list_images(ARGS["data"]), eval_transform_uint8(bb.transform), bb.transform.draft_target())
k = min(len(ds), ARGS.get("decode_images", 96))
torch.set_num_threads(1)
decode = []
for _ in range(2):
    t = time.perf_counter()
    for i in range(k):
        ds[i]
    decode.append((time.perf_counter() - t) / k)
print(json.dumps({"img_s": samples, "setup_s": setup, "decode_s_per_image": decode, "precision": prec,
                  "load_avg_1m": os.getloadavg()[0]}))
"""


def bound_figures(res: dict[str, Any], cores: int) -> dict[str, Any]:
    """Medians of the bound child's samples, and ``1 / (forward_s + decode_s / cores)`` per forward path."""
    import statistics

    med = {k: statistics.median(v) for k, v in res["img_s"].items() if v}
    decode = min(res["decode_s_per_image"])  # the least disturbed of the two passes
    out: dict[str, Any] = {"forward_img_s": med, "decode_ms_per_image_thread": 1000 * decode, "cores": cores}
    out["bound_img_s"] = {k: 1.0 / (1.0 / v + decode / cores) for k, v in med.items()}
    out["library_vs_plain_frozen"] = ratio(med.get("library-compiled", float("nan")), med.get("plain-frozen", 0.0))
    out["setup_s"] = res.get("setup_s", {})
    return out


def run_process(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of ``python -m resnet_transfer <argv>`` from spawn to exit, and its ``compile auto:``
    line (what it chose and from which figures; "" when it did not decide). Raises on a failure."""
    full = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "RT_OFFLINE": "1"}
    full["PYTHONPATH"] = os.pathsep.join([str(REPO), full.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "resnet_transfer", *argv], env=full, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"rt {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    said = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith("compile auto")]
    return dt, said[-1] if said else ""


def process_argv(data: str, out: str, model: str, size: int | None, compile: str) -> list[str]:
    argv = ["extract", "--data", data, "--out", out, "--model", model, "--weights", "none", "--overwrite"]
    return [*argv, *(["--image-size", str(size)] if size else []), "--compile", compile]


def summary_lines(entry: dict[str, Any]) -> list[str]:
    """The bound and ours against it, for the human summary."""
    b = entry.get("bound")
    if not b:
        return []
    f, bound = b["forward_img_s"], b["bound_img_s"]
    lines = [
        "  forward only, random tensors, img/s: "
        + ", ".join(f"{k} {fmt(v)}" for k, v in f.items())
        + f"; library compiled / plain frozen compile {fmt(b['library_vs_plain_frozen'], 2)} (needs >= 0.9)",
        f"  decode + resize per image per thread {fmt(b['decode_ms_per_image_thread'], 2)} ms; bound "
        f"1/(forward + decode/{b['cores']}), img/s: " + ", ".join(f"{k} {fmt(v)}" for k, v in bound.items()),
    ]
    x, m = entry["detail_median"], entry["img_s_whole_run_median"]
    ref = bound.get("library-compiled", float("nan"))
    cells = []
    for side in ("ours", "ours-compiled-warm", "ours-compiled-cold"):
        if f"{side}:steady" in x:
            cells.append(f"{side} steady {fmt(x[f'{side}:steady'])} = {fmt(ratio(x[f'{side}:steady'], ref), 2)}x")
    for side in ("rt-process-auto", "rt-process-on"):
        if side in m:
            cells.append(f"{side} whole process {fmt(m[side])} = {fmt(ratio(m[side], ref), 2)}x")
    if "int8" in bound:
        cells.append(f"(the int8 bound: {fmt(bound['int8'])})")
    lines.append("  vs the compiled bound: " + "; ".join(cells))
    return lines
