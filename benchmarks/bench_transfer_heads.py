"""The two heads `rt fit-head --head auto` chooses between, on the transfer suite's cached features.

``python -m benchmarks transfer_heads --work runs/bench_transfer`` reads what ``python -m benchmarks
transfer`` left under ``--work`` (per task and seed: ``runs/LABEL/TASK/sS/train.h5`` and the head's
``split.json``), extracts each task's fixed test set once with the same source, and fits on the same
training rows (validation rows held out as fit-head holds them out) the linear probe, fastai's MLP head
(``--head mlp``) and what ``--head auto`` chose; test accuracy of each, mean ± 95% t-interval over seeds,
and the paired difference MLP − linear. Seconds, not minutes: only heads are fitted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def _rows(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from resnet_transfer.cache import FeatureCache

    with FeatureCache(path) as c:
        rows = c.labelled
        return c.features(rows), c.labels[rows], [str(c.keys[int(i)]) for i in rows]


def heads_on(run: Path, test: tuple[np.ndarray, np.ndarray], seed: int) -> dict[str, Any]:
    """Test accuracy of the linear, MLP and auto heads fitted on one task-seed's cached training rows."""
    from resnet_transfer.head import SoftmaxHead, choose_head
    from resnet_transfer.head.choose import head_params

    X, y, keys = _rows(run / "train.h5")
    split = json.loads((run / "head" / "split.json").read_text())
    pos = {k: i for i, k in enumerate(keys)}
    tr = np.array([pos[k] for k in split["train"]])
    va = np.array([pos[k] for k in split["val"]])
    params = {"num_classes": int(y.max()) + 1, "seed": seed}
    acc = {}
    for kind in ("linear", "mlp"):
        head = SoftmaxHead(**head_params(kind, params, {})).fit(X[tr], y[tr], X[va], y[va])
        acc[kind] = float((head.predict(test[0]) == test[1]).mean())
    chosen = choose_head(X[tr], y[tr], X[va], y[va], params, seed=seed).chosen
    return {"linear": acc["linear"], "mlp": acc["mlp"], "auto": acc[chosen], "chosen": chosen}


def main(argv: list[str] | None = None) -> int:
    from resnet_transfer.base import Reporter, set_reporter
    from resnet_transfer.cache import ExtractConfig, extract

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/bench_transfer"), help="`benchmarks transfer`'s --work")
    p.add_argument("--label", default="defaults")
    p.add_argument("--source", type=Path, required=True, help="the source model the suite used (--source)")
    p.add_argument("--quick", action="store_true", help="ignored (the heads take seconds)")
    a = p.parse_args(argv)
    set_reporter(Reporter(verbose=False))
    rows = []
    for spec in tt.TASKS:
        runs = sorted((a.work / "runs" / a.label / spec.name).glob("s*"))
        test_dir = a.work / "tasks" / spec.name / "test"
        if not runs or not test_dir.is_dir():
            continue
        test_cache = a.work / "heads" / f"{spec.name}-test.h5"
        extract(ExtractConfig(data=test_dir, out=test_cache, model="resnet18", weights=str(a.source),
                              image_size=spec.size))  # fmt: skip
        Xt, yt, _ = _rows(test_cache)
        for run in runs:
            seed = int(run.name[1:])
            rows.append({"task": spec.name, "seed": seed, **heads_on(run, (Xt, yt), seed)})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| task | seeds | linear | mlp | auto | mlp − linear | auto chose mlp |", "|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        cells = [tt.fmt_ci([r[k] for r in rs]) for k in ("linear", "mlp", "auto")]
        cells.append(tt.fmt_ci([r["mlp"] - r["linear"] for r in rs]))
        cells.append(f"{sum(r['chosen'] == 'mlp' for r in rs)}/{len(rs)}")
        lines.append(f"| {task} | {len(rs)} | " + " | ".join(cells) + " |")
    means = {k: float(np.mean([r[k] for r in rows])) if rows else float("nan") for k in ("linear", "mlp", "auto")}
    info = machine_info()
    print(f"`{command_line('transfer_heads', argv)}`; CPU {info.get('cpu')}, load {os.getloadavg()[0]:.1f}\n")
    print("\n".join(lines))
    print(f"\nall {len(rows)} task-seeds: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
