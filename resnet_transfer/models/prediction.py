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

from ..base import DataError, UsageError, atomic_write_json, get_reporter
from .config import EvaluateConfig, PredictConfig

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
    from .loading import load_classifier

    clf, md = load_classifier(model_dir, weights)
    return LoadedModel(md, clf.backbone, clf.head, clf)


def _gather(inputs: list[str | Path], classes: list[str] | None, allow_outside: bool) -> Any:
    """One :class:`ImageList` for files, folders and manifests given together. Its paths are written as
    the user gave them (an image file as typed; a folder's or manifest's images joined to the folder or the
    manifest's folder as typed), so relative inputs stay relative; the root is the working directory."""
    import os

    from ..images import ImageList, list_images

    if not inputs:
        raise UsageError("no images given", "pass image files, folders or a .csv manifest")
    paths: list[str] = []
    labels: list[int] = []
    notes: list[str] = []
    class_names = list(classes or [])
    for inp in inputs:
        il = list_images(inp, classes=classes, allow_outside=allow_outside)
        if il.reader is not None:  # an archive, shards or a dataset: its members, read in place
            if len(inputs) > 1:
                raise UsageError(
                    f"{inp}: a {il.source} source is read on its own", "give it alone, or predict each input apart"
                )
            return il
        notes += il.notes
        given = os.fspath(inp)
        if il.source == "file":
            paths.append(given)
            labels += il.labels
        else:
            base = given if il.source == "folder" else os.path.dirname(given)
            paths += [rel if os.path.isabs(rel) else os.path.join(base, rel) for rel in il.paths]
            labels += il.labels
        if classes is None and il.classes:
            class_names = class_names or list(il.classes)
    return ImageList(Path("."), paths, labels, class_names, "inputs", notes)


