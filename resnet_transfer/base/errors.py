"""Exceptions whose messages tell the user what to do.

Every error the library raises on purpose is an :class:`RtError`. The CLI turns it into one line on stderr
and exit code 2; Python callers can catch the subclasses.
"""

from __future__ import annotations


class RtError(Exception):
    """Base class: a problem the user can fix. ``hint`` says how."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


class UsageError(RtError):
    """A bad argument value (unknown model, stage, batch size ...)."""


class DataError(RtError):
    """Images, folders or manifests that cannot be used."""


class CacheError(RtError):
    """A feature cache that is missing, corrupt, locked, or of another layout."""


class WeightsError(RtError):
    """Pretrained weights or checkpoints that cannot be loaded."""


class IdentityMismatch(RtError):
    """A cache, head or model made with a different backbone/transform than the one given."""


class ModelDirError(RtError):
    """A head or model directory that is missing files or was edited."""


class Interrupted(RtError):
    """Ctrl-C: the work finished so far is kept and the message says how to continue. Exit code 130."""

    exit_code = 130
