"""Command-line interface (``metafit``)."""

from .main import entrypoint, main

__all__ = ["entrypoint", "main"]
