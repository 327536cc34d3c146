"""The tools wing: what the cache makes cheap: ``audit``, ``suggest``, ``curve``, ``compare`` (which backbone,
measured: caches, curves, LogME, cost) and ``review`` (`rt review`)."""

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
        "comparing": (
            "Candidate",
            "CompareConfig",
            "CompareResult",
            "compare",
            "parse_candidate",
        ),
        "curves": (
            "CurveConfig",
            "check_ks",
            "curve",
            "nested_subsets",
            "score_subsets",
            "summarize",
            "t_interval",
        ),
        "review": (
            "ReviewConfig",
            "ReviewManifest",
            "open_review",
        ),
        "transferability": ("logme",),
        "suggesting": (
            "SuggestConfig",
            "diverse_top",
            "suggest",
            "uncertainty",
        ),
    },
)
