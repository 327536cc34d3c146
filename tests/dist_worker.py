"""Entry point for multi-process tests: ``torchrun ... tests/dist_worker.py <rt arguments>``.

Runs the ``rt`` CLI like ``-m resnet_transfer`` does, with two test-only hooks set by environment variables:
``RT_TEST_PART_LOG`` (append ``"<rank> <rows>"`` for every chunk file a rank commits, to see what was recomputed)
and ``RT_TEST_KILL_RANK`` / ``RT_TEST_KILL_AT_PART`` (that rank SIGKILLs itself instead of committing its
n-th chunk: a hard crash in the middle of a shard). For finetune: ``RT_TEST_BN_EVAL=1`` keeps every BatchNorm
in eval mode (per-rank batch statistics are the one thing that legitimately differs between a 2-process and a
1-process run on CPUs, where SyncBatchNorm does not exist), and ``RT_TEST_KILL_AFTER_EPOCH=k`` SIGKILLs rank 0
right after it saved the checkpoint of epoch ``k``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from resnet_transfer.cache import ChunkStore
from resnet_transfer.cli import main


def _install_hooks() -> None:
    rank = int(os.environ.get("RANK", "0"))
    log = os.environ.get("RT_TEST_PART_LOG")
    kill_rank = int(os.environ.get("RT_TEST_KILL_RANK", "-1"))
    kill_at = int(os.environ.get("RT_TEST_KILL_AT_PART", "0"))
    real = ChunkStore.write
    calls = {"n": 0}

    def write(self: ChunkStore, rows: Any, *args: Any, **kwargs: Any) -> str:
        calls["n"] += 1
        if rank == kill_rank and calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if log:
            with open(log, "a") as f:
                f.write(f"{rank} {len(rows)}\n")
        return real(self, rows, *args, **kwargs)

    ChunkStore.write = write  # type: ignore[method-assign]

    from resnet_transfer.finetuning import checkpoints as checkpoints
    from resnet_transfer.finetuning import freeze as freeze

    if os.environ.get("RT_TEST_BN_EVAL") == "1":
        from torch import nn

        real_mode = freeze.FreezePolicy.train_mode

        def train_mode(self: Any, epoch: int) -> None:
            real_mode(self, epoch)
            for plan in self.plans:
                for m in plan.modules:
                    for bn in m.modules():
                        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                            bn.eval()

        freeze.FreezePolicy.train_mode = train_mode  # type: ignore[method-assign]
    kill_epoch = int(os.environ.get("RT_TEST_KILL_AFTER_EPOCH", "0"))
    if kill_epoch:
        real_save = checkpoints.atomic_torch_save

        def save(obj: Any, path: Path) -> None:
            real_save(obj, path)
            if path.name == checkpoints.LAST_CKPT and obj.get("epoch") == kill_epoch and rank == 0:
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoints.atomic_torch_save = save


if __name__ == "__main__":
    _install_hooks()
    main()
