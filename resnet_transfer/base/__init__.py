"""The base wing: errors, the one reporter, runtime choices (threads, device, precision, compile), atomic
file writes and locks, metrics and their plots, torchrun primitives. It imports nothing else of the package.
"""

from __future__ import annotations

from .lazy import face

__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "distributed": (
            "DistributedBatchSampler",
            "RankReporter",
            "agree",
            "convert_sync_batchnorm",
            "dist_env",
            "init",
            "launched",
            "loader_args",
            "on_main",
            "rank_part",
            "rank_reporting",
            "shard_block",
        ),
        "errors": (
            "CacheError",
            "DataError",
            "IdentityMismatch",
            "Interrupted",
            "ModelDirError",
            "RtError",
            "UsageError",
            "WeightsError",
        ),
        "fsutil": (
            "DiskFullError",
            "FileLock",
            "atomic_path",
            "atomic_write_json",
            "atomic_write_text",
            "bytes_digest",
            "file_digest",
            "fsync_dir",
            "fsync_file",
            "save_png",
            "temp_name",
        ),
        "metrics": ("classification_metrics", "metrics_rows", "ood_metrics", "plot_confusion", "plot_training_curves"),
        "report": (
            "DEFAULT_PROGRESS_INTERVAL",
            "Reporter",
            "format_table",
            "get_reporter",
            "print_table",
            "set_reporter",
        ),
        "runtime": (
            "COMPILE_MODES",
            "CompilePrior",
            "autocast",
            "compile_plan",
            "compile_prior",
            "cpu_cores",
            "cpu_flags",
            "cpu_supports_bf16",
            "decode_threads",
            "default_workers",
            "precision_kind",
            "resolve_compile",
            "resolve_device",
            "resolve_precision",
            "total_ram_bytes",
            "train_workers",
            "tune_process",
        ),
    },
)
