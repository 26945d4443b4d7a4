"""Argument checks shared by the baseline agents (the one error shape of metafit.errors)."""

from __future__ import annotations

from typing import Sequence

from ...errors import ConfigError, constraint_message
from ..envs._common import check_nonnegative

__all__ = ["check_prior", "check_probability"]


def check_prior(owner: str, prior: Sequence[float]) -> tuple[float, float]:
    if len(prior) != 2:
        raise ConfigError(constraint_message(owner, "prior", "a pair (alpha, beta)", prior, "Pass two numbers."))
    return check_nonnegative(owner, "prior[0]", prior[0]), check_nonnegative(owner, "prior[1]", prior[1])


def check_probability(owner: str, name: str, value: float) -> float:
    value = check_nonnegative(owner, name, value)
    if value > 1:
        raise ConfigError(constraint_message(owner, name, "in [0, 1]", value, "Pass a probability."))
    return value
