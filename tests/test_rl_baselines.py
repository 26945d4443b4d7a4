"""Classical bandit and MDP baselines: the finite-horizon Gittins index against brute force and
the exact Bayes-optimal policy, agent sanity on easy tasks, extended value iteration, tuning and
error messages."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from metafit import rl
from metafit.errors import ConfigError
from metafit.rl.baselines import extended_value_iteration


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: one thread avoids OpenMP contention when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------- Gittins: brute-force checks


def brute_force_index(s: int, f: int, r: int, a0: float = 1.0, b0: float = 1.0) -> float:
    """Bisection on the retirement payoff with a memoised one-armed recursion per candidate."""

    def cont(lam: float) -> float:
        @functools.lru_cache(maxsize=None)
        def W(s_: int, f_: int, r_: int) -> float:
            if r_ == 0:
                return 0.0
            p = (a0 + s_) / (a0 + b0 + s_ + f_)
            return max(r_ * lam, p * (1 + W(s_ + 1, f_, r_ - 1)) + (1 - p) * W(s_, f_ + 1, r_ - 1))

        p = (a0 + s) / (a0 + b0 + s + f)
        return p * (1 + W(s + 1, f, r - 1)) + (1 - p) * W(s, f + 1, r - 1)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cont(mid) > r * mid else (lo, mid)
    return lo


def test_gittins_table_matches_brute_force():
    n = 9
    table = rl.finite_horizon_gittins_table(n)
    assert table.shape == (n + 1, n + 1, n + 1)
    for r, s, f in [(9, 0, 0), (8, 1, 0), (8, 0, 1), (6, 2, 1), (5, 0, 4), (4, 3, 2), (3, 5, 1), (2, 0, 0),
                    (7, 1, 1), (1, 3, 4)]:
        assert float(table[r, s, f]) == pytest.approx(brute_force_index(s, f, r), abs=1e-6), (r, s, f)


def test_gittins_coarse_grid_roots_come_from_the_tangents():
    """On a coarse grid the bracketing interval holds several kinks; the tangent estimate keeps
    the error near 1e-3 where plain linear interpolation (the chord) is off by 1e-2."""
    n = 12
    table = rl.finite_horizon_gittins_table(n, grid=21)
    states = [(r, s, f) for r in range(2, n + 1) for s in range(n - r + 1) for f in range(n - r + 1 - s)]
    err = max(abs(float(table[r, s, f]) - brute_force_index(s, f, r)) for r, s, f in states)
    assert err < 3e-3, err


def test_gittins_index_properties():
    table = rl.finite_horizon_gittins_table(12, prior=(2.0, 3.0))
    s = torch.arange(13, dtype=torch.float64)
    mean = (2 + s[:, None]) / (5 + s[:, None] + s[None, :])
    assert torch.allclose(table[1, :12, :12], mean[:12, :12])  # one pull left: the posterior mean
    for r in range(2, 13):
        m = 12 - r + 1
        # exploration is worth something, and more of it with more pulls left
        assert bool((table[r, :m, :m] >= mean[:m, :m] - 1e-9).all())
        assert bool((table[r, :m, :m] >= table[r - 1, :m, :m] - 1e-6).all())


def _bandit_value(n: int, choose) -> float:
    """Exact expected total reward of a 2-arm Beta(1,1)-Bernoulli bandit over n pulls;
    ``choose(state, r)`` returns the arms to average over (ties broken uniformly)."""

    @functools.lru_cache(maxsize=None)
    def V(state: tuple, r: int) -> float:
        if r == 0:
            return 0.0
        values = []
        for arm in choose(state, r):
            s, f = state[2 * arm], state[2 * arm + 1]
            p = (s + 1) / (s + f + 2)
            win, lose = list(state), list(state)
            win[2 * arm] += 1
            lose[2 * arm + 1] += 1
            values.append(p * (1 + V(tuple(win), r - 1)) + (1 - p) * V(tuple(lose), r - 1))
        return sum(values) / len(values)

    return V((0, 0, 0, 0), n)


def test_gittins_policy_is_near_bayes_optimal_and_the_agent_plays_it():
    n = 7
    table = rl.finite_horizon_gittins_table(n)

    @functools.lru_cache(maxsize=None)
    def bayes_optimal(state: tuple, r: int) -> float:
        if r == 0:
            return 0.0
        best = -1.0
        for arm in (0, 1):
            s, f = state[2 * arm], state[2 * arm + 1]
            p = (s + 1) / (s + f + 2)
            win, lose = list(state), list(state)
            win[2 * arm] += 1
            lose[2 * arm + 1] += 1
            best = max(best, p * (1 + bayes_optimal(tuple(win), r - 1)) + (1 - p) * bayes_optimal(tuple(lose), r - 1))
        return best

    def gittins_choice(state, r):
        idx = [float(table[r, state[0], state[1]]), float(table[r, state[2], state[3]])]
        return [a for a in (0, 1) if abs(idx[a] - max(idx)) < 1e-12]

    optimum = bayes_optimal((0, 0, 0, 0), n)
    gittins = _bandit_value(n, gittins_choice)
    greedy = _bandit_value(n, lambda st, r: [a for a in (0, 1) if
                                             (st[2 * a] + 1) / (st[2 * a] + st[2 * a + 1] + 2) ==
                                             max((st[2 * b] + 1) / (st[2 * b] + st[2 * b + 1] + 2) for b in (0, 1))])
    assert optimum - 1e-3 <= gittins <= optimum + 1e-12
    assert greedy < gittins - 1e-3  # the test can tell a myopic policy apart
    # the agent in the batched environment earns the exact value of the index policy
    env = rl.BanditFamily(2).batched(rl.BanditFamily(2).sample_tasks(12000, gen(1)), seed=2)
    totals = rl.run_bandit_trials(env, rl.GittinsBandit(), n, seed=3)
    mean, ci = rl.mean_ci(totals)
    assert abs(mean - gittins) < 2.2 * ci, (mean, ci, gittins)


# ------------------------------------------------------------------------ bandit agent sanity


AGENTS = {
    "random": rl.RandomBandit,
    "gittins": rl.GittinsBandit,
    "thompson": rl.ThompsonBandit,
    "optimistic-thompson": lambda: rl.ThompsonBandit(n_samples=7),
    "ucb1": lambda: rl.UCB1Bandit(c=0.2),
    "ucb1-textbook": lambda: rl.UCB1Bandit(c=1.0, prior=(0.0, 0.0)),
    "greedy": rl.EpsilonGreedyBandit,
    "epsilon-greedy": lambda: rl.EpsilonGreedyBandit(epsilon=0.1),
}


@pytest.mark.parametrize("name", list(AGENTS))
def test_bandit_agents_on_an_obvious_task(name):
    n, copies = 40, 300
    env = rl.BatchedBandit(rl.BanditTask(torch.tensor([0.0, 1.0])), envs_per_task=copies, seed=0)
    mean, ci = rl.mean_ci(rl.run_bandit_trials(env, AGENTS[name](), n, seed=1))
    if name == "random":
        assert abs(mean - n / 2) < ci + 1e-9
    elif name == "epsilon-greedy":  # explores 5% of the time on the bad arm
        assert mean == pytest.approx(n * 0.95 + 0.025, abs=1.0)
    elif name == "ucb1-textbook":  # sqrt(2 ln t / n) keeps sampling the empty arm ~ log t times
        assert n - 10 < mean < n - 1
    else:
        assert mean >= n - 3, (name, mean)


def test_optimistic_thompson_keeps_the_most_probable_of_its_draws():
    """The RL² authors' OTS: of n_samples joint posterior draws, the one with the highest density."""
    succ, fail = torch.tensor([3.0, 0.0, 8.0]), torch.tensor([1.0, 2.0, 8.0])
    agents = {k: rl.ThompsonBandit(n_samples=k) for k in (1, 5, 50)}
    draws = {}
    for k, agent in agents.items():
        agent.begin_trial(2000, 3, 10, seed=3)
        agent.successes, agent.failures = succ.expand(2000, 3).clone(), fail.expand(2000, 3).clone()
        draws[k] = agent.index().double()
    # reference: the same numpy draws, densities from torch.distributions.Beta
    rng = np.random.default_rng(3)
    a, b = (succ + 1).double().expand(2000, 3).numpy(), (fail + 1).double().expand(2000, 3).numpy()
    theta = torch.from_numpy(rng.beta(a, b, size=(5, 2000, 3)))
    logp = torch.distributions.Beta(torch.from_numpy(a), torch.from_numpy(b)).log_prob(theta).sum(-1)
    expected = theta[logp.argmax(0), torch.arange(2000)]
    assert torch.allclose(draws[5], expected)
    # more draws: closer to the posterior mode (greedier); one draw is plain Thompson sampling
    mode = torch.tensor([3 / 4, 0.0, 8 / 16], dtype=torch.float64)
    dist = {k: (d - mode).abs().sum(-1).mean().item() for k, d in draws.items()}
    assert dist[50] < dist[5] < dist[1]
    assert agents[1].name == "thompson" and agents[5].name == "optimistic-thompson"


