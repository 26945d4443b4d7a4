"""The error vocabulary shared by every layer.

Every user-facing message has one shape::

    <Owner>: <name> must be <constraint>; got <value!r>. <what to do>

The CLI prints the message on one line and exits 1; the service returns it in a 4xx body.
"""

from __future__ import annotations

__all__ = [
    "MetafitError",
    "ConfigError",
    "DataError",
    "TaskError",
    "CheckpointError",
    "DownloadError",
    "TrainingError",
    "constraint_message",
]


class MetafitError(Exception):
    """Base class of every error metafit raises on purpose."""


class ConfigError(MetafitError, ValueError):
    """A configuration key or value is invalid."""


class DataError(MetafitError, ValueError):
    """A dataset on disk is missing, unreadable or unsuitable for the requested tasks."""


class TaskError(MetafitError, ValueError):
    """A task (support/query tensors) does not fit the model or the algorithm."""


class CheckpointError(MetafitError):
    """A checkpoint is corrupted, foreign or of an unsupported format."""


class DownloadError(MetafitError):
    """A download failed or its checksum did not match."""


class TrainingError(MetafitError, RuntimeError):
    """Training cannot continue (for example the loss became NaN)."""


def constraint_message(owner: str, name: str, constraint: str, value: object, fix: str) -> str:
    """Format the one error shape used across metafit."""
    return f"{owner}: {name} must be {constraint}; got {value!r}. {fix}"
