"""Classical baselines for the meta-RL families (this room: agents that know nothing of learning
across tasks, the comparison columns of RL², Duan et al. 2016, tables 1 and 2).

Each agent plays whole trials in a batched environment of :mod:`metafit.rl.envs`, vectorised over
environments: bandit agents (:mod:`.bandit`, with the finite-horizon Gittins index of
:mod:`.gittins`) in a :class:`~metafit.rl.BatchedBandit`, MDP agents (:mod:`.mdp`) in a
:class:`~metafit.rl.BatchedMDP`. Runners (:mod:`.trials`): :func:`run_bandit_trials`,
:func:`run_mdp_trials`; :func:`tune` picks a parameter on a grid, :func:`mean_ci` gives the mean and
the 95% confidence half-width. This room may import the base modules and :mod:`metafit.rl.envs`.
"""

from __future__ import annotations

from .bandit import BanditAgent, EpsilonGreedyBandit, GittinsBandit, RandomBandit, ThompsonBandit, UCB1Bandit
from .gittins import MAX_GITTINS_PULLS, finite_horizon_gittins_table
from .mdp import (
    BEB,
    PSRL,
    UCRL2,
    EpsilonGreedyMDP,
    MDPAgent,
    MyopicMDP,
    OptimisticPSRL,
    RandomMDP,
    extended_value_iteration,
)
from .trials import mean_ci, run_bandit_trials, run_mdp_trials, tune

__all__ = [
    "BEB",
    "MAX_GITTINS_PULLS",
    "PSRL",
    "UCRL2",
    "BanditAgent",
    "EpsilonGreedyBandit",
    "EpsilonGreedyMDP",
    "GittinsBandit",
    "MDPAgent",
    "MyopicMDP",
    "OptimisticPSRL",
    "RandomBandit",
    "RandomMDP",
    "ThompsonBandit",
    "UCB1Bandit",
    "extended_value_iteration",
    "finite_horizon_gittins_table",
    "mean_ci",
    "run_bandit_trials",
    "run_mdp_trials",
    "tune",
]
