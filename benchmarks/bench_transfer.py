"""The transfer suite: rt's defaults against fastai's ``vision_learner`` + ``fine_tune`` on small tasks the
project draws itself (benchmarks/transfer_tasks.py), same images, same source weights, same test set, same
epochs, several seeds each.

Per task and seed:

* rt, as a user runs it (each a fresh `rt` process, start-up included in the wall time):
  ``rt extract`` (the training images, source backbone) -> ``rt fit-head --no-hflip`` (the probe) ->
  ``rt finetune HEAD --unfreeze auto --epochs E --no-hflip``; then the probe's and the finetuned model's test
  accuracy (not timed).
* fastai 2.8: ``vision_learner(dls, resnet18, pretrained=False)`` with the source checkpoint's weights
  loaded into its body, the same normalisation, ``aug_transforms(do_flip=False)``, 20% validation split,
  ``fine_tune(E)`` (one frozen epoch, then E unfrozen ones: fastai's own definition of E epochs); the
  training time is ``fine_tune``'s alone. Batch size 64 (fastai's default), lowered to half the training
  images for tiny tasks (fastai drops the last partial batch: 64 would leave no step at all).

The source backbone: a ResNet-18 trained from scratch by ``rt finetune --weights none --unfreeze all`` on
digits 0-6 drawn on other photographs (transfer_tasks.write_source), cached under ``--work`` keyed by its
settings. Results: JSON lines with every seed's figures, and a markdown table (mean ± 95% t-interval).

    python -m benchmarks transfer                    # the suite: 7 tasks x 3 seeds
    python -m benchmarks transfer --quick            # 2 tasks x 3 seeds (a smoke run)
    python -m benchmarks transfer --tasks digits3-k50-64px --seeds 5 --rt-args "--lr 2e-3"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:  # run as `python -m benchmarks transfer` (package) or as a script
    from benchmarks import transfer_tasks as tt
    from benchmarks.common import command_line, machine_info
except ImportError:  # pragma: no cover - script mode
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import transfer_tasks as tt
    from benchmarks.common import command_line, machine_info

SOURCE = {"size": 32, "scans": 120, "renders": 2, "epochs": 4, "lr": 4e-3, "batch": 128}


def rt(*args: str, log: Path) -> float:
    """Run one `rt` command in a fresh process (this checkout's package); its wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(tt.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ rt " + shlex.join(args) + "\n")
        f.flush()
        p = subprocess.run([sys.executable, "-m", "resnet_transfer", *args], stdout=f, stderr=f, env=env)
    if p.returncode not in (0, 3):
        raise RuntimeError(f"rt {' '.join(args)} failed ({p.returncode}); see {log}")
    return time.perf_counter() - t0


def source_model(work: Path, given: Path | None = None) -> Path:
    """The source ResNet-18 (trained once per settings, reused by later runs), or ``given``: a source model
    directory trained earlier (e.g. recipes/offline_digits/run.sh's models/source)."""
    if given is not None:
        if not (given / "backbone.safetensors").exists():
            raise SystemExit(f"--source {given}: no backbone.safetensors (give an `rt finetune` output directory)")
        return given
    key = "-".join(f"{k}{v}" for k, v in SOURCE.items())
    out = work / "source" / key / "model"
    if (out / "meta.json").exists():
        return out
    data = tt.write_source(work / "source" / key, SOURCE["size"], SOURCE["scans"], SOURCE["renders"])
    rt("finetune", "--data", str(data), "--model", "resnet18", "--weights", "none", "--unfreeze", "all",
       "--image-size", str(SOURCE["size"]), "--epochs", str(SOURCE["epochs"]), "--batch-size", str(SOURCE["batch"]),
       "--lr", str(SOURCE["lr"]), "--warmup-epochs", "0.5", "--crop-scale", "0.6", "--no-hflip",
       "--label-smoothing", "0", "--patience", "0", "--checkpoint-every", "0", "--out", str(out), "--overwrite",
       log=work / "source" / key / "log.txt")  # fmt: skip
    return out


def test_accuracy(model_dir: Path, test_dir: Path) -> float:
    """Top-1 accuracy of an rt head/model directory on an image folder (rt's eval transform)."""
    import torch

    from resnet_transfer.images import eval_transform, load_image
    from resnet_transfer.models import load_classifier

    clf, md = load_classifier(model_dir)
    tf = eval_transform(clf.backbone.transform)
    correct = n = 0
    with torch.inference_mode():
        for ci, c in enumerate(md.classes):
            files = sorted((test_dir / c).glob("*.png"))
            x = torch.stack([tf(load_image(f)) for f in files])
            correct += int((clf.eval()(x).argmax(1) == ci).sum())
            n += len(files)
    return correct / max(1, n)


def run_rt(train: Path, test: Path, src: Path, size: int, epochs: int, seed: int, work: Path, extra: list[str],
           head_extra: Sequence[str] = ()) -> dict:  # fmt: skip
    log = work / "log.txt"
    work.mkdir(parents=True, exist_ok=True)
    seconds = rt("extract", "--data", str(train), "--model", "resnet18", "--weights", str(src), "--image-size",
                 str(size), "--out", str(work / "train.h5"), "--overwrite", log=log)  # fmt: skip
    seconds += rt("fit-head", "--cache", str(work / "train.h5"), "--seed", str(seed), "--out", str(work / "head"),
                  "--no-hflip", "--overwrite", *head_extra, log=log)  # fmt: skip
    seconds += rt("finetune", str(work / "head"), "--data", str(train), "--unfreeze", "auto", "--epochs", str(epochs),
                  "--no-hflip", "--seed", str(seed), "--out", str(work / "ft"), "--overwrite", *extra, log=log)  # fmt: skip
    report = json.loads((work / "ft" / "report.json").read_text())
    return {
        "rt_probe": test_accuracy(work / "head", test),
        "rt_finetune": test_accuracy(work / "ft", test),
        "rt_seconds": seconds,
        "unfreeze": report["unfreeze"],
        "kept_start": report.get("kept_start"),
        "best_epoch": report["best_epoch"],
        "rt_val_acc": report.get("accuracy"),
        "rt_val_loss": report.get("val_loss"),
        "rt_n_val": report.get("n_val"),
    }


def run_rt_one_command(train: Path, test: Path, src: Path, size: int, epochs: int, seed: int, work: Path,
                       extra: list[str]) -> dict:  # fmt: skip
    """`rt finetune --data --weights` alone: the probe fitted in-process (OUT/start), one start-up."""
    out = work / "ft1"
    seconds = rt("finetune", "--data", str(train), "--model", "resnet18", "--weights", str(src), "--image-size",
                 str(size), "--unfreeze", "auto", "--epochs", str(epochs), "--no-hflip", "--seed", str(seed),
                 "--out", str(out), "--overwrite", *extra, log=work / "log.txt")  # fmt: skip
    return {"rt1_finetune": test_accuracy(out, test), "rt1_seconds": seconds}


def run_fastai(train: Path, test: Path, src: Path, size: int, epochs: int, seed: int, workers: int | None = 0) -> dict:
    """fastai's vision_learner + fine_tune(epochs) on the same images and source weights."""
    try:
        import torchvision
        from fastai.vision.all import (
            CategoryBlock,
            DataBlock,
            ImageBlock,
            Normalize,
            RandomSplitter,
            Resize,
            aug_transforms,
            get_image_files,
            parent_label,
            set_seed,
            vision_learner,
        )  # fmt: skip
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(f"the transfer benchmark needs fastai: pip install -e '.[bench]' ({exc})") from exc
    from safetensors.torch import load_file

    meta = json.loads((src / "meta.json").read_text())
    tfm = meta["backbone"]["transform"] if "backbone" in meta else meta["identity"]["transform"]
    set_seed(seed)
    n_train = sum(1 for _ in train.rglob("*.png"))
    bs = min(64, max(4, int(n_train * 0.8) // 2))
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
        splitter=RandomSplitter(0.2, seed=seed), item_tfms=Resize(size),
        batch_tfms=[*aug_transforms(do_flip=False), Normalize.from_stats(tfm["mean"], tfm["std"])],
    )  # fmt: skip
    dls = block.dataloaders(train, bs=bs, **({} if workers is None else {"num_workers": workers}))
    t0 = time.perf_counter()
    learn = vision_learner(dls, torchvision.models.resnet18, pretrained=False, normalize=False)
    state = load_file(str(src / "backbone.safetensors"))
    body = {}
    for k, v in state.items():
        top, _, rest = k.partition(".")
        idx = {"conv1": 0, "bn1": 1}.get(top, int(top[-1]) + 3 if top.startswith("layer") else None)
        if idx is not None:
            body[f"{idx}.{rest}"] = v
    learn.model[0].load_state_dict(body)
    t1 = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(epochs)
    t2 = time.perf_counter()
    files = sorted(test.rglob("*.png"))
    with learn.no_bar():
        probs, _ = learn.get_preds(dl=learn.dls.test_dl(files))
    vocab = list(learn.dls.vocab)
    pred = [vocab[i] for i in probs.argmax(1).tolist()]
    acc = sum(p == f.parent.name for p, f in zip(pred, files)) / len(files)
    out = {"fastai": acc, "fastai_seconds": t2 - t1, "fastai_setup_seconds": t1 - t0, "fastai_bs": bs}
    return out | {"fastai_workers": "default" if workers is None else workers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(tt.QUICK)}")
    p.add_argument("--full", action="store_true", help="all tasks (the default)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--work", type=Path, default=Path("runs/bench_transfer"))
    p.add_argument("--source", type=Path, default=None, help="a source model directory to reuse (skips training)")
    p.add_argument("--rt-args", default="", help="extra `rt finetune` options (to try other settings)")
    p.add_argument("--head-args", default="", help='extra `rt fit-head` options (e.g. "--views 0")')
    p.add_argument("--no-fastai", action="store_true", help="rt only")
    p.add_argument(
        "--one-command", action="store_true",
        help="also time `rt finetune --data --weights` alone (the probe fitted in the same process)",
    )  # fmt: skip
    p.add_argument(
        "--fastai-workers", default="0",
        help="fastai's DataLoader num_workers: 0 or `default` (fastai's own); a comma list times each, "
        "the first in the table",
    )  # fmt: skip
    p.add_argument("--label", default="defaults", help="a name for this configuration in the JSON")
    p.add_argument("--json", type=Path, default=None, help="append the per-seed rows here (JSON lines)")
    p.add_argument("--md", type=Path, default=None, help="write the table here")
    p.add_argument("--table-from", type=Path, default=None, help="only print the table of saved rows (JSON lines)")
    p.add_argument(
        "--variants-from", type=Path, nargs="+", default=None,
        help="only print the paired table of saved rows (JSON lines): each label against the `defaults` rows",
    )  # fmt: skip
    a = p.parse_args(argv)
    if a.variants_from is not None:
        rows = [json.loads(ln) for f in a.variants_from for ln in f.read_text().splitlines() if ln.strip()]
        rows = [r for r in rows if not a.tasks or r["task"] in a.tasks.split(",")]
        print(tt.variants_table(rows))
        return 0
    if a.table_from is not None:
        rows = [json.loads(line) for line in a.table_from.read_text().splitlines() if line.strip()]
        for label in dict.fromkeys(r.get("label", "defaults") for r in rows):
            print(f"{label}:\n\n" + tt.table([r for r in rows if r.get("label", "defaults") == label]) + "\n")
        return 0
    names = a.tasks.split(",") if a.tasks else list(tt.QUICK if a.quick else [t.name for t in tt.TASKS])
    specs = {t.name: t for t in tt.TASKS}
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {', '.join(specs)}")
    a.work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    src = source_model(a.work, a.source)
    print(f"source model: {src} ({time.perf_counter() - t0:.0f} s)", flush=True)
    extra = shlex.split(a.rt_args)
    rows: list[dict[str, Any]] = []
    for name in names:
        spec = specs[name]
        for seed in range(a.seeds):
            train, test = tt.write_task(spec, a.work / "tasks" / name, seed)
            row: dict[str, Any] = {
                "task": name,
                "seed": seed,
                "label": a.label,
                "source": str(src),
                "epochs": a.epochs,
                "rt_args": a.rt_args,
                "head_args": a.head_args,
            }
            row |= run_rt(
                train, test, src, spec.size, a.epochs, seed, a.work / "runs" / a.label / name / f"s{seed}", extra,
                shlex.split(a.head_args),
            )  # fmt: skip
            if a.one_command:
                work = a.work / "runs" / a.label / name / f"s{seed}"
                row |= run_rt_one_command(train, test, src, spec.size, a.epochs, seed, work, extra)
            if not a.no_fastai:
                for i, w in enumerate(a.fastai_workers.split(",")):  # the first is the table's column
                    workers = None if w == "default" else int(w)
                    got = run_fastai(train, test, src, spec.size, a.epochs, seed, workers)
                    row |= got if i == 0 else {f"fastai_seconds_workers_{w}": got["fastai_seconds"],
                                               f"fastai_workers_{w}": got["fastai"]}  # fmt: skip
            else:
                row |= {"fastai": None, "fastai_seconds": None}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    md = tt.table(rows)
    info = machine_info()
    header = (
        f"`{command_line('transfer', argv)}` — {len(names)} task(s) x {a.seeds} seeds, {a.epochs} epochs, "
        f"{time.perf_counter() - t_all:.0f} s in all; CPU {info.get('cpu')}, load {os.getloadavg()[0]:.1f}"
    )
    print(header + "\n\n" + md)
    if a.md:
        a.md.write_text(header + "\n\n" + md + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
