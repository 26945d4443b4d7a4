"""Random tabular MDPs (Duan et al. 2016, RL²; Osband et al. 2013).

A task has ``|S| = 10`` states and ``|A| = 5`` actions. Mean rewards ``mu[s, a] ~ N(1, 1)``
i.i.d.; an observed reward is ``N(mu[s, a], 1)``; each transition row ``P[s, a, :]`` is drawn
from a flat Dirichlet (all concentrations 1). Episodes last ``horizon = 10`` steps and **every
episode starts in state 0** -- the choice of the RL² authors' environment and of the TabulaRL
code their baselines ran on (both reset to state 0); a trial is ``n`` such episodes in the same
MDP (the authors' baseline script runs ``n`` = 10, 25, 50, 75, 100).

The end of an episode (``horizon`` steps) is part of the task's definition (a finite-horizon
MDP), so it is reported as ``terminated``, not ``truncated``. :class:`BatchedMDP` steps many tasks
with tensors and resets finished episodes in the same step (``info["final_obs"]`` holds the
state each transition reached); the single-task Gymnasium environment is
:class:`metafit.rl.TabularMDPEnv`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ...errors import ConfigError, TaskError, constraint_message
from ._common import check_actions as _check_actions
from ._common import (check_finite, check_int, check_nonnegative, check_positive, make_generator, require_gymnasium,
                      stack_tasks)

__all__ = ["MDPTask", "TabularMDPFamily", "BatchedMDP", "solve_finite_horizon", "sample_dirichlet"]


@dataclass(frozen=True)
class MDPTask:
    """``rewards_mean [S, A]``, ``transitions [S, A, S]`` (rows sum to 1), ``reward_std`` (the
    standard deviation of the Gaussian reward noise). A leading task dimension makes it a batch."""

    rewards_mean: torch.Tensor
    transitions: torch.Tensor
    reward_std: float | torch.Tensor = 1.0

    @property
    def n_states(self) -> int:
        return int(self.rewards_mean.shape[-2])

    @property
    def n_actions(self) -> int:
        return int(self.rewards_mean.shape[-1])


def sample_dirichlet(concentration: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dirichlet samples along the last dimension. Flat concentration 1 uses normalised
    exponentials (exact, all in torch); other values use numpy's gamma sampler seeded from
    ``generator``, so results are reproducible either way."""
    concentration = torch.as_tensor(concentration, dtype=torch.float64)
    if bool((concentration == 1).all()):
        u = torch.rand(concentration.shape, generator=generator, dtype=torch.float64)
        x = -torch.log1p(-u)  # Exp(1); log1p(-u) is finite for u in [0, 1)
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        x = torch.from_numpy(np.random.default_rng(seed).standard_gamma(concentration.cpu().numpy()))
    return x / x.sum(-1, keepdim=True)


