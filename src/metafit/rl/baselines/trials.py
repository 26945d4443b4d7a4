"""Playing baseline agents: one trial per environment of a batched bandit or MDP, and picking an
agent's parameter on a grid of tuning instances."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ...errors import ConfigError, constraint_message
from ...stats import mean_ci
from ..envs._common import check_int
from ..envs.bandits import BatchedBandit
from ..envs.mdp import BatchedMDP
from .bandit import BanditAgent
from .mdp import MDPAgent

__all__ = ["run_bandit_trials", "run_mdp_trials", "tune", "mean_ci"]


def run_bandit_trials(env: BatchedBandit, agent: BanditAgent, n_pulls: int, seed: int = 0) -> torch.Tensor:
    """Play one trial of ``n_pulls`` pulls of ``agent`` in every environment of ``env`` (reset first),
    the agent's random streams seeded with ``seed``; returns the total reward per environment ``[N]``."""
    check_int("run_bandit_trials", "n_pulls", n_pulls, 1)
    env.reset()
    agent.begin_trial(env.num_envs, env.n_arms, n_pulls, seed=seed, device=env.device)
    total = torch.zeros(env.num_envs, dtype=torch.float64, device=env.device)
    for _ in range(n_pulls):
        actions = agent.act()
        _, reward, _, _, _ = env.step(actions)
        agent.observe(actions, reward)
        total += reward
    return total


def run_mdp_trials(env: BatchedMDP, agent: MDPAgent, n_episodes: int, seed: int = 0,
                   on_step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Play one trial of ``n_episodes`` episodes in every environment (all start together, every
    episode lasts ``env.horizon`` steps) with ``agent``, its random streams seeded with ``seed``;
    returns the total reward per environment ``[N]``. ``on_step``, if
    given, is called after every step with the states acted in, the actions and the rewards ``[N]``
    (to record trajectories)."""
    check_int("run_mdp_trials", "n_episodes", n_episodes, 1)
    states = env.reset()
    agent.begin_trial(env.num_envs, env.n_states, env.n_actions, env.horizon, seed=seed, device=env.device)
    total = torch.zeros(env.num_envs, dtype=torch.float64, device=env.device)
    for episode in range(n_episodes):
        agent.begin_episode(episode)
        for t in range(env.horizon):
            actions = agent.act(states, t)
            nxt, reward, _, _, info = env.step(actions)
            agent.observe(states, actions, reward, info["final_obs"])
            if on_step is not None:
                on_step(states, actions, reward)
            total += reward
            states = nxt
    return total


def tune(make_agent: Callable[[float], object], grid: Sequence[float],
         evaluate: Callable[[object], torch.Tensor]) -> tuple[float, dict[float, float]]:
    """Evaluate ``make_agent(value)`` for every grid value (``evaluate`` returns per-instance
    totals); returns the value with the highest mean (first on ties) and all means. Tune on
    instances other than the ones you report."""
    if len(grid) == 0:
        raise ConfigError(constraint_message("tune", "grid", "non-empty", list(grid), "Pass at least one value."))
    scores = {v: float(evaluate(make_agent(v)).double().mean()) for v in grid}
    best = max(scores, key=lambda v: scores[v])
    return best, scores
