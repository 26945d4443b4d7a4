"""What every environment family provides (:class:`Family`), what a batched environment does
(:class:`BatchedEnv`), and the families that have one (:class:`BatchedFamily`).

A family is a frozen, validated settings object (a dataclass whose ``__post_init__`` refuses
invalid values with a :class:`~metafit.errors.ConfigError`) that samples tasks and builds
environments for them. The learners (:mod:`metafit.rl.learners`) and the training layer
(``metafit rl train``) use families through these members only, so a new family is one module plus
one line in :data:`metafit.rl.envs.FAMILIES`.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch

__all__ = ["BatchedEnv", "BatchedFamily", "Family"]


@runtime_checkable
class BatchedEnv(Protocol):
    """Many tasks x several copies of each, stepped together with tensors.

    Environment ``i`` plays task ``i // envs_per_task``. Finished episodes restart in the same
    step and are counted in ``episode_count [N]``; tasks change only through ``set_tasks``.

    A structural type: environments need not subclass it, and it is not instantiated itself;
    each family's batched environment takes its own constructor arguments."""

    num_envs: int
    episode_count: torch.Tensor

    def set_tasks(self, tasks: Sequence[Any]) -> None:
        """Swap in ``tasks`` (the family's task objects, any number); call :meth:`reset` afterwards."""

    def reset(self) -> torch.Tensor:
        """Start a trial; the first observations ``[N]`` (discrete) or ``[N, observation_size]``."""

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Apply ``actions``, one per environment (``[N]`` indices, or ``[N, action_size]`` floats),
        and return ``(obs, reward [N], terminated [N], truncated [N], info)``; ``info["final_obs"]``
        holds the observation each step reached before a finished episode restarted."""


@runtime_checkable
class Family(Protocol):
    """A distribution over tasks of one kind, and the environments that play them.

    - ``task_type``: the class of its tasks (a frozen dataclass);
    - ``discrete_observations`` / ``discrete_actions``: state indices and action indices, or
      float vectors;
    - ``observation_size``: the number of states (discrete) or the observation's length;
    - ``action_size``: the number of actions (discrete) or the action's length;
    - ``action_bound``: continuous actions are clipped to ``[-action_bound, action_bound]`` per
      coordinate (1.0 for discrete actions);
    - ``horizon``: steps per episode (at most, where episodes can end early);
    - ``sample_tasks(n, generator)``: ``n`` tasks, reproducible from the generator;
    - ``make_env(task)``: a single-task Gymnasium environment (needs ``pip install "metafit[rl]"``).

    A structural type: families need not subclass it, and it is not instantiated itself; a family's
    constructor takes its settings.
    """

    task_type: type
    discrete_observations: bool
    discrete_actions: bool

    @property
    def observation_size(self) -> int: ...

    @property
    def action_size(self) -> int: ...

    @property
    def action_bound(self) -> float: ...

    @property
    def horizon(self) -> int: ...

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> list:
        """``n`` tasks of this family (a list of ``task_type``), drawn from ``generator`` (None:
        torch's global random stream)."""

    def make_env(self, task: Any = None) -> Any:
        """A single-task Gymnasium environment playing ``task`` (None: a task sampled when the
        environment is reset); needs ``pip install "metafit[rl]"``."""


@runtime_checkable
class BatchedFamily(Family, Protocol):
    """A family with a batched torch environment: ``batched(tasks, envs_per_task, seed=,
    device=, check_actions=)`` (``seed`` draws the environment noise; families with continuous
    observations also take ``dtype``)."""

    def batched(self, tasks: Sequence[Any], envs_per_task: int = 1, *, seed: int | None = None,
                device: torch.device | str = "cpu", check_actions: bool = True) -> BatchedEnv:
        """A :class:`BatchedEnv` playing each of ``tasks`` in ``envs_per_task`` copies on ``device``;
        ``seed`` seeds its noise, ``check_actions`` validates the actions of every step."""