@dataclass(frozen=True)
class TabularMDPFamily:
    """Random MDPs as in RL² (defaults) with ``n_states`` states and ``n_actions`` actions:
    ``mu ~ N(reward_mean_loc, reward_mean_scale^2)`` per state and action, rewards
    ``N(mu, reward_std^2)``, transitions ``Dirichlet(dirichlet_alpha * 1)``, episodes of
    ``horizon`` steps from ``start_state``. Invalid settings are a ConfigError."""

    n_states: int = 10
    n_actions: int = 5
    horizon: int = 10
    reward_mean_loc: float = 1.0
    reward_mean_scale: float = 1.0
    reward_std: float = 1.0
    dirichlet_alpha: float = 1.0
    start_state: int = 0

    task_type = MDPTask
    discrete_observations = True
    discrete_actions = True
    action_bound = 1.0

    @property
    def observation_size(self) -> int:
        return self.n_states

    @property
    def action_size(self) -> int:
        return self.n_actions

    def __post_init__(self) -> None:
        owner = "TabularMDPFamily"
        check_int(owner, "n_states", self.n_states, 1)
        check_int(owner, "n_actions", self.n_actions, 1)
        check_int(owner, "horizon", self.horizon, 1)
        check_nonnegative(owner, "reward_mean_scale", self.reward_mean_scale)
        check_nonnegative(owner, "reward_std", self.reward_std)
        check_positive(owner, "dirichlet_alpha", self.dirichlet_alpha)
        check_finite(owner, "reward_mean_loc", self.reward_mean_loc)
        if isinstance(self.start_state, bool) or not isinstance(self.start_state, int) \
                or not 0 <= self.start_state < self.n_states:
            raise ConfigError(constraint_message(owner, "start_state", f"an integer in [0, {self.n_states})",
                                                 self.start_state, "Pick an existing state."))

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> list[MDPTask]:
        """``n`` MDPs (:class:`MDPTask`) drawn from ``generator`` (None: torch's global stream)."""
        check_int("TabularMDPFamily", "n", n, 1)
        S, A = self.n_states, self.n_actions
        mu = self.reward_mean_loc + self.reward_mean_scale * torch.randn(n, S, A, generator=generator,
                                                                          dtype=torch.float64)
        P = sample_dirichlet(torch.full((n, S, A, S), float(self.dirichlet_alpha)), generator)
        return [MDPTask(mu[i], P[i], float(self.reward_std)) for i in range(n)]

    def batched(self, tasks: Sequence[MDPTask] | MDPTask, envs_per_task: int = 1, *, seed: int | None = None,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                check_actions: bool = True) -> "BatchedMDP":
        """A :class:`BatchedMDP` of this family's horizon and start state playing ``tasks``, each in
        ``envs_per_task`` copies, on ``device``; its noise comes from ``generator`` or, without one,
        a generator seeded with ``seed``; ``check_actions`` validates every step's actions."""
        return BatchedMDP(tasks, self.horizon, envs_per_task, start_state=self.start_state, seed=seed,
                          generator=generator, device=device, check_actions=check_actions)

    def make_env(self, task: MDPTask | None = None):
        """A single-task Gymnasium environment (needs the ``rl`` extra)."""
        require_gymnasium("TabularMDPFamily.make_env")
        from .gym_envs import TabularMDPEnv  # lazily: it imports gymnasium (and never this module)

        return TabularMDPEnv(self, task)


def solve_finite_horizon(rewards: torch.Tensor, transitions: torch.Tensor, horizon: int):
    """Backward induction for a finite-horizon MDP, batched over leading dimensions.

    ``rewards [..., S, A]``, ``transitions [..., S, A, S]``. Returns ``(Q, V)`` with
    ``Q [..., H, S, A]`` (``Q[..., h]``: step ``h`` of the episode, ``H - h`` steps to go) and
    ``V [..., H + 1, S]`` (``V[..., H] = 0``)."""
    *batch, S, A = rewards.shape
    V = rewards.new_zeros(*batch, horizon + 1, S)
    Q = rewards.new_zeros(*batch, horizon, S, A)
    for h in range(horizon - 1, -1, -1):
        Q[..., h, :, :] = rewards + (transitions @ V[..., h + 1, :].unsqueeze(-2).unsqueeze(-1)).squeeze(-1)
        V[..., h, :] = Q[..., h, :, :].amax(dim=-1)
    return Q, V


