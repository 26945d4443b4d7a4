"""Classical agents for Bernoulli bandits -- the comparison columns of RL² (Duan et al. 2016,
table 1) -- that play a whole trial in a :class:`~metafit.rl.BatchedBandit`, vectorised over
environments (play them with :func:`metafit.rl.run_bandit_trials`). Variants follow the bandit
script the RL² authors ran their baselines with; differences are stated.

Bandits (Beta(1, 1) pseudo-counts wherever a prior enters, as in the authors' script):

* ``RandomBandit``: uniform arm.
* ``GittinsBandit``: the arm with the largest *finite-horizon* Gittins index given the pulls left
  (:mod:`metafit.rl.baselines.gittins`; exact up to a 2e-4 grid error). The authors' script used a
  discounted index table; the finite-horizon index needs no discount to tune and is within a
  fraction of a percent of Bayes-optimal on the cases we can solve exactly.
* ``ThompsonBandit``: sample each arm's Beta posterior, play the argmax. ``n_samples > 1`` is the
  paper's "OTS" column as the authors' script computes it: draw ``n_samples`` joint posterior
  samples, keep the one with the highest posterior density, play its argmax (more samples: closer
  to the posterior mode, so greedier; their script used 7, ours is tuned on a grid). This is not
  the optimistic Thompson sampling of Chapelle and Li (2011), which raises each sample to the
  posterior mean.
* ``UCB1Bandit``: ``(s + 1) / (n + 2) + c * sqrt(2 ln t / (n + 2))`` with ``t`` the pulls so far
  (the authors' pseudo-counts; ``prior=(0, 0)`` gives textbook UCB1, untried arms first);
  ``c`` tuned on a grid.
* ``EpsilonGreedyBandit``: posterior mean ``(s + 1) / (n + 2)``, a uniform arm with probability
  ``epsilon`` (tuned); ``epsilon = 0`` is the paper's "Greedy" column (the 0.5 prior mean of an
  untried arm makes it mildly optimistic).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ...errors import ConfigError, constraint_message
from ..envs._common import check_int, check_nonnegative, random_argmax
from ._checks import check_prior as _check_prior
from ._checks import check_probability as _check_probability
from .gittins import finite_horizon_gittins_table

__all__ = ["BanditAgent", "RandomBandit", "GittinsBandit", "ThompsonBandit", "UCB1Bandit", "EpsilonGreedyBandit"]


class BanditAgent:
    """Base: Beta-Bernoulli counts per environment and arm, updated after every pull.

    ``prior`` is the pair of Beta pseudo-counts ``(a0, b0)`` (successes, failures; both >= 0)
    added to the observed counts. Subclasses implement :meth:`act`; a trial is
    :meth:`begin_trial`, then :meth:`act` and :meth:`observe` once per pull (see
    :func:`~metafit.rl.baselines.trials.run_bandit_trials`)."""

    name = "agent"

    def __init__(self, prior: Sequence[float] = (1.0, 1.0)) -> None:
        self.prior = _check_prior(type(self).__name__, prior)

    def begin_trial(self, num_envs: int, n_arms: int, n_pulls: int, *, seed: int = 0,
                    device: torch.device | str = "cpu") -> None:
        """Start a trial of ``n_pulls`` pulls in ``num_envs`` environments of ``n_arms`` arms: counts
        to 0 on ``device``, the agent's random streams seeded with ``seed``."""
        self.device = torch.device(device)
        self.num_envs, self.n_arms, self.n_pulls = num_envs, n_arms, n_pulls
        self.successes = torch.zeros(num_envs, n_arms, device=self.device)
        self.failures = torch.zeros(num_envs, n_arms, device=self.device)
        self.t = 0
        self.generator = torch.Generator(self.device).manual_seed(int(seed))
        self.np_rng = np.random.default_rng(int(seed))

    def posterior_mean(self) -> torch.Tensor:
        """Each arm's posterior mean success probability ``(s + a0) / (n + a0 + b0)``, ``[num_envs, n_arms]``."""
        a0, b0 = self.prior
        n = self.successes + self.failures
        return (self.successes + a0) / (n + a0 + b0).clamp_min(1e-12)

    def act(self) -> torch.Tensor:
        """The arm to pull next in every environment, ``[num_envs]`` (long)."""
        raise NotImplementedError

    def observe(self, actions: torch.Tensor, rewards: torch.Tensor) -> None:
        """Count the pull: ``actions`` (the arms pulled, ``[num_envs]``) paid ``rewards`` (0 or 1, ``[num_envs]``)."""
        r = rewards.to(self.successes.dtype).view(-1, 1)
        idx = actions.view(-1, 1)
        self.successes.scatter_add_(1, idx, r)
        self.failures.scatter_add_(1, idx, 1.0 - r)
        self.t += 1


class RandomBandit(BanditAgent):
    """A uniformly random arm at every pull. ``prior`` as for :class:`BanditAgent` (unused by its choices)."""

    name = "random"

    def act(self) -> torch.Tensor:
        """A uniform arm per environment, ``[num_envs]``."""
        return torch.randint(0, self.n_arms, (self.num_envs,), generator=self.generator, device=self.device)


