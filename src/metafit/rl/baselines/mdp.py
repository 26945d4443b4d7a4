"""Classical agents for random tabular MDPs -- the comparison columns of RL² (Duan et al. 2016,
table 2) -- that play a whole trial in a :class:`~metafit.rl.BatchedMDP`, vectorised over
environments (play them with :func:`metafit.rl.run_mdp_trials`). Variants follow Ian Osband's
TabulaRL agents, which the RL² authors ran; differences are stated.

MDPs (priors of TabulaRL, which the authors used: reward means ``N(0, 1)`` prior with known noise
precision 1, Dirichlet(1) transitions; the task distribution itself has reward means ``N(1, 1)``
-- pass ``reward_prior_mean=1.0`` for the matched prior):

* ``RandomMDP``: uniform actions.
* ``PSRL``: at the start of each episode sample rewards and transitions from the posterior, solve
  the sampled finite-horizon MDP by backward induction, act greedily.
* ``OptimisticPSRL``: ``n_samples`` posterior samples, the pointwise maximum of their Q tables.
* ``UCRL2``: extended value iteration on the empirical MDP with an L1 transition ball and a reward
  bonus, radii ``scaling * sqrt(4 S log(2 S A (k+1) / delta) / n)`` and
  ``scaling * sqrt(4 log(2 S A (k+1) / delta) / n)`` (``k`` the episode counted from 1, ``n`` the
  visits, ``delta = 0.05`` by default) as in
  TabulaRL; ``scaling`` tuned on a log grid. (TabulaRL's loop mutates the estimated transition row
  in place across the backward-induction steps; we do not reproduce that bug.)
* ``BEB``: TabulaRL's Bayesian exploration bonus: posterior-mean MDP, reward bonus
  ``1 / (precision + 1)``, transition bonus ``beta * H / (1 + sum alpha)`` per remaining step with
  ``beta = 2 H^2 * scaling``; ``scaling`` tuned.
* ``EpsilonGreedyMDP``: greedy on the (vague-prior) posterior-mean MDP, uniform action with
  probability ``epsilon`` (tuned); ``epsilon = 0`` is "Greedy".
* ``MyopicMDP`` (not in the RL² paper): every step, the action with the highest posterior-mean
  reward in the current state -- no planning, transitions ignored -- under the matched prior
  ``N(1, 1)`` by default, plus ``bonus / sqrt(precision)`` (tuned; 0 is plain myopic). It shows
  what remembering one running mean per state-action pair is worth on these MDPs.

Runners: :func:`run_bandit_trials`, :func:`run_mdp_trials`; :func:`tune` picks a parameter on a
grid of tuning instances (all in :mod:`metafit.rl.baselines.trials`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...errors import ConfigError, constraint_message
from ..envs._common import check_int, check_nonnegative, check_positive, random_argmax
from ..envs.mdp import solve_finite_horizon
from ._checks import check_probability as _check_probability

__all__ = ["MDPAgent", "RandomMDP", "PSRL", "OptimisticPSRL", "UCRL2", "BEB", "EpsilonGreedyMDP", "MyopicMDP",
           "extended_value_iteration"]


class MDPAgent:
    """Base: conjugate statistics per environment -- visit counts, reward sums and transition
    counts -- with a Normal prior ``N(reward_prior_mean, 1 / reward_prior_precision)`` on each mean
    reward (known noise precision ``noise_precision``) and ``Dirichlet(dirichlet_prior)`` rows.

    Subclasses implement :meth:`plan` (or :meth:`act`); a trial is :meth:`begin_trial`, then per
    episode :meth:`begin_episode` and, per step, :meth:`act` and :meth:`observe` (see
    :func:`~metafit.rl.baselines.trials.run_mdp_trials`)."""

    name = "agent"

    def __init__(self, reward_prior_mean: float = 0.0, reward_prior_precision: float = 1.0,
                 noise_precision: float = 1.0, dirichlet_prior: float = 1.0) -> None:
        owner = type(self).__name__
        self.mu0 = float(reward_prior_mean)
        if not math.isfinite(self.mu0):
            raise ConfigError(constraint_message(owner, "reward_prior_mean", "finite", reward_prior_mean,
                                                 "Pass a finite number."))
        self.tau0 = check_positive(owner, "reward_prior_precision", reward_prior_precision)
        self.tau = check_positive(owner, "noise_precision", noise_precision)
        self.alpha0 = check_positive(owner, "dirichlet_prior", dirichlet_prior)

    def begin_trial(self, num_envs: int, n_states: int, n_actions: int, horizon: int, *, seed: int = 0,
                    device: torch.device | str = "cpu") -> None:
        """Start a trial in ``num_envs`` environments of ``n_states`` states, ``n_actions`` actions
        and episodes of ``horizon`` steps: statistics to 0 on ``device``, the agent's random streams
        seeded with ``seed``."""
        self.device = torch.device(device)
        self.num_envs, self.n_states, self.n_actions, self.horizon = num_envs, n_states, n_actions, horizon
        N, S, A = num_envs, n_states, n_actions
        self.visits = torch.zeros(N, S, A, dtype=torch.float64, device=self.device)
        self.reward_sum = torch.zeros(N, S, A, dtype=torch.float64, device=self.device)
        self.trans_counts = torch.zeros(N, S, A, S, dtype=torch.float64, device=self.device)
        self.generator = torch.Generator(self.device).manual_seed(int(seed))
        self.np_rng = np.random.default_rng(int(seed))
        self._rows = torch.arange(N, device=self.device)
        self.Q: torch.Tensor | None = None

    # posterior --------------------------------------------------------------------------------
    def reward_posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The Normal posterior of each mean reward: ``(mean, precision)``, each ``[N, S, A]``."""
        precision = self.tau0 + self.tau * self.visits
        mean = (self.tau0 * self.mu0 + self.tau * self.reward_sum) / precision
        return mean, precision

    def transition_posterior(self) -> torch.Tensor:
        """The Dirichlet posterior parameters of each transition row, ``[N, S, A, S]``."""
        return self.trans_counts + self.alpha0

    def posterior_mean_mdp(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior-mean MDP: ``(rewards [N, S, A], transitions [N, S, A, S])``."""
        mean, _ = self.reward_posterior()
        alpha = self.transition_posterior()
        return mean, alpha / alpha.sum(-1, keepdim=True)

    def sample_mdp(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One MDP drawn from the posterior per environment: ``(rewards [N, S, A], transitions [N, S, A, S])``."""
        mean, precision = self.reward_posterior()
        noise = torch.randn(mean.shape, generator=self.generator, dtype=torch.float64, device=self.device)
        rewards = mean + noise / precision.sqrt()
        gam = self.np_rng.standard_gamma(self.transition_posterior().cpu().numpy())
        trans = torch.from_numpy(gam).to(self.device)
        trans = trans / trans.sum(-1, keepdim=True).clamp_min(1e-300)
        return rewards, trans

    # acting -----------------------------------------------------------------------------------
    def plan(self, episode: int) -> torch.Tensor:
        """Q values ``[N, H, S, A]`` for the coming episode."""
        raise NotImplementedError

    def begin_episode(self, episode: int) -> None:
        """Plan the coming episode (``episode`` counts from 0 within the trial): see :meth:`plan`."""
        self.Q = self.plan(episode)

    def act(self, states: torch.Tensor, t: int) -> torch.Tensor:
        """The action in each environment's current state (``states [N]``) at step ``t`` of the
        episode: the largest planned Q value (ties at random); ``[N]``."""
        return random_argmax(self.Q[self._rows, t, states], self.generator)

    def observe(self, states: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                next_states: torch.Tensor) -> None:
        """Update the statistics with one step per environment: ``actions`` taken in ``states``
        paid ``rewards`` and led to ``next_states`` (``[N]`` each)."""
        S, A = self.n_states, self.n_actions
        sa = states * A + actions
        ones = torch.ones(self.num_envs, 1, dtype=torch.float64, device=self.device)
        self.visits.view(-1, S * A).scatter_add_(1, sa.view(-1, 1), ones)
        self.reward_sum.view(-1, S * A).scatter_add_(1, sa.view(-1, 1), rewards.to(torch.float64).view(-1, 1))
        self.trans_counts.view(-1, S * A * S).scatter_add_(1, (sa * S + next_states).view(-1, 1), ones)


class RandomMDP(MDPAgent):
    """Uniformly random actions. ``reward_prior_mean``, ``reward_prior_precision``,
    ``noise_precision`` and ``dirichlet_prior`` as for :class:`MDPAgent` (unused by its choices)."""

    name = "random"

    def begin_episode(self, episode: int) -> None:
        """Nothing to plan (``episode`` is ignored)."""
        pass

    def act(self, states: torch.Tensor, t: int) -> torch.Tensor:
        """A uniform action per environment, ``[N]`` (``states`` and ``t`` are ignored)."""
        return torch.randint(0, self.n_actions, (self.num_envs,), generator=self.generator, device=self.device)


class PSRL(MDPAgent):
    """Posterior sampling for RL (Osband et al. 2013): one posterior MDP per episode. The prior
    arguments are those of :class:`MDPAgent`."""

    name = "psrl"

    def plan(self, episode: int) -> torch.Tensor:
        rewards, trans = self.sample_mdp()
        return solve_finite_horizon(rewards, trans, self.horizon)[0]


class OptimisticPSRL(MDPAgent):
    """``n_samples`` posterior MDPs per episode; act on the pointwise maximum of their Q tables.
    ``prior``: keyword arguments for :class:`MDPAgent` (``reward_prior_mean``, ...)."""

    name = "optimistic-psrl"

    def __init__(self, n_samples: int = 2, **prior) -> None:
        super().__init__(**prior)
        self.n_samples = check_int("OptimisticPSRL", "n_samples", n_samples, 1)

    def plan(self, episode: int) -> torch.Tensor:
        Q = None
        for _ in range(self.n_samples):
            q = solve_finite_horizon(*self.sample_mdp(), self.horizon)[0]
            Q = q if Q is None else torch.maximum(Q, q)
        return Q


class EpsilonGreedyMDP(MDPAgent):
    """Greedy on the posterior-mean MDP (vague priors, as TabulaRL), uniform with prob. ``epsilon``.
    ``reward_prior_mean``, ``reward_prior_precision``, ``noise_precision`` and ``dirichlet_prior``
    as for :class:`MDPAgent` (vague by default)."""

    def __init__(self, epsilon: float = 0.0, reward_prior_mean: float = 0.0, reward_prior_precision: float = 1e-4,
                 noise_precision: float = 1.0, dirichlet_prior: float = 1e-4) -> None:
        super().__init__(reward_prior_mean, reward_prior_precision, noise_precision, dirichlet_prior)
        self.epsilon = _check_probability("EpsilonGreedyMDP", "epsilon", epsilon)
        self.name = "greedy" if self.epsilon == 0 else "epsilon-greedy"

    def plan(self, episode: int) -> torch.Tensor:
        return solve_finite_horizon(*self.posterior_mean_mdp(), self.horizon)[0]

    def act(self, states: torch.Tensor, t: int) -> torch.Tensor:
        """The greedy action in ``states`` at step ``t`` (see :meth:`MDPAgent.act`), or with
        probability ``epsilon`` a uniform one; ``[N]``."""
        greedy = super().act(states, t)
        if self.epsilon == 0:
            return greedy
        explore = torch.rand(self.num_envs, generator=self.generator, device=self.device) < self.epsilon
        uniform = torch.randint(0, self.n_actions, (self.num_envs,), generator=self.generator, device=self.device)
        return torch.where(explore, uniform, greedy)


class UCRL2(MDPAgent):
    """Optimism with L1 transition confidence sets (Jaksch et al. 2010), finite-horizon form (see
    the module docstring): ``scaling`` multiplies both confidence radii, ``delta`` is the confidence
    parameter inside their logarithm. ``reward_prior_mean``, ``reward_prior_precision``,
    ``noise_precision`` and ``dirichlet_prior`` as for :class:`MDPAgent` (vague by default: the
    empirical MDP)."""

    name = "ucrl2"

    def __init__(self, scaling: float = 1.0, delta: float = 0.05, reward_prior_mean: float = 0.0,
                 reward_prior_precision: float = 1e-4, noise_precision: float = 1.0,
                 dirichlet_prior: float = 1e-5) -> None:
        super().__init__(reward_prior_mean, reward_prior_precision, noise_precision, dirichlet_prior)
        self.scaling = check_nonnegative("UCRL2", "scaling", scaling)
        self.delta = _check_probability("UCRL2", "delta", delta)

    def plan(self, episode: int) -> torch.Tensor:
        S, A, H = self.n_states, self.n_actions, self.horizon
        R, P = self.posterior_mean_mdp()
        n = self.visits.clamp_min(1.0)
        log_term = math.log(2 * S * A * (episode + 2) / self.delta)  # TabulaRL's (time + 1), time = 1-based episode
        r_slack = self.scaling * torch.sqrt(4 * log_term / n)
        p_slack = self.scaling * torch.sqrt(4 * S * log_term / n)
        return extended_value_iteration(R + r_slack, P, p_slack, H)


def extended_value_iteration(rewards: torch.Tensor, transitions: torch.Tensor, p_slack: torch.Tensor,
                             horizon: int) -> torch.Tensor:
    """Optimistic backward induction: at each step every row ``P[s, a]`` moves up to
    ``p_slack[s, a] / 2`` of probability onto the best next state, taken from the worst ones
    (Jaksch et al. 2010). ``rewards [N, S, A]`` (bonus included), ``transitions [N, S, A, S]``,
    ``p_slack [N, S, A]``, ``horizon`` steps ``H``. Returns ``Q [N, H, S, A]``."""
    N, S, A = rewards.shape
    V = rewards.new_zeros(N, S)
    Q = rewards.new_zeros(N, horizon, S, A)
    for h in range(horizon - 1, -1, -1):
        order = V.argsort(dim=1)  # ascending value
        v_sorted = V.gather(1, order)  # [N, S]
        p_sorted = transitions.gather(3, order.view(N, 1, 1, S).expand(N, S, A, S))
        best = p_sorted[..., -1]
        new_best = torch.minimum(best + p_slack / 2, torch.ones_like(best))
        excess = (new_best - best).unsqueeze(-1)
        others = p_sorted.clone()
        others[..., -1] = 0.0
        before = others.cumsum(-1) - others
        removed = torch.minimum((excess - before).clamp_min(0.0), others)
        p_opt = others - removed
        p_opt[..., -1] = new_best
        Q[:, h] = rewards + (p_opt * v_sorted.view(N, 1, 1, S)).sum(-1)
        V = Q[:, h].amax(dim=-1)
    return Q


class BEB(MDPAgent):
    """Bayesian exploration bonus in TabulaRL's form (see the module docstring); ``scaling`` scales
    the transition bonus, ``prior`` are keyword arguments for :class:`MDPAgent`."""

    name = "beb"

    def __init__(self, scaling: float = 1.0, **prior) -> None:
        super().__init__(**prior)
        self.scaling = check_nonnegative("BEB", "scaling", scaling)

    def plan(self, episode: int) -> torch.Tensor:
        H = self.horizon
        R, P = self.posterior_mean_mdp()
        _, precision = self.reward_posterior()
        r_bonus = 1.0 / (precision + 1.0)
        beta = 2.0 * H * H * self.scaling
        p_bonus = beta * H / (1.0 + self.transition_posterior().sum(-1))
        N, S, A = R.shape
        V = R.new_zeros(N, S)
        Q = R.new_zeros(N, H, S, A)
        for h in range(H - 1, -1, -1):
            steps_after = H - h - 1
            Q[:, h] = R + r_bonus + (P @ V.view(N, 1, S, 1)).squeeze(-1) + p_bonus * steps_after
            V = Q[:, h].amax(dim=-1)
        return Q


class MyopicMDP(MDPAgent):
    """Greedy on the posterior-mean reward of the current state only (see the module docstring);
    the posterior is updated after every step. ``bonus`` adds ``bonus / sqrt(precision)`` to each
    mean (0: plain myopic); ``reward_prior_mean``, ``reward_prior_precision`` and
    ``noise_precision`` as for :class:`MDPAgent` (the matched prior ``N(1, 1)`` by default)."""

    name = "myopic"

    def __init__(self, bonus: float = 0.0, reward_prior_mean: float = 1.0, reward_prior_precision: float = 1.0,
                 noise_precision: float = 1.0) -> None:
        super().__init__(reward_prior_mean, reward_prior_precision, noise_precision)
        self.bonus = check_nonnegative("MyopicMDP", "bonus", bonus)

    def plan(self, episode: int) -> None:
        return None  # nothing to plan: act() reads the reward posterior of the current state

    def act(self, states: torch.Tensor, t: int) -> torch.Tensor:
        """Per environment, the action of the largest (bonus-raised) posterior-mean reward in its
        state (``states [N]``; ties at random; ``t`` is ignored); ``[N]``."""
        mean, precision = self.reward_posterior()
        score = mean + self.bonus / precision.sqrt() if self.bonus else mean
        return random_argmax(score[self._rows, states], self.generator)
