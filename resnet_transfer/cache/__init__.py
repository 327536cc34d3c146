"""The cache wing: the HDF5 format, its only writer, its reader, ``extract`` (plan, single and sharded
runs) and ``describe`` (``rt info``).
"""

from __future__ import annotations

from ..base.lazy import face

__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "config": (
            "ExtractConfig",
            "ExtractResult",
        ),
        "extraction": ("extract",),
        "layout": ("ChunkStore",),
        "plan": ("change_line", "changes"),
        "reader": (
            "FEATURE_CHUNK_ROWS",
            "FORMAT_VERSION",
            "FeatureCache",
            "chunk_dir",
        ),
        "writer": (
            "CacheWriter",
            "runs",
        ),
    },
)
