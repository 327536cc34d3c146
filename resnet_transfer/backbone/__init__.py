"""The backbone wing: model names -> headless networks, weights (hub, file, none), the identity that
caches and model directories record, stages, and the eager / compiled / int8 forward over images.
"""

from __future__ import annotations

from ..base.lazy import face

__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "artefact": ("artefact_dir", "artefact_path"),
        "compiled": ("compiled_forward", "frozen_call"),
        "forward": ("forward_images",),
        "identity": (
            "BackboneIdentity",
            "sha256_file",
        ),
        "networks": (
            "BACKBONE_FILE",
            "Backbone",
            "backbone_from_identity",
            "build_backbone",
            "with_transform",
            "load_state_file",
            "parse_model_name",
            "pooled_stage_features",
            "save_backbone",
            "TV_DEFAULT_WEIGHTS",
        ),
        "precision_probe": ("choose_train_precision",),
        "weights_cache": (
            "check_weights_file",
            "record_file",
        ),
        "speed_records": (
            "read_probe",
            "read_speed",
            "record_probe",
            "record_speed",
            "recorded_rates",
            "records_path",
            "work_id",
        ),
        "transform_memo": ("recalled_transform", "remember_transform"),
        "quantized": (
            "Int8Forward",
            "calibration_batch",
            "calibration_images",
            "require_pooled_only",
            "require_torchao",
            "int8_hint",
        ),
    },
)
