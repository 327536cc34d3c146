"""resnet_transfer: transfer learning with pretrained ResNets (and other timm CNNs).

The Python API mirrors the CLI: :func:`extract` writes a :class:`FeatureCache`; heads, finetuning and
prediction build on it. Names are imported lazily so ``import resnet_transfer`` stays cheap.
"""

from __future__ import annotations

from typing import Any

from .base.version import __version__ as __version__

_LAZY = {
    "extract": "resnet_transfer.cache",
    "ExtractConfig": "resnet_transfer.cache",
    "FeatureCache": "resnet_transfer.cache",
    "build_backbone": "resnet_transfer.backbone",
    "list_images": "resnet_transfer.images",
    "RtError": "resnet_transfer.base",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'resnet_transfer' has no attribute {name!r}")


__all__ = sorted(_LAZY)
