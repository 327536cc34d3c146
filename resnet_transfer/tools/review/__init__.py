"""`rt review`: a local web page to look at a cache's mistakes and fix its labels into a manifest.

The page shows the cache's images as a grid (thumbnails made on demand, kept on disk), filtered by class, by
`rt audit`'s findings, by a head's verdict (computed on the cached features: no forward pass) or by status,
with a side panel (the image large, the head's probabilities, the findings, the nearest rows in the cache).
Keys set classes, exclude and undo; every change is written at once to a ``path,label`` manifest (atomic
writes, a journal) that ``rt extract --data MANIFEST --out CACHE`` reads: the content-keyed cache computes
nothing for relabelled or excluded images, and ``rt fit-head`` refits. Needs the ``review`` extra
(``pip install 'resnet_transfer[review]'``: Starlette and uvicorn), imported only when a server starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .manifest import EXCLUDED, ReviewManifest
    from .serve import MissingExtra, ReviewConfig, ReviewServer, build_state, open_review
    from .server import create_app
    from .thumbs import ThumbCache

__all__ = [
    "EXCLUDED",
    "MissingExtra",
    "ReviewConfig",
    "ReviewManifest",
    "ReviewServer",
    "ThumbCache",
    "build_state",
    "create_app",
    "open_review",
]

_WHERE = {
    "EXCLUDED": "manifest",
    "ReviewManifest": "manifest",
    "MissingExtra": "serve",
    "ReviewConfig": "serve",
    "ReviewServer": "serve",
    "build_state": "serve",
    "open_review": "serve",
    "create_app": "server",
    "ThumbCache": "thumbs",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
