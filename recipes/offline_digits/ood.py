"""Out-of-distribution scores measured on the offline digits task (docs/ood.md).

    python recipes/offline_digits/ood.py RUN_DIR --source-model DIR [--seeds 5]

RUN_DIR/data is make_data.py's output (target/train, target/test). This script draws two sets of images of none
of the target classes with make_data's own pieces: ``near`` = the source digits 0-6 drawn exactly as the target
images are (same scans' size/place/colour rules, the target's photographs), ``far`` = crops of the target's
photographs with no digit. It extracts target train/test, near and far with the source backbone (`rt extract`),
fits one head per seed (`rt fit-head --seed S --val-fraction 0.3`: each seed another training subset and
head, each with its scorers fitted on its own training rows and thresholds on its own validation rows), and
scores the target test set against near and far with every stored scorer (what `rt evaluate --ood` reports).
Writes RUN_DIR/ood/results.json and results.md: AUROC and FPR at 95% TPR per scorer and set, mean with a 95%
t-interval over seeds, and each scorer's paired difference to max-softmax.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_data import TARGET_PHOTOS, DigitsConfig, _background, _write, draw, load_photo
from results import paired_difference, summarise


def make_unknown(out: Path, n: int, size: int, seed: int = 7) -> None:
    """``out/near/x``: digits 0-6 drawn as the target images are; ``out/far/x``: photo crops, no digit."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    photos = [load_photo(p) for p in TARGET_PHOTOS]
    cfg = DigitsConfig(size=size)
    source = np.flatnonzero(digits.target < 7)
    for i in range(n):
        idx = int(rng.choice(source))
        _write(draw(rng, digits.images[idx], photos, cfg), out / "near" / "x", f"n{i:04d}.png")
        crop = _background(rng, photos, size)
        _write(Image.fromarray((crop * 255).round().astype(np.uint8)), out / "far" / "x", f"f{i:04d}.png")


def rt(*args: object) -> None:
    subprocess.run([sys.executable, "-m", "resnet_transfer", *map(str, args)], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--source-model", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--unknown", type=int, default=300, help="images in each of near and far")
    p.add_argument("--size", type=int, default=32)
    a = p.parse_args(argv)
    from resnet_transfer.base import ood_metrics
    from resnet_transfer.cache import FeatureCache
    from resnet_transfer.head import build_head_module, predict_logits, read_model_dir, read_ood

    out = a.run / "ood"
    data = a.run / "data" / "target"
    if not (out / "far").exists():
        make_unknown(out, a.unknown, a.size)
    sets = {"train": data / "train", "test": data / "test", "near": out / "near", "far": out / "far"}
    for name, folder in sets.items():
        if not (out / f"{name}.h5").exists():
            rt("extract", "--data", folder, "--model", "resnet18", "--weights", a.source_model,
               "--image-size", a.size, "--out", out / f"{name}.h5")  # fmt: skip
    feats = {}
    for name in ("test", "near", "far"):
        with FeatureCache(out / f"{name}.h5") as fc:
            feats[name] = fc.features()
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for seed in range(a.seeds):
        head_dir = out / f"head{seed}"
        if not (head_dir / "meta.json").exists():  # --no-hflip: a mirrored 7 is no 7 (the views, as the finetunes)
            rt("fit-head", "--cache", out / "train.h5", "--out", head_dir, "--seed", seed, "--val-fraction", 0.3,
               "--no-hflip", "--overwrite")  # fmt: skip
        md = read_model_dir(head_dir)
        ood = read_ood(head_dir, md.meta)
        head = build_head_module(md.head_config)
        head.load_state_dict(md.load_tensors("head.safetensors"))
        logits = {k: predict_logits(head, v) for k, v in feats.items()}
        for scorer in ood.scorers:
            s_in = ood.score(feats["test"], logits["test"], scorer)
            for unknown in ("near", "far"):
                m = ood_metrics(s_in, ood.score(feats[unknown], logits[unknown], scorer))
                for metric in ("auroc", "fpr_at_95_tpr"):
                    results.setdefault(unknown, {}).setdefault(scorer, {}).setdefault(metric, []).append(m[metric])
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"| set | scorer | AUROC (mean, 95% interval, {a.seeds} seeds) | vs msp | FPR95 | vs msp |",
        "|---|---|---|---|---|---|",
    ]
    for unknown, per in results.items():
        for scorer, ms in per.items():
            cells = []
            for metric in ("auroc", "fpr_at_95_tpr"):
                s = summarise(ms[metric])
                d = paired_difference(ms[metric], per["msp"][metric])
                cells += [
                    f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]",
                    "-" if scorer == "msp" else f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]",
                ]
            lines.append(f"| {unknown} | {scorer} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
