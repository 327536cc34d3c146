"""The models wing: backbone + head as one classifier, head and model directories, ``predict`` /
``evaluate`` and ``export_model``.
"""

from __future__ import annotations

from ..base.lazy import face

__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "classifier": ("Classifier",),
        "exporting": ("export_model",),
        "insights": ("summary_lines",),
        "modeldir": (
            "HEAD_FILE",
            "META",
            "head_features",
            "load_classifier",
            "read_model_dir",
            "read_split",
            "write_model_dir",
            "write_split",
        ),
        "prediction": (
            "evaluate",
            "predict",
        ),
    },
)
