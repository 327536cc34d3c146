"""The out-of-distribution scorers of a finetuned model (head/ood.py): fitted on the features of the training
rows through the final backbone (one forward pass over the training feed, eval transform, after training),
thresholds on the validation rows, stored in the model directory like `rt fit-head` stores them."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..base import get_reporter


def model_ood(run: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(tensor files, meta.json entries, report)`` for :func:`head.write_model_dir`; empty files and meta
    (and the reason in the report) when there is nothing to fit on."""
    from ..head import fit_ood, ood_tensors

    model, feed = run.model, run.feed
    X, y = _features(model, feed, "train")
    if X is None or not len(X):
        return {}, {}, {"skipped": "no readable training rows to fit the out-of-distribution scorers on"}
    X_val, _ = _features(model, feed, "val")
    get_reporter().info(f"out-of-distribution scorers: features of {len(X)} training rows through the final backbone")
    ood, report = fit_ood(X, y, _logits(model, X), X_val, _logits(model, X_val) if X_val is not None else None)
    files, meta = ood_tensors(ood)
    return files, meta, report


def _logits(model: Any, X: np.ndarray) -> np.ndarray:
    from ..head import predict_logits

    return predict_logits(model.head.cpu().eval(), X)


def _features(model: Any, feed: Any, part: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The head's input features and labels of the feed's ``part`` (train | val) rows, eval mode, CPU."""
    import torch

    model.eval()
    out, labels = [], []
    with torch.inference_mode():
        if feed.kind == "maps":
            rows = feed.train if part == "train" else feed.val
            if rows is None or not len(rows):
                return None, None
            for lo in range(0, len(rows), feed.batch_size):
                maps, y = rows.get(torch.arange(lo, min(lo + feed.batch_size, len(rows))))
                out.append(model.rest(maps.float()).float().numpy())
                labels.append(y.numpy())
        else:
            images = feed.train_list if part == "train" else (feed.val_list if feed.n_val else None)
            if images is None or not len(images):
                return None, None
            from ..backbone import forward_images
            from ..base import resolve_device, resolve_precision

            dev = resolve_device("cpu")
            pooled = model.pooled if model.features else None
            for b in forward_images(
                model.backbone, images, batch_size=feed.batch_size, device=dev,
                precision=resolve_precision("auto", dev), pooled=pooled, compile="off",
            ):  # fmt: skip
                if b.features is not None:
                    out.append(b.features.float().cpu().numpy())
                    labels.append(np.asarray([images.labels[i] for i in b.ok]))
    if not out:
        return None, None
    return np.concatenate(out), np.concatenate(labels)
