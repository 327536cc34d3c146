"""`rt review`: a local web page to look at a cache's mistakes and fix its labels into a manifest.

The page shows the cache's images as a grid (thumbnails made on demand, kept on disk), filtered by class, by
`rt audit`'s findings, by a head's verdict (computed on the cached features: no forward pass) or by status,
with a side panel (the image large, the head's probabilities, the findings, the nearest rows in the cache).
Keys set classes, exclude and undo; every change is written at once to a ``path,label`` manifest (atomic
writes, a journal) that ``rt extract --data MANIFEST --out CACHE`` reads: the content-keyed cache computes
nothing for relabelled or excluded images, and ``rt fit-head`` refits. Needs the ``review`` extra
(``pip install 'resnet_transfer[review]'``: Starlette and uvicorn), imported only when a server starts.

Modules: ``manifest`` (the journaled manifest), ``state`` (rows, filters, pages, a row's detail),
``vectors`` (head probabilities and cosine neighbours, blockwise), ``findings`` (audit.json, copies by key),
``files`` (what may be served), ``thumbs`` (the thumbnail cache), ``guard`` (token, Host, headers),
``server`` (the Starlette app), ``serve`` (config, binding, uvicorn), ``commands`` (the loop's commands).
"""

from __future__ import annotations

from ...base.lazy import face

__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "manifest": ("EXCLUDED", "ReviewManifest"),
        "serve": ("MissingExtra", "ReviewConfig", "ReviewServer", "build_state", "open_review", "require_extra"),
        "server": ("create_app",),
        "thumbs": ("ThumbCache", "default_folder"),
    },
)
