"""Meta-RL: environment families, learners and classical baselines, in three rooms:

- :mod:`metafit.rl.envs`: families (a :class:`~metafit.rl.envs.base.Family` protocol), their
  batched torch and Gymnasium environments, and the registry :data:`FAMILIES`;
- :mod:`metafit.rl.learners`: RL² and MAML-RL (:class:`~metafit.rl.learners.base.RLLearner`) and
  the registry :data:`RL_LEARNERS`;
- :mod:`metafit.rl.baselines`: classical bandit and MDP agents and their trial runners.

This package re-exports their public names.

Families (frozen dataclasses) sample tasks with ``sample_tasks(n, generator)``; each simple family
has a batched torch environment that steps many tasks, and several copies of each, at once
(``family.batched(tasks, envs_per_task)``), and a single-task Gymnasium environment with
``set_task`` / ``sample_tasks`` (``family.make_env(task)``; needs ``pip install "metafit[rl]"``).
Each family, with its task, batched torch environment and Gymnasium environment:

- ``BanditFamily``: task ``BanditTask``, batched ``BatchedBandit``, Gymnasium ``BanditEnv``;
- ``TabularMDPFamily``: task ``MDPTask``, batched ``BatchedMDP``, Gymnasium ``TabularMDPEnv``;
- ``NavigationFamily``: task ``NavTask``, batched ``BatchedNavigation``, Gymnasium ``NavigationEnv``;
- ``HalfCheetahVelFamily``: task ``VelocityTask``, no batched environment, Gymnasium
  ``HalfCheetahVelEnv`` (needs mujoco);
- ``HalfCheetahDirFamily``: task ``DirectionTask``, no batched environment, Gymnasium
  ``HalfCheetahDirEnv`` (needs mujoco).

A trial (RL²) is ``n`` episodes in one task: the batched environments reset finished episodes in
the same step and count them in ``episode_count``; tasks change only through ``set_tasks``.
Baselines (:mod:`metafit.rl.baselines`) play whole trials in the batched bandit and MDP.
"""

from __future__ import annotations

from .baselines import (
    BEB,
    PSRL,
    UCRL2,
    BanditAgent,
    EpsilonGreedyBandit,
    EpsilonGreedyMDP,
    MAX_GITTINS_PULLS,
    GittinsBandit,
    MDPAgent,
    MyopicMDP,
    OptimisticPSRL,
    RandomBandit,
    RandomMDP,
    ThompsonBandit,
    UCB1Bandit,
    finite_horizon_gittins_table,
    mean_ci,
    run_bandit_trials,
    run_mdp_trials,
    tune,
)
from .envs import (
    FAMILIES,
    GYM_ENVS,
    BanditFamily,
    BanditTask,
    BatchedBandit,
    BatchedMDP,
    BatchedNavigation,
    DirectionTask,
    Family,
    HalfCheetahDirFamily,
    HalfCheetahVelFamily,
    MDPTask,
    MissingExtraError,
    NavigationFamily,
    NavTask,
    TabularMDPFamily,
    VelocityTask,
    expected_standing_still_return,
    make_family,
    oracle_action,
    solve_finite_horizon,
)
from .learners import MAMLRL, RL2, RL_LEARNERS, MAMLRLConfig, RL2Config, RLLearner, get_rl_learner

__all__ = [
    "BEB",
    "PSRL",
    "RL2",
    "RL2Config",
    "UCRL2",
    "BanditAgent",
    "BanditFamily",
    "BanditTask",
    "BatchedBandit",
    "BatchedMDP",
    "BatchedNavigation",
    "DirectionTask",
    "EpsilonGreedyBandit",
    "EpsilonGreedyMDP",
    "FAMILIES",
    "Family",
    "GittinsBandit",
    "HalfCheetahDirFamily",
    "HalfCheetahVelFamily",
    "MAMLRL",
    "MAX_GITTINS_PULLS",
    "MAMLRLConfig",
    "MDPAgent",
    "MDPTask",
    "MissingExtraError",
    "NavTask",
    "NavigationFamily",
    "MyopicMDP",
    "OptimisticPSRL",
    "RLLearner",
    "RL_LEARNERS",
    "RandomBandit",
    "RandomMDP",
    "TabularMDPFamily",
    "ThompsonBandit",
    "UCB1Bandit",
    "VelocityTask",
    "expected_standing_still_return",
    "finite_horizon_gittins_table",
    "get_rl_learner",
    "make_family",
    "mean_ci",
    "oracle_action",
    "run_bandit_trials",
    "run_mdp_trials",
    "solve_finite_horizon",
    "tune",
    *GYM_ENVS,
]


def __getattr__(name: str):
    """The Gymnasium environments load on first use, so ``metafit.rl`` imports without gymnasium."""
    if name in GYM_ENVS:
        from . import envs

        return getattr(envs, name)
    raise AttributeError(f"module 'metafit.rl' has no attribute {name!r}")
