"""`rt predict` and `rt evaluate`: load a head (or finetuned model) directory and use it.

A ``head`` directory (from `rt fit-head`) is paired with the backbone its identity names, rebuilt with
:func:`backbones.backbone_from_identity` (``weights`` overrides where a checkpoint moved; what loads must
match what was recorded). A ``finetuned`` directory (from `rt finetune`) carries its own
``backbone.safetensors``. Images go through the recorded eval transform (optionally flip / ten-crop
test-time augmentation, probabilities averaged), bf16 autocast + channels_last where the device has it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, UsageError
from .fsutil import atomic_write_json
from .report import get_reporter

TTA_MODES = (None, "none", "flip", "tencrop")


@dataclass
class LoadedModel:
    """A model directory ready to run: its metadata, the backbone, and the head module."""

    md: Any  # modeldir.ModelDir
    backbone: Any  # backbones.Backbone
    head: Any  # head.HeadModule
    classifier: Any = None  # classifier.Classifier over backbone.net and head (honours a head's `features`)

    @property
    def classes(self) -> list[str]:
        return list(self.md.classes)


def load_model(model_dir: str | Path, weights: str | None = None) -> LoadedModel:
    """Read ``model_dir`` and build its backbone and head (CPU, eval mode): :func:`modeldir.load_classifier`."""
    from .modeldir import load_classifier

    clf, md = load_classifier(model_dir, weights)
    return LoadedModel(md, clf.backbone, clf.head, clf)


def _gather(inputs: list[str | Path], classes: list[str] | None, allow_outside: bool) -> Any:
    """One :class:`ImageList` (absolute paths) for files, folders and manifests given together."""
    from .data import ImageList, list_images

    if not inputs:
        raise UsageError("no images given", "pass image files, folders or a .csv manifest")
    paths: list[str] = []
    labels: list[int] = []
    notes: list[str] = []
    class_names = list(classes or [])
    for inp in inputs:
        il = list_images(inp, classes=classes, allow_outside=allow_outside)
        notes += il.notes
        root = Path(il.root).resolve()
        for rel, lab in zip(il.paths, il.labels):
            p = Path(rel)
            paths.append(str(p if p.is_absolute() else root / p))
            labels.append(lab)
        if classes is None and il.classes:
            class_names = class_names or list(il.classes)
    return ImageList(Path("/"), paths, labels, class_names, "inputs", notes)


def _probabilities(
    model: LoadedModel,
    images: Any,
    tta: str | None,
    batch_size: int,
    device: str,
    precision: str,
    max_pixels: int | None,
    compile: str = "auto",
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Softmax probabilities for every readable image: ``(probs (m, k), indices into images, skipped)``."""
    import torch

    from .compiled import compiled_forward
    from .data import (
        DEFAULT_MAX_PIXELS,
        ImageDataset,
        eval_transform_uint8,
        iter_batches,
        normalize_batch,
        tta_transform,
    )
    from .runtime import decode_threads, resolve_device, resolve_precision

    mode = None if tta in (None, "none") else tta
    if mode not in TTA_MODES:
        raise UsageError(f"--tta {tta!r} is not known", "use --tta flip or --tta tencrop (or omit it)")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be at least 1")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    tcfg = model.backbone.transform
    # plain prediction: uint8 crops decoded by threads, normalised per batch on the device (as extract);
    # TTA views are float tensors made by torch ops, which stay in this thread
    transform = tta_transform(tcfg, mode) if mode else eval_transform_uint8(tcfg)
    views = {None: 1, "flip": 2, "tencrop": 10}[mode]
    per_batch = max(1, batch_size // views)
    dataset = ImageDataset(images, transform, tcfg.draft_target(), max_pixels or DEFAULT_MAX_PIXELS)
    loader = iter_batches(dataset, per_batch, 0 if mode else decode_threads())
    net = model.backbone.net.to(dev).eval().to(memory_format=torch.channels_last)
    head = model.head.to(dev).eval()
    fwd = compiled_forward(net, dev, prec, compile, len(images) * views, model.backbone.identity.to_json())
    probs: list[np.ndarray] = []
    good: list[int] = []
    skipped: list[tuple[str, str]] = []
    rep = get_reporter()
    with rep.progress("predict", total=len(images), unit="img") as bar, torch.inference_mode():
        for xs, idx, errors in loader:
            for i, e in zip(idx, errors):
                if e:
                    skipped.append((images.paths[i], e))
            if xs is not None:
                n = xs.shape[0]
                if mode:  # (n, views, C, H, W) -> (n * views, C, H, W)
                    xs = xs.reshape(-1, *xs.shape[2:])
                xs = xs.to(dev)
                xs = (
                    xs.contiguous(memory_format=torch.channels_last)
                    if mode
                    else normalize_batch(xs, tcfg, memory_format=torch.channels_last)
                )
                feats = fwd(xs)
                p = torch.softmax(head(feats).float(), 1)
                if mode:
                    p = p.reshape(n, views, -1).mean(1)
                probs.append(p.cpu().numpy())
                good += [i for i, e in zip(idx, errors) if not e]
            bar.advance(len(idx))
    k = len(model.classes)
    return (np.concatenate(probs) if probs else np.zeros((0, k), np.float32)), good, skipped


@dataclass
class PredictResult:
    """``rows``: one dict per readable image (path, top list of (class, probability)); ``skipped``:
    ``(path, reason)`` for images that could not be read."""

    rows: list[dict[str, Any]]
    skipped: list[tuple[str, str]]
    classes: list[str]
    probabilities: np.ndarray
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def predict(
    model_dir: str | Path,
    inputs: list[str | Path],
    *,
    tta: str | None = None,
    top: int = 5,
    weights: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    allow_outside: bool = False,
    max_pixels: int | None = None,
    compile: str = "auto",
) -> PredictResult:
    """Classify images (files, folders, CSV manifests) with the head/model in ``model_dir``.

    Unreadable images are skipped and listed in the result (and as warnings), never fatal."""
    if top < 1:
        raise UsageError(f"--top {top} must be at least 1")
    t0 = time.perf_counter()
    model = load_model(model_dir, weights)
    images = _gather(list(inputs), None, allow_outside)
    rep = get_reporter()
    for note in images.notes:
        rep.warn(note)
    probs, good, skipped = _probabilities(model, images, tta, batch_size, device, precision, max_pixels, compile)
    classes = model.classes
    k = min(top, len(classes))
    rows = []
    for r, i in enumerate(good):
        order = np.argsort(-probs[r], kind="stable")[:k]
        rows.append(
            {
                "path": images.paths[i],
                "prediction": classes[order[0]],
                "probability": float(probs[r, order[0]]),
                "top": [(classes[j], float(probs[r, j])) for j in order],
            }
        )
    if skipped:
        rep.warn(f"{len(skipped)} image(s) could not be read and were skipped:")
        for p, reason in skipped[:20]:
            rep.warn(f"  {p}: {reason}")
    return PredictResult(rows, skipped, classes, probs, time.perf_counter() - t0, images.notes)


@dataclass
class EvaluateResult:
    report: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def evaluate(
    model_dir: str | Path,
    *,
    data: str | Path | None = None,
    cache: str | Path | None = None,
    tta: str | None = None,
    weights: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    out: str | Path | None = None,
    allow_outside: bool = False,
    max_pixels: int | None = None,
) -> EvaluateResult:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix of ``model_dir`` on a labelled
    image folder / manifest (``data``) or a feature cache (``cache``, checked against the head's
    backbone identity). ``out``: also write ``report.json`` and ``confusion.png`` there."""
    from .report import classification_metrics, plot_confusion

    if (data is None) == (cache is None):
        raise UsageError("give exactly one of --data (images) or --cache (features)", "e.g. --data ./pets-test")
    t0 = time.perf_counter()
    rep = get_reporter()
    skipped: list[tuple[str, str]] = []
    if cache is not None:
        from .cache import FeatureCache
        from .head import build_head_module, predict_logits
        from .modeldir import HEAD_FILE, read_model_dir

        if tta not in (None, "none"):
            raise UsageError("--tta needs images: a cache holds one feature vector per image", "drop --tta")
        md = read_model_dir(model_dir)
        classes = list(md.classes)
        with FeatureCache(cache) as fc:
            fc.check_identity(md.identity, f"the head in {md.path}")
            rows, y = fc.labelled_as(
                classes, f"--cache {cache} (classes of the head)", "evaluate on labelled images of the head's classes"
            )
            X = fc.features(rows)
            source = str(fc.path)
        head = build_head_module(md.head_config)
        head.load_state_dict(md.load_tensors(HEAD_FILE))
        pred = predict_logits(head, X).argmax(1)
    else:
        assert data is not None
        model = load_model(model_dir, weights)
        md = model.md
        classes = model.classes
        images = _gather([data], classes, allow_outside)
        for note in images.notes:
            rep.warn(note)
        labelled = [i for i, lab in enumerate(images.labels) if lab >= 0]
        if not labelled:
            raise DataError(
                f"--data {data}: no labelled images (evaluate needs one sub-folder per class, or path,label rows)",
                "use `rt predict` for unlabelled images",
            )
        if len(labelled) < len(images):
            rep.warn(f"{len(images) - len(labelled)} unlabelled image(s) ignored")
        images = images.subset(labelled)
        probs, good, skipped = _probabilities(model, images, tta, batch_size, device, precision, max_pixels)
        if skipped:
            rep.warn(f"{len(skipped)} image(s) could not be read and were left out:")
            for p, reason in skipped[:20]:
                rep.warn(f"  {p}: {reason}")
        if not good:
            raise DataError(f"--data {data}: none of the images could be read", "check the files")
        y = np.asarray([images.labels[i] for i in good], dtype=np.int64)
        pred = probs.argmax(1)
        source = str(data)
    metrics = classification_metrics(y, pred, classes)
    report = {
        "kind": "evaluate",
        "model": str(md.path),
        "source": source,
        "tta": tta if tta not in (None, "none") else None,
        **metrics,
        "skipped": [list(s) for s in skipped],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if out is not None:
        od = Path(out)
        od.mkdir(parents=True, exist_ok=True)
        atomic_write_json(od / "report.json", report)
        plot_confusion(metrics["confusion_matrix"], classes, od / "confusion.png", title=f"{md.path.name} on {source}")
    return EvaluateResult(report, skipped)
