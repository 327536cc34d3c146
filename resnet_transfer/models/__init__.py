"""The models wing: backbone + head as one classifier, head and model directories, ``predict`` /
``evaluate`` and ``export``, each taking its typed config.
"""

from __future__ import annotations

from ..base.lazy import face

__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "classifier": ("Classifier",),
        "config": (
            "EvaluateConfig",
            "ExportConfig",
            "PredictConfig",
        ),
        "exporting": ("export",),
        "insights": ("summary_lines",),
        "prediction": (
            "LoadedModel",
            "evaluate",
            "load_model",
            "predict",
        ),
        "loading": ("load_classifier",),
        "info": ("describe",),
        "unknown": ("UNKNOWN", "ood_summary_lines"),
    },
)
