"""Turning a head or model directory into a runnable :class:`Classifier` (backbone + head)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..base import IdentityMismatch, ModelDirError, UsageError
from ..head import ModelDir


def load_classifier(
    model_dir: str | Path, weights: str | None = None, *, normalize: bool = False
) -> tuple[Any, ModelDir]:
    """The directory's backbone + head as one :class:`~resnet_transfer.classifier.Classifier` (CPU, eval
    mode), and the parsed directory.

    A ``head`` directory is paired with the backbone its identity names (``weights`` overrides where the
    checkpoint moved; what loads must match what was recorded); a ``finetuned`` one carries its own
    ``backbone.safetensors`` (``weights`` is refused). A head config with ``features`` (stage names) makes the
    classifier feed the head those stages' pooled features. ``normalize``: the classifier takes pixels in
    [0, 1] and applies the recorded mean/std itself (for export)."""
    from ..backbone import Backbone, backbone_from_identity, build_backbone, with_transform
    from ..head import HEAD_FILE, build_head_module, head_features, read_model_dir
    from .classifier import Classifier

    md = read_model_dir(model_dir)
    if md.kind == "finetuned":
        if weights is not None:
            raise UsageError(
                f"{model_dir} is a finetuned model: it carries its own backbone, --weights does not apply",
                "drop --weights",
            )
        bb = build_backbone(md.identity.model, weights=str(md.path))
        if bb.identity.arch != md.identity.arch or bb.identity.num_features != md.identity.num_features:
            raise IdentityMismatch(
                f"{md.path}: its backbone file holds {bb.identity.arch} ({bb.identity.num_features} features), "
                f"meta.json says {md.identity.arch} ({md.identity.num_features})",
                "re-run `rt finetune` to write the directory again",
            )
        bb = Backbone(net=bb.net, identity=with_transform(bb.identity, md.identity.transform), stages=bb.stages)
    elif md.kind == "head":
        bb = backbone_from_identity(md.identity, weights)
    else:
        raise UsageError(f"{md.path}: unknown model kind {md.kind!r}", "use a directory from rt fit-head / finetune")
    head = build_head_module(md.head_config)
    try:
        head.load_state_dict(md.load_tensors(HEAD_FILE))
    except (RuntimeError, KeyError) as exc:
        raise ModelDirError(
            f"{md.path / HEAD_FILE}: does not fit the head recorded in meta.json ({str(exc)[:200]})",
            "re-run the command that wrote the directory",
        ) from exc
    features = head_features(md.head_config)
    for stage in features or []:
        bb.check_stage(stage, "the head's features")
    if not features and head.in_features != bb.num_features:
        raise IdentityMismatch(
            f"{md.path}: the head takes {head.in_features} features, the backbone gives {bb.num_features}",
            "re-run the command that wrote the directory",
        )
    clf = Classifier(
        bb.net, head, normalize=md.identity.transform if normalize else None, features=features, backbone=bb
    )
    return clf.eval(), md