def test_random_bandit_earns_the_mean_probability():
    env = rl.BatchedBandit(rl.BanditTask(torch.tensor([0.2, 0.6, 0.4])), envs_per_task=2000, seed=0)
    mean, ci = rl.mean_ci(rl.run_bandit_trials(env, rl.RandomBandit(), 20, seed=1))
    assert abs(mean - 20 * 0.4) < 1.5 * ci + 0.05


def test_bandit_trials_are_reproducible():
    tasks = rl.BanditFamily(5).sample_tasks(50, gen(0))
    run = lambda: rl.run_bandit_trials(rl.BatchedBandit(tasks, seed=4), rl.ThompsonBandit(), 30, seed=5)  # noqa: E731
    assert torch.equal(run(), run())


# --------------------------------------------------------------------------- MDP agent sanity


def _easy_mdp() -> rl.MDPTask:
    """Two states; action 1 pays 1, action 0 pays 0, wherever you are; noisy rewards."""
    R = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    P = torch.full((2, 2, 2), 0.5, dtype=torch.float64)
    return rl.MDPTask(R, P, 0.5)


@pytest.mark.parametrize("agent, minimum", [
    (rl.PSRL(), 85), (rl.OptimisticPSRL(n_samples=3), 85), (rl.UCRL2(scaling=0.05), 85),
    (rl.BEB(scaling=1e-3), 85), (rl.EpsilonGreedyMDP(epsilon=0.1), 85), (rl.EpsilonGreedyMDP(), 85),
    (rl.MyopicMDP(), 85), (rl.MyopicMDP(bonus=1.0), 85), (rl.RandomMDP(), None)],
    ids=lambda x: getattr(x, "name", ""))
