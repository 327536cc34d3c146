"""The typed configuration of `rt extract` (what the CLI builds), its result, and what a run decides once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ExtractConfig:
    """Everything `rt extract` needs; the CLI fills it from its options."""

    data: Path
    out: Path
    model: str = "resnet50"
    weights: str = "imagenet"
    image_size: int | None = None
    cut: list[str] = field(default_factory=list)
    batch_size: int = 32
    workers: int | None = None  # None: chosen for the device
    device: str = "auto"
    precision: str = "auto"
    compile: str = "auto"  # auto | on | off: the forward compiled by inductor (compiled.compiled_forward)
    dtype: str = "float16"
    overwrite: bool = False
    allow_outside: bool = False
    strict: bool = False
    chunk_rows: int = 256
    record_root: bool = True  # the absolute data folder in the cache's attributes (--no-record-root: left out)
    max_pixels: int | None = None
    merge: bool = False  # write one self-contained file (real datasets, no chunk folder)
    dry_run: bool = False  # print the plan; compute and write nothing
    pool_stages: list[str] = field(default_factory=list)  # stages whose pooled features are stored too
    calibration: Path | None = None  # --precision int8: images to calibrate on (default: fixed photo crops)


@dataclass
class ExtractResult:
    path: Path
    rows: int
    new_rows: int
    skipped: list[tuple[str, str]]
    seconds: float
    images_per_s: float
    notes: list[str] = field(default_factory=list)
    changes: dict[str, int] = field(default_factory=dict)  # added, changed, removed, relabelled, moved, unchanged
    summary: str = ""  # the one line saying what changed
    computed: int = 0  # images that went through the forward pass


@dataclass
class RunSetup:
    """The built backbone and everything decided once for a run."""

    device: Any
    precision: str
    backbone: Any
    net: Any
    stage_shapes: dict[str, tuple[int, ...]]
    pooled_dims: dict[str, int]
    workers: int
    calibration: list[str] | None = None  # int8: the calibration images (precision is then int8@<digest>)
