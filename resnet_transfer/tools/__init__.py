"""The tools wing: what the cache makes cheap: ``audit``, ``suggest`` and ``curve``."""

from __future__ import annotations

from ..base.lazy import face

__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "auditing": (
            "AuditConfig",
            "audit",
            "exact_groups",
            "label_issues",
            "local_outlier_factor",
            "near_pairs",
            "outliers",
            "pairs",
        ),
        "curves": (
            "CurveConfig",
            "curve",
            "nested_subsets",
            "t_interval",
        ),
        "suggesting": (
            "SuggestConfig",
            "diverse_top",
            "suggest",
            "uncertainty",
        ),
    },
)