class EpsilonGreedyBandit(BanditAgent):
    """Posterior-mean greedy with probability ``1 - epsilon``, uniform otherwise; ``prior`` gives
    the Beta pseudo-counts of the posterior mean (see :class:`BanditAgent`)."""

    def __init__(self, epsilon: float = 0.0, prior: Sequence[float] = (1.0, 1.0)) -> None:
        super().__init__(prior)
        self.epsilon = _check_probability("EpsilonGreedyBandit", "epsilon", epsilon)
        self.name = "greedy" if self.epsilon == 0 else "epsilon-greedy"

    def act(self) -> torch.Tensor:
        """Per environment, the arm of the largest posterior mean (ties at random), or with
        probability ``epsilon`` a uniform arm; ``[num_envs]``."""
        greedy = random_argmax(self.posterior_mean(), self.generator)
        if self.epsilon == 0:
            return greedy
        explore = torch.rand(self.num_envs, generator=self.generator, device=self.device) < self.epsilon
        uniform = torch.randint(0, self.n_arms, (self.num_envs,), generator=self.generator, device=self.device)
        return torch.where(explore, uniform, greedy)


class UCB1Bandit(BanditAgent):
    """``mean + c * sqrt(2 ln t / n)`` with pseudo-counts ``prior`` (``t`` = pulls so far)."""

    name = "ucb1"

    def __init__(self, c: float = 1.0, prior: Sequence[float] = (1.0, 1.0)) -> None:
        super().__init__(prior)
        self.c = check_nonnegative("UCB1Bandit", "c", c)

    def act(self) -> torch.Tensor:
        """Per environment, the arm of the largest UCB index (ties at random; arms with no
        pseudo-counts first), ``[num_envs]``."""
        a0, b0 = self.prior
        n = self.successes + self.failures + a0 + b0
        mean = (self.successes + a0) / n.clamp_min(1e-12)
        log_t = math.log(self.t) if self.t > 0 else 0.0
        index = mean + self.c * torch.sqrt(2.0 * log_t / n.clamp_min(1e-12))
        index = torch.where(n > 0, index, torch.full_like(index, float("inf")))
        return random_argmax(index, self.generator)


class ThompsonBandit(BanditAgent):
    """One sample from each arm's Beta posterior; play the largest. With ``n_samples > 1`` (the
    RL² paper's "OTS"), the most probable of ``n_samples`` joint posterior draws is used.
    ``prior``: the Beta prior ``(a0, b0)``, both positive."""

    def __init__(self, prior: Sequence[float] = (1.0, 1.0), n_samples: int = 1) -> None:
        super().__init__(prior)
        if min(self.prior) <= 0:
            raise ConfigError(constraint_message("ThompsonBandit", "prior", "two positive numbers", self.prior,
                                                 "Use a proper Beta prior such as (1, 1)."))
        self.n_samples = check_int("ThompsonBandit", "n_samples", n_samples, 1)
        self.name = "thompson" if self.n_samples == 1 else "optimistic-thompson"

    def index(self) -> torch.Tensor:
        """The values the next pull maximises ``[num_envs, n_arms]`` (a posterior draw)."""
        a0, b0 = self.prior
        a = (self.successes + a0).cpu().numpy().astype(np.float64)
        b = (self.failures + b0).cpu().numpy().astype(np.float64)
        if self.n_samples == 1:
            return torch.from_numpy(self.np_rng.beta(a, b)).to(self.device)
        theta = torch.from_numpy(self.np_rng.beta(a, b, size=(self.n_samples, *a.shape)))  # [K, N, A]
        at, bt = torch.from_numpy(a), torch.from_numpy(b)
        # joint log density up to the per-environment constant (the same for every draw)
        logp = (torch.special.xlogy(at - 1, theta) + torch.special.xlogy(bt - 1, 1 - theta)).sum(-1)  # [K, N]
        return theta[logp.argmax(0), torch.arange(theta.shape[1])].to(self.device)

    def act(self) -> torch.Tensor:
        """Per environment, the arm of the largest posterior draw (see :meth:`index`), ``[num_envs]``."""
        return random_argmax(self.index(), self.generator)


class GittinsBandit(BanditAgent):
    """Largest finite-horizon Gittins index (see :mod:`metafit.rl.baselines.gittins`). ``prior``: the
    Beta prior ``(a0, b0)``, both positive; ``grid``: the points of the index table's grid (see
    :func:`~metafit.rl.baselines.gittins.finite_horizon_gittins_table`)."""

    name = "gittins"

    def __init__(self, prior: Sequence[float] = (1.0, 1.0), grid: int = 201) -> None:
        super().__init__(prior)
        if min(self.prior) <= 0:
            raise ConfigError(constraint_message("GittinsBandit", "prior", "two positive numbers", self.prior,
                                                 "Use a proper Beta prior such as (1, 1)."))
        self.grid = check_int("GittinsBandit", "grid", grid, 3)

    def begin_trial(self, num_envs: int, n_arms: int, n_pulls: int, *, seed: int = 0,
                    device: torch.device | str = "cpu") -> None:
        """As :meth:`BanditAgent.begin_trial` (``num_envs``, ``n_arms``, ``n_pulls``, ``seed``,
        ``device``), and compute (or fetch from the cache) the index table for ``n_pulls`` pulls."""
        super().begin_trial(num_envs, n_arms, n_pulls, seed=seed, device=device)
        table = finite_horizon_gittins_table(n_pulls, self.prior, self.grid)
        self._table = table.to(self.device, torch.float32).reshape(n_pulls + 1, -1)
        self._side = n_pulls + 1

    def act(self) -> torch.Tensor:
        """Per environment, the arm of the largest index given its counts and the pulls left (ties
        at random), ``[num_envs]``; a pull past ``n_pulls`` is a ConfigError."""
        remaining = self.n_pulls - self.t
        if remaining < 1:
            raise ConfigError(constraint_message("GittinsBandit", "pulls", f"at most n_pulls = {self.n_pulls}",
                                                 self.t + 1, "Start a new trial with begin_trial()."))
        flat = self.successes.long() * self._side + self.failures.long()
        return random_argmax(self._table[remaining][flat], self.generator)
