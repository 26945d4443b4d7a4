"""Meta-RL environment families and classical baselines.

Families (frozen dataclasses) sample tasks with ``sample_tasks(n, generator)``; each simple family
has a batched torch environment that steps many tasks, and several copies of each, at once
(``family.batched(tasks, envs_per_task)``), and a single-task Gymnasium environment with
``set_task`` / ``sample_tasks`` (``family.make_env(task)``; needs ``pip install "metafit[rl]"``):

==========================  ====================  ===================  ================================
family                      task                  batched (torch)      Gymnasium env
==========================  ====================  ===================  ================================
``BanditFamily``            ``BanditTask``        ``BatchedBandit``    ``BanditEnv``
``TabularMDPFamily``        ``MDPTask``           ``BatchedMDP``       ``TabularMDPEnv``
``NavigationFamily``        ``NavTask``           ``BatchedNavigation`` ``NavigationEnv``
``HalfCheetahVelFamily``    ``VelocityTask``      --                   ``HalfCheetahVelEnv`` (mujoco)
``HalfCheetahDirFamily``    ``DirectionTask``     --                   ``HalfCheetahDirEnv`` (mujoco)
==========================  ====================  ===================  ================================

A trial (RL²) is ``n`` episodes in one task: the batched environments reset finished episodes in
the same step and count them in ``episode_count``; tasks change only through ``set_tasks``.
Baselines (:mod:`metafit.rl.baselines`) play whole trials in the batched bandit and MDP.
"""

from __future__ import annotations

from ..errors import ConfigError, constraint_message
from ._common import MissingExtraError
from .bandits import BanditFamily, BanditTask, BatchedBandit
from .baselines import (
    BEB,
    PSRL,
    UCRL2,
    BanditAgent,
    EpsilonGreedyBandit,
    EpsilonGreedyMDP,
    GittinsBandit,
    MDPAgent,
    MyopicMDP,
    OptimisticPSRL,
    RandomBandit,
    RandomMDP,
    ThompsonBandit,
    UCB1Bandit,
    mean_ci,
    run_bandit_trials,
    run_mdp_trials,
    tune,
)
from .gittins import finite_horizon_gittins_table
from .maml_rl import MAMLRL, MAMLRLConfig
from .mdp import BatchedMDP, MDPTask, TabularMDPFamily, solve_finite_horizon
from .mujoco import DirectionTask, HalfCheetahDirFamily, HalfCheetahVelFamily, VelocityTask
from .navigation import (
    BatchedNavigation,
    NavigationFamily,
    NavTask,
    expected_standing_still_return,
    oracle_action,
)
from .rl2 import RL2, RL2Config

_GYM_ENVS = ("BanditEnv", "TabularMDPEnv", "NavigationEnv", "HalfCheetahVelEnv", "HalfCheetahDirEnv")

# name -> family class: adding an environment family is one module plus one line here
FAMILIES: dict[str, type] = {
    "bandit": BanditFamily,
    "tabular-mdp": TabularMDPFamily,
    "navigation": NavigationFamily,
    "halfcheetah-vel": HalfCheetahVelFamily,
    "halfcheetah-dir": HalfCheetahDirFamily,
}


def make_family(name: str, **settings):
    """A family by registry name, e.g. ``make_family("bandit", n_arms=10)``."""
    if name not in FAMILIES:
        raise ConfigError(constraint_message("make_family", "name", f"one of {sorted(FAMILIES)}", name,
                                             "Choose one of the listed families."))
    try:
        return FAMILIES[name](**settings)
    except TypeError as err:
        raise ConfigError(f"make_family: unknown setting for {name!r} ({err}). Valid settings: "
                          f"{', '.join(FAMILIES[name].__dataclass_fields__)}.") from err

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
    "GittinsBandit",
    "HalfCheetahDirFamily",
    "HalfCheetahVelFamily",
    "MAMLRL",
    "MAMLRLConfig",
    "MDPAgent",
    "MDPTask",
    "MissingExtraError",
    "NavTask",
    "NavigationFamily",
    "MyopicMDP",
    "OptimisticPSRL",
    "RandomBandit",
    "RandomMDP",
    "TabularMDPFamily",
    "ThompsonBandit",
    "UCB1Bandit",
    "VelocityTask",
    "expected_standing_still_return",
    "finite_horizon_gittins_table",
    "make_family",
    "mean_ci",
    "oracle_action",
    "run_bandit_trials",
    "run_mdp_trials",
    "solve_finite_horizon",
    "tune",
    *_GYM_ENVS,
]


def __getattr__(name: str):
    """The Gymnasium environments load on first use, so ``metafit.rl`` imports without gymnasium."""
    if name in _GYM_ENVS:
        from ._common import require_gymnasium

        require_gymnasium(f"metafit.rl.{name}")
        from . import gym_envs

        return getattr(gym_envs, name)
    raise AttributeError(f"module 'metafit.rl' has no attribute {name!r}")
