"""The tools wing: what the cache makes cheap: ``audit``, ``suggest``, ``curve`` and ``review`` (`rt review`)."""

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
        "review": (
            "ReviewConfig",
            "ReviewManifest",
            "open_review",
        ),
        "suggesting": (
            "SuggestConfig",
            "diverse_top",
            "suggest",
            "uncertainty",
        ),
    },
)
