"""Toy extensions, one of each kind, written the way a contributor adds one (one file each);
``register`` is the one registry line of each. ``tests/test_extending.py`` shows that the CLI,
checkpoints, ``metafit.load``, the service and the contract suites pick them up (the suites run
with ``METAFIT_TEST_TOYS=1``, which makes ``conftest.py`` call ``register``)."""

from __future__ import annotations

from typing import Any, MutableMapping


def registrations() -> list[tuple[MutableMapping[str, Any], str, Any]]:
    """(registry, key, value) of every toy: the registry line a contributor would add."""
    from metafit.algorithms import ALGORITHMS
    from metafit.data import DATASETS

    from .toy_algorithm import MatchingLite
    from .toy_dataset import ToyBlocksConfig

    return [(ALGORITHMS, MatchingLite.name, MatchingLite), (DATASETS, "toy_blocks", ToyBlocksConfig)]


def register() -> None:
    for registry, key, value in registrations():
        registry[key] = value
