"""The images wing: listing a folder, a manifest or a source read in place (zip/tar, WebDataset shards, a
Hugging Face dataset or Parquet: one reader per source), the class index, the one split, robust decoding, the
threaded loader, transforms and contact sheets.
"""

from __future__ import annotations

from ..base.lazy import face

__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "data": (
            "IMAGE_EXTENSIONS",
            "ImageDataset",
            "ImageDecodeError",
            "ImageList",
            "class_index_map",
            "class_order",
            "extended_class_order",
            "list_images",
            "load_image",
            "path_free",
            "remap_labels",
            "stratified_split",
        ),
        "early": ("EARLY_BYTES", "EarlyCrops", "early_crops", "early_worthwhile"),
        "feed": ("collate", "iter_batches", "normalized_batches"),
        "reader": ("Member", "Reader"),
        "sources": ("SOURCE_KINDS", "detect", "open_source"),
        "gpu_decode": (
            "HostToDevice",
            "decode_path",
            "decode_resize_crop",
            "gpu_batches",
            "gpu_decode_enabled",
            "jpeg_header",
        ),
        "sheets": (
            "ImageRoot",
            "ROOT_HINT",
            "contact_sheet",
            "image_root",
            "most_confidently_wrong",
            "plot_top_losses",
            "resolve",
            "root_attrs",
        ),
        "transforms": (
            "ResizeCenterCrop",
            "interpolation_mode",
            "TransformConfig",
            "VIEWS",
            "eval_transform",
            "eval_transform_uint8",
            "normalize_batch",
            "train_transform",
            "train_transform_uint8",
            "tta_transform",
            "uint8_chw",
        ),
    },
)
