"""What every command of the command line shares: printing, and the algorithm overrides of --set."""

from __future__ import annotations

import contextlib
import logging

from ..errors import ConfigError


def _print(msg: str = "") -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def _printing_log(name: str):
    """Print the INFO records of logger ``name`` (training code logs, the CLI prints)."""
    class _Print(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            _print(record.getMessage())

    logger, handler = logging.getLogger(name), _Print(logging.INFO)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _algorithm_overrides(items: list[str]) -> dict:
    from ..training.config import parse_override_value

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.startswith("algorithm.") or "." in key[len("algorithm."):]:
            raise ConfigError(
                f"Eval: --set must look like algorithm.KEY=VALUE; got {item!r}. Only algorithm fields "
                "(e.g. algorithm.head=centroid) can change when evaluating a checkpoint."
            )
        out[key[len("algorithm."):]] = parse_override_value(key, raw)
    return out
