"""Multi-armed Bernoulli bandits (Duan et al. 2016, RL²).

A task is ``k`` arm probabilities drawn i.i.d. from ``U[0, 1]``; pulling arm ``a`` pays 1 with
probability ``p[a]`` and 0 otherwise. Each pull is a one-step episode; a trial is ``n`` pulls in
the same task, and the score of a trial is its total reward (expected ``n / 2`` for a random
policy, at most ``n * max(p)``).

:class:`BatchedBandit` steps many tasks (and several independent copies of each) with tensors;
the single-task Gymnasium environment is :class:`metafit.rl.BanditEnv` (needs ``gymnasium``,
``family.make_env(task)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ...errors import TaskError, constraint_message
from ._common import check_actions as _check_actions
from ._common import check_int, make_generator, require_gymnasium, stack_tasks

__all__ = ["BanditTask", "BanditFamily", "BatchedBandit"]


@dataclass(frozen=True)
class BanditTask:
    """Arm success probabilities ``probs``: shape ``[k]`` (one task) or ``[B, k]`` (a batch)."""

    probs: torch.Tensor

    @property
    def n_arms(self) -> int:
        return int(self.probs.shape[-1])


@dataclass(frozen=True)
class BanditFamily:
    """``n_arms`` Bernoulli arms with ``p ~ U[0, 1]`` i.i.d. (the RL² setting)."""

    n_arms: int = 5

    task_type = BanditTask
    discrete_observations = True  # the single state 0
    discrete_actions = True
    observation_size = 1
    action_bound = 1.0
    horizon = 1  # each pull is a one-step episode

    def __post_init__(self) -> None:
        check_int("BanditFamily", "n_arms", self.n_arms, 2)

    @property
    def action_size(self) -> int:
        return self.n_arms

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> list[BanditTask]:
        """``n`` bandits (:class:`BanditTask`) drawn from ``generator`` (None: torch's global stream)."""
        check_int("BanditFamily", "n", n, 1)
        probs = torch.rand(n, self.n_arms, generator=generator, dtype=torch.float64)
        return [BanditTask(p) for p in probs]

    def batched(self, tasks: Sequence[BanditTask] | BanditTask, envs_per_task: int = 1, *,
                seed: int | None = None, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu", check_actions: bool = True) -> "BatchedBandit":
        """A :class:`BatchedBandit` playing ``tasks``, each in ``envs_per_task`` copies, on ``device``;
        its noise comes from ``generator`` or, without one, a generator seeded with ``seed``;
        ``check_actions`` validates every step's actions."""
        return BatchedBandit(tasks, envs_per_task, seed=seed, generator=generator, device=device,
                             check_actions=check_actions)

    def make_env(self, task: BanditTask | None = None):
        """A single-task Gymnasium environment (needs the ``rl`` extra)."""
        require_gymnasium("BanditFamily.make_env")
        from .gym_envs import BanditEnv  # lazily: it imports gymnasium (and never this module)

        return BanditEnv(self, task)


class BatchedBandit:
    """``B`` bandit tasks x ``envs_per_task`` independent copies, stepped together.

    Environment ``i`` plays task ``task_index[i] = i // envs_per_task``. Observations are the
    (constant) state index 0, as a long tensor ``[N]``; every step ends an episode
    (``terminated`` is all True) and the next step starts a new pull of the same task, so a trial
    of ``n`` pulls is ``n`` calls to :meth:`step`.

    ``tasks`` are :class:`BanditTask` objects (or one with a leading task dimension), each played
    by ``envs_per_task`` environments on ``device``. Rewards are drawn from ``generator`` or,
    without one, a new generator seeded with ``seed`` (None: a nondeterministic seed).
    ``check_actions`` validates the actions of every step (turn it off to save time once they are
    known to be valid).
    """

    n_states = 1

    def __init__(self, tasks: Sequence[BanditTask] | BanditTask, envs_per_task: int = 1, *,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", check_actions: bool = True) -> None:
        self.envs_per_task = check_int("BatchedBandit", "envs_per_task", envs_per_task, 1)
        self.device = torch.device(device)
        self.generator = make_generator(seed, generator, self.device)
        self.check = check_actions
        self.set_tasks(tasks)

    def set_tasks(self, tasks: Sequence[BanditTask] | BanditTask) -> None:
        """Swap in new tasks (any number); call :meth:`reset` afterwards."""
        probs = stack_tasks("BatchedBandit", tasks, BanditTask, {"probs": 1})["probs"]
        if probs.shape[-1] < 2 or not bool(((probs >= 0) & (probs <= 1)).all()):
            raise TaskError(constraint_message(
                "BatchedBandit", "tasks.probs", "probabilities in [0, 1] for at least 2 arms",
                tuple(probs.shape), "Sample tasks with BanditFamily.sample_tasks()."))
        self.probs = probs.to(self.device, torch.float32)
        self.num_tasks, self.n_arms = self.probs.shape
        self.num_envs = self.num_tasks * self.envs_per_task
        self.task_index = torch.arange(self.num_tasks, device=self.device).repeat_interleave(self.envs_per_task)
        self.env_probs = self.probs[self.task_index]  # [N, k]
        self.episode_count = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)

    @property
    def n_actions(self) -> int:
        return self.n_arms

    def reset(self) -> torch.Tensor:
        """Start a trial: episode counters to 0; returns the observations ``[N]`` (all 0)."""
        self.episode_count.zero_()
        return torch.zeros(self.num_envs, dtype=torch.long, device=self.device)

    def step(self, actions: torch.Tensor):
        """Pull one arm per environment: ``actions`` holds the arm indices (long ``[N]``). Returns
        ``(obs, reward, terminated, truncated, info)``: obs ``[N]`` long (0), reward ``[N]`` float32
        in {0, 1}, terminated all True, truncated all False, info ``{"final_obs": obs}``."""
        if self.check:
            actions = _check_actions("BatchedBandit", actions, self.num_envs, self.n_arms)
        actions = actions.to(self.device)
        p = self.env_probs.gather(1, actions.view(-1, 1)).squeeze(1)
        u = torch.rand(self.num_envs, generator=self.generator, device=self.device)
        reward = (u < p).to(torch.float32)
        self.episode_count += 1
        obs = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        done = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        return obs, reward, done, torch.zeros_like(done), {"final_obs": obs}

    def expected_rewards(self) -> torch.Tensor:
        """Expected reward of each arm per environment, ``[N, k]``."""
        return self.env_probs

    def optimal_trial_reward(self, n_pulls: int) -> torch.Tensor:
        """Expected total reward over ``n_pulls`` pulls of a policy that knows the task, ``[N]``:
        ``n_pulls * max(p)``."""
        return n_pulls * self.env_probs.amax(dim=1)
