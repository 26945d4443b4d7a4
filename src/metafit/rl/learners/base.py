"""The interface every meta-RL learner implements (the registry is :data:`metafit.rl.learners.RL_LEARNERS`).

A learner is an ``nn.Module`` built from a frozen config (a :class:`~metafit.validation.ConfigModel`
with a ``name`` literal) and an environment family (a :class:`~metafit.rl.envs.base.Family`, see
:data:`metafit.rl.FAMILIES`):

- ``train_iteration(generator) -> dict``: one outer update on freshly sampled tasks; returns
  scalar statistics for the log, at least ``"return"`` (the mean return per trial of the data the
  update used, for RL² the whole trial, for MAML-RL after adaptation) and ``"env_steps"``;
- ``evaluate(tasks, generator) -> Tensor [len(tasks), len(eval_points())]``: returns at each
  adaptation point on the given tasks, e.g. every episode of an RL² trial, or MAML-RL before
  adaptation and after 1, 2, 3 inner steps;
- ``eval_points() -> list[str]``: the names of those points ("episode 1", "0 steps", ...).

The training layer (``metafit rl train / eval``) owns the loop, logs, checkpoints and resume;
learners hold no optimizer state outside ``optimizer_state_dict`` / ``load_optimizer_state_dict``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ...validation import ConfigModel, parse_config
from ..envs.base import Family

__all__ = ["RLLearner"]


class RLLearner(nn.Module):
    """The base class of meta-RL learners (see the module docstring): an ``nn.Module`` built from
    ``config`` (its ``Config`` class) and ``family``, the environment family it learns across.
    Subclasses set ``name`` (the registry key), ``Config``, and where they differ
    ``score_reduction`` and ``devices``."""

    name: ClassVar[str]
    Config: ClassVar[type[ConfigModel]]
    #: how a task's returns at the evaluation points become its score: "last" (the return after
    #: the last adaptation point, MAML-RL) or "sum" (the whole trial's reward, RL²)
    score_reduction: ClassVar[str] = "last"
    #: device types the learner runs on (``train.device`` of ``metafit rl train``)
    devices: ClassVar[tuple[str, ...]] = ("cpu",)

    def __init__(self, config: ConfigModel | dict | None, family: Family) -> None:
        """``config``: an instance of ``Config`` or a mapping of its fields (validated here, a
        one-line ConfigError naming ``learner.<field>`` otherwise)."""
        super().__init__()
        self.config = parse_config(type(self).Config, config, "learner")
        self.family = family

    def train_iteration(self, generator: torch.Generator) -> dict[str, float]:
        """One outer update on tasks sampled from ``generator``; returns scalar statistics for the
        log, at least ``"return"`` and ``"env_steps"`` (see the module docstring)."""
        raise NotImplementedError

    def evaluate(self, tasks: list, generator: torch.Generator) -> torch.Tensor:
        """Returns at each adaptation point (:meth:`eval_points`) on ``tasks``, the environment noise
        drawn from ``generator``: a tensor ``[len(tasks), len(eval_points())]``."""
        raise NotImplementedError

    def eval_points(self) -> list[str]:
        """The names of the adaptation points :meth:`evaluate` reports ("episode 1", "0 steps", ...)."""
        raise NotImplementedError

    def optimizer_state_dict(self) -> dict:
        """The learner's optimizer state (what resuming needs beyond the weights; {} here: none)."""
        return {}

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Restore the optimizer ``state`` that :meth:`optimizer_state_dict` returned (a no-op here)."""
        pass

    def start_new_run(self) -> None:
        """Called once another run's weights are loaded to start a new run from them (a fresh
        optimizer: ``train.init_from``), never on resume. Resets
        what counts the run's own progress, such as a learning-rate schedule's update count, so the
        new run's schedule starts at its beginning; weights and learned statistics stay."""