def _probabilities(
    model: LoadedModel,
    images: Any,
    tta: str | None,
    batch_size: int,
    device: str,
    precision: str,
    max_pixels: int | None,
    compile: str = "auto",
    features: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Softmax probabilities for every readable image: ``(probs (m, k), indices into images, skipped)``.
    The head's ``predict_proba`` (its temperature applied); test-time views are averaged in probability.
    ``features``: a list that receives the head's input features of each batch (views averaged)."""
    import torch

    from ..backbone import forward_images
    from ..base import resolve_device, resolve_precision

    mode = None if tta in (None, "none") else tta
    if mode not in TTA_MODES:
        raise UsageError(f"--tta {tta!r} is not known", "use --tta flip or --tta tencrop (or omit it)")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be at least 1")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    head = model.head.to(dev).eval()
    # a head on several stages' pooled features: the classifier's own pooling (else the backbone's forward)
    pooled = model.classifier.pooled if getattr(model.classifier, "features", None) else None
    probs: list[np.ndarray] = []
    good: list[int] = []
    skipped: list[tuple[str, str]] = []
    batches = forward_images(
        model.backbone,
        images,
        batch_size=batch_size,
        device=dev,
        precision=prec,
        view=mode,
        pooled=pooled,
        max_pixels=max_pixels,
        compile=compile,
    )
    with get_reporter().progress("predict", total=len(images), unit="img") as bar, torch.inference_mode():
        for b in batches:
            skipped += [(images.paths[i], e) for i, e in b.skipped]
            if b.features is not None:
                feats = b.features.reshape(-1, b.features.shape[-1])
                p = head.predict_proba(feats)  # softmax(logits / the head's temperature)
                if mode:
                    p = p.reshape(len(b.ok), -1, p.shape[-1]).mean(1)
                probs.append(p.float().cpu().numpy())
                if features is not None:  # for the out-of-distribution score (unknown.py)
                    features.append(feats.reshape(len(b.ok), -1, feats.shape[-1]).float().mean(1).cpu().numpy())
                good += b.ok
            bar.advance(len(b.indices))
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


def predict(cfg: PredictConfig) -> PredictResult:
    """Classify images (files, folders, CSV manifests) with the head/model in ``model_dir``.

    Unreadable images are skipped and listed in the result (and as warnings), never fatal. With
    ``min_confidence``, rows whose top probability is below it are marked ``uncertain`` (see
    :func:`calibration.mark_uncertain`)."""
    if cfg.top < 1:
        raise UsageError(f"--top {cfg.top} must be at least 1")
    t0 = time.perf_counter()
    model = load_model(cfg.model_dir, cfg.weights)
    images = _gather(list(cfg.inputs), None, cfg.allow_outside)
    rep = get_reporter()
    for note in images.notes:
        rep.warn(note)
    from .unknown import load_scorer, mark_unknown

    ood, feats = load_scorer(model.md, cfg), []  # the out-of-distribution scorer (head/ood.py), if stored
    probs, good, skipped = _probabilities(
        model,
        images,
        cfg.tta,
        cfg.batch_size,
        cfg.device,
        cfg.precision,
        cfg.max_pixels,
        cfg.compile,
        feats if ood else None,
    )
    classes = model.classes
    k = min(cfg.top, len(classes))
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
    from ..head import mark_uncertain

    mark_uncertain(rows, cfg.min_confidence)
    mark_unknown(rows, ood, np.concatenate(feats) if feats else np.zeros((0, 1), np.float32), model.head, cfg)
    rep.skipped(skipped, "image(s) could not be read and were skipped")
    return PredictResult(rows, skipped, classes, probs, time.perf_counter() - t0, images.notes)


@dataclass
class EvaluateResult:
    report: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix of ``model_dir`` on a labelled
    image folder / manifest (``data``) or a feature cache (``cache``, checked against the head's
    backbone identity). ``out``: also write ``report.json`` and ``confusion.png`` there. The report also
    holds log-loss / ECE (and ``reliability.png``), the kNN beside the head (``--cache`` only) and, with
    ``worst``, ``worst.png`` of the most confidently wrong images (:func:`insights.evaluation_extras`)."""
    from ..base import classification_metrics, plot_confusion

    if (cfg.data is None) == (cfg.cache is None):
        raise UsageError("give exactly one of --data (images) or --cache (features)", "e.g. --data ./pets-test")
    t0 = time.perf_counter()
    if cfg.cache is not None:
        if cfg.tta not in (None, "none"):
            raise UsageError("--tta needs images: a cache holds one feature vector per image", "drop --tta")
        ev = _scores_on_cache(cfg.model_dir, cfg.cache, cfg.root)
    else:
        ev = _scores_on_images(cfg)
    md, classes, y, pred, logits, X, files, source, skipped, missing, ood_in = ev
    metrics = classification_metrics(y, pred, classes)
    report = {
        "kind": "evaluate",
        "model": str(md.path),
        "source": source,
        "tta": cfg.tta if cfg.tta not in (None, "none") else None,
        **metrics,
        "skipped": [list(s) for s in skipped],
    }
    from .insights import evaluation_extras

    report.update(
        evaluation_extras(
            md,
            y,
            logits,
            features=X,
            paths=files,
            missing=missing,
            out=cfg.out,
            worst=cfg.worst,
            knn=cfg.knn,
            knn_cache=cfg.knn_cache,
            knn_search=cfg.knn_search,
            title=f"{md.path.name} on {source}",
        )
    )
    if cfg.ood is not None:  # images of none of the classes: the out-of-distribution scorers (unknown.py)
        from .unknown import ood_evaluation

        report["ood"] = ood_evaluation(cfg, md, *ood_in, y, cfg.out)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if cfg.out is not None:
        od = Path(cfg.out)
        od.mkdir(parents=True, exist_ok=True)
        atomic_write_json(od / "report.json", report)
        plot_confusion(metrics["confusion_matrix"], classes, od / "confusion.png", title=f"{md.path.name} on {source}")
    return EvaluateResult(report, skipped)


def _scores_on_cache(model_dir: str | Path, cache: str | Path, root: str | Path | None) -> tuple[Any, ...]:
    """`rt evaluate --cache`: the head on a cache's labelled features (no backbone is built)."""
    from ..cache import FeatureCache
    from ..head import HEAD_FILE, build_head_module, predict_logits, read_model_dir
    from ..images import image_root

    md = read_model_dir(model_dir)
    classes = list(md.classes)
    with FeatureCache(cache) as fc:
        fc.check_identity(md.identity, f"the head in {md.path}")
        rows, y = fc.labelled_as(
            classes, f"--cache {cache} (classes of the head)", "evaluate on labelled images of the head's classes"
        )
        X = fc.features(rows, stage=md.head_config.get("features"))
        source = str(fc.path)
        found = image_root(fc, root)
        files = found.resolve([fc.paths[i] for i in rows])
    head = build_head_module(md.head_config)
    head.load_state_dict(md.load_tensors(HEAD_FILE))
    logits = predict_logits(head, X)
    missing = "" if found.found else found.missing(f"--cache {cache}")
    return md, classes, y, logits.argmax(1), logits, X, files, source, [], missing, (X, logits)


def _scores_on_images(cfg: EvaluateConfig) -> tuple[Any, ...]:
    """`rt evaluate --data`: the model on labelled images (unreadable ones left out and listed)."""
    from ..head import head_temperature, log_probabilities

    rep = get_reporter()
    model = load_model(cfg.model_dir, cfg.weights)
    md = model.md
    classes = model.classes
    images = _gather([cfg.data], classes, cfg.allow_outside)
    for note in images.notes:
        rep.warn(note)
    labelled = [i for i, lab in enumerate(images.labels) if lab >= 0]
    if not labelled:
        raise DataError(
            f"--data {cfg.data}: no labelled images (evaluate needs one sub-folder per class, or path,label rows)",
            "use `rt predict` for unlabelled images",
        )
    if len(labelled) < len(images):
        rep.warn(f"{len(images) - len(labelled)} unlabelled image(s) ignored")
    images = images.subset(labelled)
    feats: list[np.ndarray] | None = [] if cfg.ood is not None else None  # for --ood (unknown.py)
    probs, good, skipped = _probabilities(
        model, images, cfg.tta, cfg.batch_size, cfg.device, cfg.precision, cfg.max_pixels, features=feats
    )
    rep.skipped(skipped, "image(s) could not be read and were left out")
    if not good:
        raise DataError(f"--data {cfg.data}: none of the images could be read", "check the files")
    y = np.asarray([images.labels[i] for i in good], dtype=np.int64)
    # _probabilities gives softmax(z / T); times T its logs are the untempered logits z up to a per-row
    # constant, which is what the extras expect (they apply the head's temperature themselves)
    logits = log_probabilities(probs) * head_temperature(md.head_config)
    files = [images.file(i) for i in good]  # files, or members of a source (the worst-images sheet reads them)
    ood_in = None
    if feats:  # the features and untempered logits of the known images (--ood, unknown.py)
        from .unknown import head_logits

        ood_in = (np.concatenate(feats), head_logits(model.head, np.concatenate(feats)))
    return md, classes, y, probs.argmax(1), logits, None, files, str(cfg.data), skipped, "", ood_in
