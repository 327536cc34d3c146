"""The head wing: the softmax head module, its scikit-learn estimator and solvers, feature-set choice,
``fit_head``, temperature scaling, calibration, the kNN and the out-of-distribution scorers beside the head,
and the one neighbour search (exact in blocks, or faiss's index) that they and the cache tools share.
"""

from __future__ import annotations

from ..base.lazy import face

__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "arrays": (
            "head_logits",
            "head_probabilities",
            "load_head_arrays",
        ),
        "calibration": (
            "UNCERTAIN",
            "calibration_report",
            "expected_calibration_error",
            "head_temperature",
            "log_loss",
            "log_probabilities",
            "mark_uncertain",
            "plot_reliability",
            "reliability",
            "softmax",
        ),
        "choose": ("HEAD_TYPES", "MLP_HEAD", "choose_head"),
        "estimator": ("SoftmaxHead",),
        "fitting": ("FitHeadConfig", "fit_head"),
        "knn": (
            "CosineKnn",
            "choose_k",
            "fit_knn",
            "knn_beside_head",
            "knn_report",
            "vote",
        ),
        "module": (
            "HeadModule",
            "build_head_module",
            "predict_logits",
            "predict_probabilities",
        ),
        "neighbors": (
            "SEARCHES",
            "Neighbours",
            "Unit",
            "choose_path",
            "feature_mean",
            "index_available",
            "search",
        ),
        "ood": ("EnergyScorer", "KnnScorer", "MahalanobisScorer", "MspScorer", "SCORERS", "make_scorer"),
        "ood_fit": ("ood_beside_fit", "unknown_features"),
        "ood_store": ("NO_SCORER_HINT", "OodModel", "fit_ood", "ood_tensors", "read_ood", "require_ood"),
        "select": (
            "CV_BELOW",
            "feature_candidates",
            "feature_name",
            "select_features",
        ),
        "temperature": ("calibration_summary", "fit_temperature", "nll_rows"),
        "views": ("VIEW_CROP_SCALE", "add_views", "view_features"),
        "directory": (
            "HEAD_FILE",
            "META",
            "ModelDir",
            "head_features",
            "read_model_dir",
            "read_split",
            "write_model_dir",
            "write_split",
        ),
    },
)
