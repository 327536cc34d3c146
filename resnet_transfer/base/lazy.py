"""Lazy faces: a wing's ``__init__`` names what it offers, and each name is imported on first use.

A face is a table, module -> public names. Importing a wing therefore costs nothing (``import
resnet_transfer.cache`` loads no torch), while ``from resnet_transfer.cache import FeatureCache`` imports the
one module that defines it. Static tools see the imports between wings in the modules themselves, where they
are written as ``from ..cache import FeatureCache``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def face(
    package: str, table: dict[str, tuple[str, ...]]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__, __getattr__, __dir__`` for the package ``package`` exporting ``table`` lazily."""
    where = {name: f"{package}.{module}" for module, names in table.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        # looked up afresh each time (not cached on the package), so the defining module stays the one place
        # a name lives: patching it there (tests, debugging) is seen through the face too
        return getattr(importlib.import_module(where[name]), name)

    def __dir__() -> list[str]:
        return sorted(set(where) | set(vars(sys.modules[package])))

    return sorted(where), __getattr__, __dir__
