"""The typed configurations of `rt predict`, `rt evaluate` and `rt export` (what the CLI builds from its
options; the Python API takes the same objects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PredictConfig:
    """Classify ``inputs`` (image files, folders, CSV manifests) with the head or model in ``model_dir``."""

    model_dir: str | Path
    inputs: list[str | Path] = field(default_factory=list)
    tta: str | None = None  # None | flip | tencrop
    top: int = 5
    weights: str | None = None  # the backbone checkpoint, if it moved since the head was fitted
    batch_size: int = 32
    device: str = "auto"
    precision: str = "auto"
    allow_outside: bool = False
    max_pixels: int | None = None
    min_confidence: float | None = None  # below it a row is marked `uncertain`
    compile: str = "auto"
    reject_unknown: bool = False  # `prediction` says `unknown` where the out-of-distribution score is above
    ood_threshold: float | None = None  # instead of the threshold stored with the head
    ood_scorer: str | None = None  # instead of the scorer stored as the head's choice (knn | mahalanobis | ...)


@dataclass
class EvaluateConfig:
    """Score ``model_dir`` on labelled images (``data``) or a feature cache (``cache``): exactly one of them."""

    model_dir: str | Path
    data: str | Path | None = None
    cache: str | Path | None = None
    tta: str | None = None
    weights: str | None = None
    batch_size: int = 32
    device: str = "auto"
    precision: str = "auto"
    out: str | Path | None = None  # also write report.json, confusion.png, reliability.png here
    allow_outside: bool = False
    max_pixels: int | None = None
    worst: int = 0  # with out: worst.png of the N most confidently wrong images
    knn: bool = True  # a kNN beside the head (cache only)
    knn_cache: str | Path | None = None  # the kNN's training cache (default: the head's own)
    knn_search: str = "auto"  # auto | exact | index: how the kNN finds neighbours (head.neighbors)
    root: str | Path | None = None  # where a cache's images are (for worst.png)
    ood: str | Path | None = None  # images of none of the classes (folder or cache): the OOD scorers compared
    ood_scorer: str | None = None  # the scorer reported first (default: the head's choice)


@dataclass
class ExportConfig:
    """Write ``model_dir``'s backbone + head as one servable file (``format``: onnx | torchscript), or as a
    timm model folder (``timm``: config.json + model.safetensors, loaded by ``timm.create_model("local-dir:")``)."""

    model_dir: str | Path
    format: str = "onnx"
    out: str | Path | None = None  # default: MODEL_DIR/model.onnx, model.torchscript.pt or the folder timm/
