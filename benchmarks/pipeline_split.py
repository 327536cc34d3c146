"""Where the extraction loop loses against ``1 / (forward_s + decode_s / cores)``: one measured variant.

``python benchmarks/pipeline_split.py DATA VARIANT`` runs ResNet-50 (random init), bf16, batch 32 over the
images of the folder DATA through the library's feed and forward (``backbone.forward_images``), then the
same forward on random tensors in the same process, and prints one JSON line: the steady img/s of the loop
(batches after the third, full ones only), per steady batch the seconds inside ``next()`` (decode wait +
normalise + forward), the forward alone, the wait beyond it and the rest of the loop (features to numpy),
and the forward-only rate. VARIANT is a comma list of knobs, empty for the defaults: ``wait=PASSIVE|ACTIVE``
(OpenMP), ``threads=N`` (decode threads), ``nice=0`` (decode threads at normal priority), ``prefetch=N``
(batches decoded ahead; 0 = decode, then forward), ``steal=S`` (seconds before the caller decodes itself),
``compile=on|off``. Run each variant in a fresh process, several times: the spread between runs of one
variant is the yardstick (docs/performance.md, 2026-12-03).
"""

import json
import os
import sys
import time

data, variant = sys.argv[1], sys.argv[2]
knobs = dict(kv.split("=") for kv in variant.split(",") if kv)
os.environ["OMP_WAIT_POLICY"] = knobs.get("wait", "PASSIVE")
from resnet_transfer.base import tune_process  # noqa: E402

tune_process()
import torch  # noqa: E402

import resnet_transfer.base.runtime as runtime  # noqa: E402
import resnet_transfer.images.feed as D  # noqa: E402
from resnet_transfer.backbone import build_backbone, forward_images  # noqa: E402
from resnet_transfer.images import list_images  # noqa: E402

if "threads" in knobs:
    runtime.decode_threads = lambda: int(knobs["threads"])
if knobs.get("nice", "1") == "0":
    D._lower_priority = lambda: None
if "prefetch" in knobs:
    _ib = D.iter_batches
    D.iter_batches = lambda ds, bs, th, prefetch=1: _ib(ds, bs, th, int(knobs["prefetch"]))
if "steal" in knobs:
    D.STEAL_AFTER_S = float(knobs["steal"])

bb = build_backbone("resnet50", "none", None)
images = list_images(data)
mode = knobs.get("compile", "on")
T = {"wait": [], "fwd": [], "rest": [], "n": []}
t_last = None
gen = forward_images(bb, images, batch_size=32, device="cpu", precision="bf16", compile=mode)
import resnet_transfer.backbone.compiled as C  # noqa: E402

_call = C.CompiledForward.__call__
FWD = []


def timed(self, x):
    t = time.perf_counter()
    out = _call(self, x)
    FWD.append(time.perf_counter() - t)
    return out


C.CompiledForward.__call__ = timed
feats = []
t_prev = time.perf_counter()
marks = []
while True:
    t0 = time.perf_counter()
    try:
        b = next(gen)
    except StopIteration:
        break
    t1 = time.perf_counter()
    arr = b.features.cpu().numpy().astype("float16") if b.features is not None else None
    feats.append(arr)
    t2 = time.perf_counter()
    marks.append((t0, t1, t2, len(b.ok)))
# steady: batches after the 3rd (compile and the decision done), full batches only
steady = [m for m in marks[3:] if m[3] == 32]
fw = FWD[3 : 3 + len(steady)]
wall = steady[-1][2] - steady[0][0]
imgs = 32 * len(steady)
total_next = sum(m[1] - m[0] for m in steady)
fwd_s = sum(fw)
rest = sum(m[2] - m[1] for m in steady)
# forward only on random tensors, same process, the library's forward
fn = C.compiled_forward(bb.net, torch.device("cpu"), "bf16", mode, 10**6, bb.identity.to_json(), "resnet50")
x = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    for _ in range(3):
        fn(x)
    rs = []
    for _ in range(4):
        t = time.perf_counter()
        fn(x)
        fn(x)
        rs.append(64 / (time.perf_counter() - t))
rs.sort()
print(
    json.dumps(
        {
            "variant": variant,
            "steady_img_s": imgs / wall,
            "next_s_per_batch": total_next / len(steady),
            "fwd_in_loop_s_per_batch": fwd_s / len(steady),
            "wait_beyond_fwd_s_per_batch": (total_next - fwd_s) / len(steady),
            "rest_s_per_batch": rest / len(steady),
            "forward_only_img_s": rs[len(rs) // 2],
            "fwd_only_s_per_batch": 32 / rs[len(rs) // 2],
            "batches": len(steady),
            "load": os.getloadavg()[0],
        }
    )
)
