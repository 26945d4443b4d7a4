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
    "ExportError",
    "constraint_message",
    "short_repr",
    "MAX_MESSAGE_CHARS",
]

import reprlib

#: the longest message an error carries: a quoted value never floods a terminal or an HTTP body
MAX_MESSAGE_CHARS = 1000

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 80, 80, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def short_repr(value: object, limit: int = 120) -> str:
    """``repr(value)`` bounded in length and in the work it takes (nested containers are cut
    after a few levels and items, the text after ``limit`` characters), for quoting users'
    values in error messages."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a hostile __repr__: name the type only
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _bounded(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    half = MAX_MESSAGE_CHARS // 2 - 3
    return f"{text[:half]} ... {text[-half:]}"


class MetafitError(Exception):
    """Base class of every error metafit raises on purpose. Its message is one line of at most
    :data:`MAX_MESSAGE_CHARS` characters (longer ones are cut in the middle).

    ``args``: as for ``Exception``; when it is a single string, its line breaks become spaces and it
    is bounded in length, other arguments are kept as they are.

    >>> str(MetafitError("two" + chr(10) + "lines"))
    'two lines'
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_bounded(" ".join(args[0].splitlines())),)  # every kind of line break
        super().__init__(*args)


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


class ExportError(MetafitError, RuntimeError):
    """A task cannot be exported (missing packages, an untraceable algorithm, a failed check)."""


def constraint_message(owner: str, name: str, constraint: str, value: object, fix: str) -> str:
    """Format the one error shape used across metafit and return it as a string:
    ``"<owner>: <name> must be <constraint>; got <value>. <fix>"``.

    ``owner``: who complains (a class or command name); ``name``: the offending key or argument;
    ``constraint``: what it must be; ``value``: what it was, quoted with :func:`short_repr`;
    ``fix``: what to do about it.

    >>> constraint_message("MAML", "steps", "an integer >= 1", 0, "Raise it.")
    'MAML: steps must be an integer >= 1; got 0. Raise it.'
    """
    return f"{owner}: {name} must be {constraint}; got {short_repr(value)}. {fix}"
