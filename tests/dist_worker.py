"""Entry point for multi-process tests: ``torchrun ... tests/dist_worker.py <rt arguments>``.

Runs the ``rt`` CLI like ``-m resnet_transfer`` does, with two test-only hooks set by environment variables:
``RT_TEST_PART_LOG`` (append ``"<rank> <rows>"`` for every chunk a rank commits, to see what was recomputed)
and ``RT_TEST_KILL_RANK`` / ``RT_TEST_KILL_AT_PART`` (that rank SIGKILLs itself instead of committing its
n-th chunk: a hard crash in the middle of a shard).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from resnet_transfer.cache import CacheWriter
from resnet_transfer.cli import main


def _install_hooks() -> None:
    rank = int(os.environ.get("RANK", "0"))
    log = os.environ.get("RT_TEST_PART_LOG")
    kill_rank = int(os.environ.get("RT_TEST_KILL_RANK", "-1"))
    kill_at = int(os.environ.get("RT_TEST_KILL_AT_PART", "0"))
    real = CacheWriter.write_part
    calls = {"n": 0}

    def write_part(self: CacheWriter, paths: Any, *args: Any, **kwargs: Any) -> Path:
        calls["n"] += 1
        if rank == kill_rank and calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if log:
            with open(log, "a") as f:
                f.write(f"{rank} {len(paths)}\n")
        return real(self, paths, *args, **kwargs)

    CacheWriter.write_part = write_part  # type: ignore[method-assign]


if __name__ == "__main__":
    _install_hooks()
    main()