class BatchedMDP:
    """``B`` tabular MDP tasks x ``envs_per_task`` copies, stepped together with tensors.

    Observations are state indices (long ``[N]``). When an episode ends (after ``horizon`` steps)
    ``terminated`` is True, ``info["final_obs"]`` holds the state the last transition reached and
    the returned observation is already the next episode's start state (same-step reset).
    ``t`` (step within the episode) and ``episode_count`` are tensors ``[N]``.

    ``tasks`` are :class:`MDPTask` objects (or one with a leading task dimension), each played by
    ``envs_per_task`` environments from ``start_state`` on ``device``. Reward and transition noise
    come from ``generator`` or, without one, a new generator seeded with ``seed`` (None: a
    nondeterministic seed). ``check_actions`` validates the actions of every step (turn it off
    to save time once they are known to be valid).
    """

    def __init__(self, tasks: Sequence[MDPTask] | MDPTask, horizon: int = 10, envs_per_task: int = 1, *,
                 start_state: int = 0, seed: int | None = None, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", check_actions: bool = True) -> None:
        self.horizon = check_int("BatchedMDP", "horizon", horizon, 1)
        self.envs_per_task = check_int("BatchedMDP", "envs_per_task", envs_per_task, 1)
        self.start_state = int(start_state)
        self.device = torch.device(device)
        self.generator = make_generator(seed, generator, self.device)
        self.check = check_actions
        self.set_tasks(tasks)

    def set_tasks(self, tasks: Sequence[MDPTask] | MDPTask) -> None:
        """Swap in new tasks (any number, same or new sizes); call :meth:`reset` afterwards."""
        t = stack_tasks("BatchedMDP", tasks, MDPTask, {"rewards_mean": 2, "transitions": 3, "reward_std": 0})
        R, P, std = t["rewards_mean"], t["transitions"], t["reward_std"]
        B, S, A = R.shape
        if std.numel() == 1:  # one noise level for a pre-stacked batch
            std = std.reshape(1).expand(B)
        if std.shape != (B,) or not bool((std >= 0).all()):
            raise TaskError(constraint_message("BatchedMDP", "tasks.reward_std", "one number >= 0 per task",
                                               tuple(std.shape), "Pass a float (or one per task)."))
        if P.shape != (B, S, A, S):
            raise TaskError(constraint_message("BatchedMDP", "tasks.transitions",
                                               f"of shape [S, A, S] = [{S}, {A}, {S}]", tuple(P.shape[1:]),
                                               "Pass transitions matching rewards_mean."))
        if not bool((P >= 0).all()) or not torch.allclose(P.sum(-1).double(), torch.ones((), dtype=torch.float64),
                                                          atol=1e-5):
            raise TaskError(constraint_message("BatchedMDP", "tasks.transitions", "probability rows (>= 0, sum 1)",
                                               "other values", "Normalise each transitions[s, a, :] row."))
        if not (0 <= self.start_state < S):
            raise ConfigError(constraint_message("BatchedMDP", "start_state", f"in [0, {S})", self.start_state,
                                                 "Pick an existing state."))
        dev = self.device
        self.rewards_mean = R.to(dev, torch.float32)
        self.transitions = P.to(dev, torch.float32)
        self.reward_std = std.to(dev, torch.float32).reshape(B)
        self.num_tasks, self.n_states, self.n_actions = B, S, A
        self.num_envs = B * self.envs_per_task
        self.task_index = torch.arange(B, device=dev).repeat_interleave(self.envs_per_task)
        # flat lookups: row = (task * S + s) * A + a
        self._mean_flat = self.rewards_mean.reshape(-1)
        cdf = P.to(dev, torch.float64).cumsum(-1)
        cdf[..., -1] = 1.0
        self._cdf_rows = cdf.to(torch.float32).reshape(B * S * A, S)
        self._env_std = self.reward_std[self.task_index]
        self._row_base = self.task_index * (S * A)
        self.state = torch.full((self.num_envs,), self.start_state, dtype=torch.long, device=dev)
        self.t = torch.zeros(self.num_envs, dtype=torch.long, device=dev)
        self.episode_count = torch.zeros(self.num_envs, dtype=torch.long, device=dev)

    def reset(self) -> torch.Tensor:
        """Start a trial: every environment at the start state, step and episode counters 0."""
        self.state.fill_(self.start_state)
        self.t.zero_()
        self.episode_count.zero_()
        return self.state.clone()

    def step(self, actions: torch.Tensor):
        """Apply ``actions``, one action index per environment (long ``[N]``); returns
        ``(obs, reward, terminated, truncated, info)``: obs ``[N]`` long, reward ``[N]`` float32,
        terminated ``[N]`` (the episode's last step), truncated all False, info ``{"final_obs": ...}``."""
        if self.check:
            actions = _check_actions("BatchedMDP", actions, self.num_envs, self.n_actions)
        actions = actions.to(self.device)
        row = self._row_base + self.state * self.n_actions + actions
        noise = torch.randn(self.num_envs, generator=self.generator, device=self.device)
        reward = self._mean_flat[row] + self._env_std * noise
        u = torch.rand(self.num_envs, 1, generator=self.generator, device=self.device)
        nxt = (self._cdf_rows[row] <= u).sum(-1).clamp_(max=self.n_states - 1)
        self.t += 1
        done = self.t >= self.horizon
        obs = torch.where(done, torch.full_like(nxt, self.start_state), nxt)
        self.state = obs
        self.t = torch.where(done, torch.zeros_like(self.t), self.t)
        self.episode_count += done
        return obs.clone(), reward, done, torch.zeros_like(done), {"final_obs": nxt}

    def optimal_values(self) -> torch.Tensor:
        """Expected return of one episode under the optimal policy of each environment's task,
        ``[N]`` (from the start state)."""
        _, V = solve_finite_horizon(self.rewards_mean.double(), self.transitions.double(), self.horizon)
        return V[:, 0, self.start_state][self.task_index].float()
