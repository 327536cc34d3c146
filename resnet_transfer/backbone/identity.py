"""The backbone identity: what a cache, a head directory and a model directory record about the backbone
that made their features, so every consumer can check it has the right one.

Plain data (JSON in and out) with no torch import, so `rt info` can read it without loading torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..images import TransformConfig


@dataclass(frozen=True)
class BackboneIdentity:
    """What a cache, head or model directory records so consumers can check they match.

    ``model`` is the name as resolved (``timm:resnet50.a1_in1k``, ``tv:resnet50``), ``arch`` the timm
    architecture built, ``weights`` what the user asked for, ``weights_id`` what was actually loaded (a
    pretrained tag, ``sha256:...`` of a file, or ``random:seed=0``)."""

    model: str
    arch: str
    weights: str
    weights_id: str
    transform: TransformConfig
    num_features: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["transform"] = self.transform.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneIdentity:
        return cls(
            model=str(d["model"]),
            arch=str(d["arch"]),
            weights=str(d["weights"]),
            weights_id=str(d["weights_id"]),
            transform=TransformConfig.from_dict(d["transform"]),
            num_features=int(d["num_features"]),
        )

    def differences(self, other: BackboneIdentity) -> list[str]:
        """Human-readable differences that change the features (``weights`` as typed does not)."""
        out = []
        for key in ("arch", "weights_id", "num_features"):
            a, b = getattr(self, key), getattr(other, key)
            if a != b:
                out.append(f"{key}: {a} != {b}")
        if self.transform != other.transform:
            out.append(f"transform: {self.transform.to_dict()} != {other.transform.to_dict()}")
        return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