def test_mdp_agents_on_an_obvious_task(agent, minimum):
    env = rl.BatchedMDP([_easy_mdp()], horizon=5, envs_per_task=200, seed=0)
    mean, ci = rl.mean_ci(rl.run_mdp_trials(env, agent, 20, seed=1))
    if minimum is None:
        assert abs(mean - 50) < ci + 1e-9
    else:
        assert minimum <= mean <= 100 + ci, (agent.name, mean)


def test_psrl_beats_random_on_random_mdps():
    fam = rl.TabularMDPFamily()
    env = fam.batched(fam.sample_tasks(300, gen(3)), seed=4)
    psrl, _ = rl.mean_ci(rl.run_mdp_trials(env, rl.PSRL(), 10, seed=5))
    rand, _ = rl.mean_ci(rl.run_mdp_trials(env, rl.RandomMDP(), 10, seed=5))
    oracle = float(env.optimal_values().mean()) * 10
    assert rand + 20 < psrl < oracle


def test_myopic_agent_takes_the_best_posterior_mean_of_the_current_state():
    agent = rl.MyopicMDP(bonus=0.0)  # prior N(1, 1), noise precision 1
    agent.begin_trial(2, 3, 2, 4, seed=0)
    s = torch.tensor([1, 1])
    # env 0: action 0 paid -2 in state 1 (posterior mean (1 - 2) / 2 = -0.5 < prior 1): switch to 1;
    # env 1: action 0 paid 3 (mean 2 > 1): keep it. Rewards seen in other states do not count.
    agent.observe(s, torch.tensor([0, 0]), torch.tensor([-2.0, 3.0]), torch.tensor([0, 0]))
    agent.observe(torch.tensor([2, 2]), torch.tensor([1, 1]), torch.tensor([-5.0, -5.0]), torch.tensor([1, 1]))
    agent.begin_episode(0)
    assert agent.act(s, 0).tolist() == [1, 0]
    mean, precision = agent.reward_posterior()
    assert mean[0, 1, 0].item() == pytest.approx(-0.5) and precision[0, 1, 0].item() == 2.0
    # a bonus c / sqrt(precision) favours the untried action over a slightly better-known one
    greedy, bonus = rl.MyopicMDP(), rl.MyopicMDP(bonus=2.0)
    for a in (greedy, bonus):
        a.begin_trial(1, 1, 2, 4, seed=0)
        a.observe(torch.tensor([0]), torch.tensor([0]), torch.tensor([1.5]), torch.tensor([0]))
    assert greedy.act(torch.tensor([0]), 0).item() == 0  # mean 1.25 > 1
    assert bonus.act(torch.tensor([0]), 0).item() == 1  # 1 + 2 > 1.25 + 2 / sqrt(2)


