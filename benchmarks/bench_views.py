"""Does the probe gain from cached features of several augmented views? Measured on the transfer suite.

``python -m benchmarks views --work runs/bench_transfer --source MODEL_DIR [--views 8]`` reads what
``python -m benchmarks transfer`` left under ``--work`` (per task and seed: the training images, the head's
``split.json``) and, per task-seed, computes with the suite's source backbone the eval-crop features of
every training image plus ``--views`` random-resized crops (finetune's default augmentation: scale 0.35-1,
no flip, as the suite runs; ``--crop-scale``) of each image on the *training* side of the head's split. It
fits the linear probe and ``--head auto``'s choice (made on the eval crops, as ``rt fit-head --views`` makes
it; ``--linear-only`` skips it) twice on the same split, once on the eval crops alone, once on the eval
crops plus the views (validation: the eval crops of the validation images only, so no view of a validation
image is trained on), and scores both on the task's fixed test set (eval crops). Printed: test accuracy,
mean ± 95% t-interval over seeds, and the paired difference (views − one view). This is the measurement
behind ``rt fit-head --views`` and its default of none (docs/transfer.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    from benchmarks import transfer_tasks as tt
    from benchmarks.common import command_line, machine_info
except ImportError:  # pragma: no cover - script mode
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import transfer_tasks as tt
    from benchmarks.common import command_line, machine_info


def _features(net: Any, xs: list[Any], tcfg: Any, batch: int = 64) -> np.ndarray:
    """Pooled features of ``uint8`` crops, eval mode, float32."""
    import torch

    from resnet_transfer.images import normalize_batch

    out = []
    with torch.inference_mode():
        for lo in range(0, len(xs), batch):
            x = normalize_batch(torch.stack([t.contiguous() for t in xs[lo : lo + batch]]), tcfg)
            out.append(net(x).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def task_seed(
    run: Path, images: Path, test: Path, source: Path, size: int, views: int, seed: int,
    crop_scale: float = 0.35, heads: tuple[str, ...] = ("linear", "auto"),
) -> dict[str, Any]:  # fmt: skip
    """Test accuracy of the linear and auto heads with one view and with ``views`` more, one task-seed."""
    import torch

    from resnet_transfer.backbone import build_backbone
    from resnet_transfer.cache import FeatureCache
    from resnet_transfer.head import SoftmaxHead, choose_head
    from resnet_transfer.head.choose import head_params
    from resnet_transfer.images import eval_transform_uint8, list_images, load_image, train_transform_uint8

    bb = build_backbone("resnet18", str(source), size)
    net = bb.net.eval()
    tcfg = bb.transform
    eval_tf = eval_transform_uint8(tcfg)
    with FeatureCache(run / "train.h5") as c:
        rows = c.labelled
        keys = [str(c.keys[int(i)]) for i in rows]
        paths = [str(c.paths[int(i)]) for i in rows]
        y = np.asarray(c.labels[rows])
    split = json.loads((run / "head" / "split.json").read_text())
    pos = {k: i for i, k in enumerate(keys)}
    tr = np.array([pos[k] for k in split["train"]])
    va = np.array([pos[k] for k in split["val"]])
    imgs = [load_image(images / p) for p in paths]
    X = _features(net, [eval_tf(im) for im in imgs], tcfg)
    torch.manual_seed(seed)
    aug = train_transform_uint8(tcfg, 0.0, crop_scale, False)
    t0 = time.perf_counter()
    Xv = _features(net, [aug(imgs[i]) for i in tr for _ in range(views)], tcfg)
    view_s = time.perf_counter() - t0
    yv = np.repeat(y[tr], views)
    tl = list_images(test)
    Xt = _features(net, [eval_tf(load_image(tl.file(i))) for i in range(len(tl))], tcfg)
    yt = np.asarray(tl.labels)
    params = {"num_classes": int(y.max()) + 1, "seed": seed}
    out: dict[str, Any] = {"n_train": len(tr), "n_val": len(va), "views": views, "crop_scale": crop_scale}
    out["view_seconds"] = view_s
    for arm, (Xa, ya) in {
        "one": (X[tr], y[tr]),
        "views": (np.concatenate([X[tr], Xv]), np.concatenate([y[tr], yv])),
    }.items():
        lin = SoftmaxHead(**head_params("linear", params, {})).fit(Xa, ya, X[va], y[va])
        out[f"linear_{arm}"] = float((lin.predict(Xt) == yt).mean())
        if "auto" not in heads:
            continue
        chosen = choose_head(X[tr], y[tr], X[va], y[va], params, seed=seed).chosen  # on eval crops, as fit-head
        head = SoftmaxHead(**head_params(chosen, params, {})).fit(Xa, ya, X[va], y[va])
        out[f"auto_{arm}"] = float((head.predict(Xt) == yt).mean())
        out[f"auto_{arm}_chose"] = chosen
    return out


def main(argv: list[str] | None = None) -> int:
    from resnet_transfer.base import Reporter, set_reporter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/bench_transfer"), help="`benchmarks transfer`'s --work")
    p.add_argument("--label", default="defaults")
    p.add_argument("--source", type=Path, required=True, help="the source model the suite used (--source)")
    p.add_argument("--views", type=int, default=8, help="augmented views per training image")
    p.add_argument("--crop-scale", type=float, default=0.35, help="the views' smallest crop area fraction")
    p.add_argument("--linear-only", action="store_true", help="skip --head auto's choice (faster)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all the work dir has)")
    p.add_argument("--json", type=Path, default=None, help="append the rows here (JSON lines)")
    p.add_argument("--quick", action="store_true", help="the suite's two quick tasks only")
    a = p.parse_args(argv)
    set_reporter(Reporter(verbose=False))
    wanted = set(a.tasks.split(",")) if a.tasks else set(tt.QUICK) if a.quick else None
    rows = []
    for spec in tt.TASKS:
        if wanted is not None and spec.name not in wanted:
            continue
        for run in sorted((a.work / "runs" / a.label / spec.name).glob("s*")):
            seed = int(run.name[1:])
            images = a.work / "tasks" / spec.name / f"seed{seed}" / "train"
            test = a.work / "tasks" / spec.name / "test"
            if not (run / "train.h5").exists() or not images.is_dir():
                continue
            heads = ("linear",) if a.linear_only else ("linear", "auto")
            got = task_seed(run, images, test, a.source, spec.size, a.views, seed, a.crop_scale, heads)
            r = {"task": spec.name, "seed": seed, **got}
            rows.append(r)
            print(json.dumps(r), flush=True)
            if a.json:
                with a.json.open("a") as f:
                    f.write(json.dumps(r) + "\n")
    lines = [
        f"| task | seeds | linear, 1 view | linear, +{a.views} views | difference | auto, 1 view | auto, +{a.views} "
        "views | difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        cells = []
        for h in ("linear", "auto"):
            if f"{h}_one" not in rs[0]:
                cells += ["-", "-", "-"]
                continue
            cells += [tt.fmt_ci([r[f"{h}_one"] for r in rs]), tt.fmt_ci([r[f"{h}_views"] for r in rs])]
            cells.append(tt.fmt_ci([r[f"{h}_views"] - r[f"{h}_one"] for r in rs]))
        lines.append(f"| {task} | {len(rs)} | " + " | ".join(cells) + " |")
    info = machine_info()
    print(f"`{command_line('views', argv)}`; CPU {info.get('cpu')}, load {os.getloadavg()[0]:.1f}\n")
    print("\n".join(lines))
    if rows:
        for h in ("linear", "auto") if "auto_one" in rows[0] else ("linear",):
            d = [r[f"{h}_views"] - r[f"{h}_one"] for r in rows]
            print(f"all {len(rows)} task-seeds, {h}: views − one view {tt.fmt_ci(d)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
