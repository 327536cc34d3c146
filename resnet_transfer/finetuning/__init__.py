"""The finetuning wing: ``FinetuneConfig``, the training loop (``train_one_epoch`` / ``validate``), the
freeze policy, feeds from images or cached maps, checkpoints and outputs.
"""

from __future__ import annotations

from ..base.lazy import face

__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "checkpoints": ("load_checkpoint",),
        "freeze": (
            "AUTO_RULE_TEXT",
            "FreezePolicy",
            "auto_unfreeze",
            "lr_factor",
            "resolve_bn",
        ),
        "training": (
            "FinetuneConfig",
            "finetune",
        ),
    },
)