def test_extended_value_iteration_limits():
    fam = rl.TabularMDPFamily(n_states=4, n_actions=3, horizon=5)
    tasks = fam.sample_tasks(6, gen(8))
    R = torch.stack([t.rewards_mean for t in tasks])
    P = torch.stack([t.transitions for t in tasks])
    Q0 = rl.solve_finite_horizon(R, P, 5)[0]
    assert torch.allclose(extended_value_iteration(R, P, torch.zeros(6, 4, 3, dtype=torch.float64), 5), Q0)
    # slack 2 moves all mass to the best next state: Q_h = R + max_s V_{h+1}(s)
    Q = extended_value_iteration(R, P, torch.full((6, 4, 3), 2.0, dtype=torch.float64), 5)
    v = torch.zeros(6, 4, dtype=torch.float64)
    for h in range(4, -1, -1):
        q = R + v.max(dim=1).values.view(6, 1, 1)
        assert torch.allclose(Q[:, h], q)
        v = q.max(-1).values
    # optimism is monotone in the slack
    Qs = extended_value_iteration(R, P, torch.full((6, 4, 3), 0.3, dtype=torch.float64), 5)
    assert bool((Qs >= Q0 - 1e-12).all()) and bool((Qs <= Q + 1e-12).all())


def test_extended_value_iteration_moves_mass_from_the_worst_states():
    # three states, one action, two steps: V_1 = R = (0, 1, 2); every row is (0.5, 0.3, 0.2)
    R = torch.tensor([[[0.0], [1.0], [2.0]]], dtype=torch.float64)
    P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).expand(1, 3, 1, 3).contiguous()
    for slack, row in ((0.4, (0.3, 0.3, 0.4)), (1.2, (0.0, 0.2, 0.8))):
        Q = extended_value_iteration(R, P, torch.full((1, 3, 1), slack, dtype=torch.float64), 2)
        expected = R[0, :, 0] + (torch.tensor(row, dtype=torch.float64) * R[0, :, 0]).sum()
        assert torch.allclose(Q[0, 0, :, 0], expected), (slack, Q[0, 0, :, 0], expected)


# ------------------------------------------------------------------------------- utilities


def test_mean_ci_and_tune():
    mean, ci = rl.mean_ci(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and ci == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    best, scores = rl.tune(lambda v: v, [1.0, 3.0, 2.0], lambda v: torch.tensor([v, v]))
    assert best == 3.0 and scores == {1.0: 1.0, 3.0: 3.0, 2.0: 2.0}


@pytest.mark.parametrize("make, message", [
    (lambda: rl.EpsilonGreedyBandit(epsilon=1.5),
     "EpsilonGreedyBandit: epsilon must be in [0, 1]; got 1.5. Pass a probability."),
    (lambda: rl.UCB1Bandit(c=-1), "UCB1Bandit: c must be >= 0; got -1."),
    (lambda: rl.ThompsonBandit(prior=(0, 1)), "ThompsonBandit: prior must be two positive numbers"),
    (lambda: rl.OptimisticPSRL(n_samples=0), "OptimisticPSRL: n_samples must be an integer >= 1; got 0."),
    (lambda: rl.PSRL(reward_prior_precision=0), "PSRL: reward_prior_precision must be positive; got 0."),
    (lambda: rl.MyopicMDP(bonus=-1), "MyopicMDP: bonus must be >= 0; got -1."),
    (lambda: rl.finite_horizon_gittins_table(1000), "finite_horizon_gittins_table: n_pulls must be <= 200"),
])
def test_agent_config_errors(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value).startswith(message)
