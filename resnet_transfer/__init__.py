"""resnet_transfer: transfer learning with pretrained ResNets (and other timm CNNs).

The Python API is the CLI's workflow, one call per command, each taking the typed config the command builds
from its options (``import resnet_transfer as rt``)::

    rt.extract(rt.ExtractConfig(data="pets/", out="pets.h5"))          # rt extract
    rt.fit_head(rt.FitHeadConfig(cache="pets.h5", out="cat-head/"))     # rt fit-head
    rt.predict(rt.PredictConfig("cat-head/", ["photo.jpg"]))            # rt predict

Names are imported on first use, so ``import resnet_transfer`` loads no torch. The wings below
(``resnet_transfer.base``, ``images``, ``backbone``, ``cache``, ``head``, ``models``, ``finetuning``,
``tools``) each list their own public names the same way.
"""

from __future__ import annotations

from .base.lazy import face
from .base.version import __version__ as __version__

__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "base": ("RtError",),
        "images": ("list_images",),
        "backbone": ("build_backbone",),
        "cache": ("ExtractConfig", "ExtractResult", "FeatureCache", "extract"),
        "head": ("FitHeadConfig", "SoftmaxHead", "fit_head", "fit_ood", "read_ood"),
        "models": (
            "EvaluateConfig",
            "ExportConfig",
            "LoadedModel",
            "PredictConfig",
            "evaluate",
            "export",
            "load_model",
            "predict",
        ),
        "finetuning": ("FinetuneConfig", "finetune"),
        "tools": (
            "AuditConfig",
            "CompareConfig",
            "CurveConfig",
            "SuggestConfig",
            "audit",
            "compare",
            "curve",
            "suggest",
        ),
    },
)
