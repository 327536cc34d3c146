"""resnet_transfer: transfer learning with pretrained ResNets (and other timm CNNs).

The Python API mirrors the CLI: :func:`extract` writes a :class:`FeatureCache`; heads, finetuning and
prediction build on it. Names are imported lazily so ``import resnet_transfer`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "extract": "resnet_transfer.extract",
    "ExtractConfig": "resnet_transfer.extract",
    "FeatureCache": "resnet_transfer.cache",
    "build_backbone": "resnet_transfer.backbones",
    "list_images": "resnet_transfer.data",
    "RtError": "resnet_transfer.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'resnet_transfer' has no attribute {name!r}")


__all__ = sorted(_LAZY)
