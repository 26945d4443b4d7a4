"""Meta-RL environment families: task sampling, batched torch environments, the single-task
Gymnasium environments, their agreement, horizons and termination, reference returns of the
point-navigation task, the HalfCheetah wrappers (when MuJoCo is installed) and error messages."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from metafit import rl
from metafit.errors import ConfigError, TaskError

gym = pytest.importorskip("gymnasium")
from gymnasium.utils.env_checker import check_env  # noqa: E402

try:
    rl.envs._common.require_mujoco("test")
    HAVE_MUJOCO = True
except rl.MissingExtraError:
    HAVE_MUJOCO = False
needs_mujoco = pytest.mark.skipif(not HAVE_MUJOCO, reason="gymnasium[mujoco] is not installed")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: one thread avoids OpenMP contention when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ task sampling


def test_bandit_tasks_are_uniform_and_reproducible():
    tasks = rl.BanditFamily(n_arms=5).sample_tasks(4000, gen(0))
    p = torch.stack([t.probs for t in tasks])
    assert p.shape == (4000, 5) and bool(((p >= 0) & (p <= 1)).all())
    assert abs(float(p.mean()) - 0.5) < 0.01  # sd of the mean: 0.29 / sqrt(20000) = 0.002
    assert abs(float(p.var()) - 1 / 12) < 0.005
    again = rl.BanditFamily(n_arms=5).sample_tasks(4000, gen(0))
    assert torch.equal(p, torch.stack([t.probs for t in again]))


def test_mdp_tasks_follow_the_rl2_distribution():
    fam = rl.TabularMDPFamily()
    assert (fam.n_states, fam.n_actions, fam.horizon, fam.start_state) == (10, 5, 10, 0)
    tasks = fam.sample_tasks(2000, gen(1))
    R = torch.stack([t.rewards_mean for t in tasks])
    P = torch.stack([t.transitions for t in tasks])
    assert R.shape == (2000, 10, 5) and P.shape == (2000, 10, 5, 10)
    assert abs(float(R.mean()) - 1.0) < 0.02 and abs(float(R.std()) - 1.0) < 0.02
    assert torch.allclose(P.sum(-1), torch.ones(()).double()) and bool((P >= 0).all())
    # flat Dirichlet(1, ..., 1) over 10 states: mean 0.1, variance 0.1 * 0.9 / 11
    assert abs(float(P.mean()) - 0.1) < 1e-9
    assert abs(float(P.var()) - 0.09 / 11) < 3e-4
    assert all(t.reward_std == 1.0 for t in tasks[:3])


def test_dirichlet_with_other_concentrations_is_reproducible():
    fam = rl.TabularMDPFamily(n_states=4, n_actions=2, dirichlet_alpha=0.5)
    a = torch.stack([t.transitions for t in fam.sample_tasks(3000, gen(2))])
    b = torch.stack([t.transitions for t in fam.sample_tasks(3000, gen(2))])
    assert torch.equal(a, b)
    # Dirichlet(0.5 x 4): mean 1/4, variance (1/4)(3/4)/(2 + 1)
    assert abs(float(a.var()) - 0.1875 / 3) < 2e-3


def test_navigation_goals_and_cheetah_targets():
    goals = torch.stack([t.goal for t in rl.NavigationFamily().sample_tasks(5000, gen(3))])
    assert bool((goals.abs() <= 0.5).all())
    assert abs(float(goals.mean())) < 0.01 and abs(float(goals.abs().mean()) - 0.25) < 0.01
    targets = [t.target for t in rl.HalfCheetahVelFamily().sample_tasks(4000, gen(4))]
    assert min(targets) >= 0 and max(targets) <= 2 and abs(np.mean(targets) - 1.0) < 0.03
    dirs = [t.direction for t in rl.HalfCheetahDirFamily().sample_tasks(4000, gen(5))]
    assert set(dirs) == {-1.0, 1.0} and abs(np.mean(dirs)) < 0.06


# --------------------------------------------------------------------------- batched bandit


def test_batched_bandit_rewards_match_arm_probabilities():
    probs = torch.tensor([[0.1, 0.5, 0.9], [0.7, 0.3, 0.0]])
    env = rl.BatchedBandit(rl.BanditTask(probs), envs_per_task=3000, seed=0)
    assert env.num_envs == 6000 and env.num_tasks == 2
    assert torch.equal(env.task_index[:3000], torch.zeros(3000, dtype=torch.long))
    obs = env.reset()
    assert obs.shape == (6000,) and int(obs.abs().sum()) == 0
    sums = torch.zeros(6000, 3)
    for arm in range(3):
        for _ in range(10):
            obs, r, term, trunc, info = env.step(torch.full((6000,), arm))
            assert bool(term.all()) and not bool(trunc.any())
            sums[:, arm] += r
    freq = torch.stack([sums[:3000].mean(0), sums[3000:].mean(0)]) / 10
    assert torch.allclose(freq, probs, atol=0.02)
    assert int(env.episode_count[0]) == 30


def test_batched_bandit_accepts_new_tasks():
    env = rl.BanditFamily(4).batched(rl.BanditFamily(4).sample_tasks(3, gen(0)), envs_per_task=2, seed=0)
    env.set_tasks(rl.BanditFamily(6).sample_tasks(5, gen(1)))
    assert (env.num_envs, env.n_arms) == (10, 6)
    env.reset()
    env.step(torch.zeros(10, dtype=torch.long))


# ---------------------------------------------------------------------------- batched MDP


def _deterministic_mdp(S: int = 4, A: int = 3, seed: int = 0) -> rl.MDPTask:
    g = gen(seed)
    nxt = torch.randint(0, S, (S, A), generator=g)
    P = torch.nn.functional.one_hot(nxt, S).double()
    return rl.MDPTask(torch.randn(S, A, generator=g, dtype=torch.float64), P, 0.0)


def test_mdp_episodes_end_after_the_horizon_and_restart_in_state_zero():
    task = _deterministic_mdp()
    env = rl.BatchedMDP([task], horizon=3, envs_per_task=2, seed=0)
    assert int(env.reset()[0]) == 0
    actions = [1, 2, 0, 0, 1, 2, 2]
    state = 0
    for t, a in enumerate(actions):
        obs, r, term, trunc, info = env.step(torch.full((2,), a))
        expected_next = int(task.transitions[state, a].argmax())
        assert int(info["final_obs"][0]) == expected_next
        assert float(r[0]) == pytest.approx(float(task.rewards_mean[state, a]), abs=1e-6)
        ends = (t + 1) % 3 == 0
        assert bool(term[0]) == ends and not bool(trunc.any())
        state = 0 if ends else expected_next
        assert int(obs[0]) == state
    assert int(env.episode_count[0]) == 2 and int(env.t[0]) == 1


def test_batched_mdp_takes_a_list_or_a_stacked_task():
    tasks = rl.TabularMDPFamily(n_states=3, n_actions=2).sample_tasks(4, gen(9))
    stacked = rl.MDPTask(torch.stack([t.rewards_mean for t in tasks]), torch.stack([t.transitions for t in tasks]), 1.0)
    a, b = rl.BatchedMDP(tasks, seed=5), rl.BatchedMDP(stacked, seed=5)
    assert torch.equal(a.reward_std, b.reward_std) and torch.equal(a.transitions, b.transitions)
    a.reset(), b.reset()
    for _ in range(12):
        act = torch.tensor([0, 1, 1, 0])
        assert all(torch.equal(x, y) for x, y in zip(a.step(act)[:4], b.step(act)[:4]))


def test_solve_finite_horizon_matches_a_loop():
    task = rl.TabularMDPFamily(n_states=3, n_actions=2).sample_tasks(1, gen(7))[0]
    R, P, H = task.rewards_mean, task.transitions, 4
    Q, V = rl.solve_finite_horizon(R, P, H)
    v = [0.0] * 3
    for h in range(H - 1, -1, -1):
        q = [[float(R[s, a]) + sum(float(P[s, a, s2]) * v[s2] for s2 in range(3)) for a in range(2)] for s in range(3)]
        assert torch.allclose(Q[h], torch.tensor(q, dtype=torch.float64))
        v = [max(row) for row in q]
    assert torch.allclose(V[0], torch.tensor(v, dtype=torch.float64))
    env = rl.BatchedMDP([task], horizon=H)
    assert float(env.optimal_values()[0]) == pytest.approx(v[0], rel=1e-5)


# ------------------------------------------------------------------- single vs batched envs


def test_single_and_batched_bandit_agree():
    fam = rl.BanditFamily(n_arms=4)
    task = rl.BanditTask(torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    single = fam.make_env(task)
    batched = fam.batched([task], envs_per_task=1, seed=0)
    batched.reset()
    for a in np.random.default_rng(0).integers(0, 4, size=30):
        single.reset(seed=int(a))
        _, r1, term1, trunc1, _ = single.step(int(a))
        _, r2, term2, trunc2, _ = batched.step(torch.tensor([int(a)]))
        assert (r1, term1, trunc1) == (float(r2[0]), bool(term2[0]), bool(trunc2[0]))
    # stochastic arms: the same frequencies
    task = rl.BanditTask(torch.tensor([0.3, 0.8, 0.5, 0.1], dtype=torch.float64))
    single.set_task(task)
    rewards = []
    for i in range(4000):
        single.reset(seed=i)
        rewards.append(single.step(1)[1])
    batched = fam.batched([task], envs_per_task=4000, seed=1)
    batched.reset()
    r = batched.step(torch.ones(4000, dtype=torch.long))[1]
    assert abs(np.mean(rewards) - 0.8) < 0.025 and abs(float(r.mean()) - 0.8) < 0.025


def test_single_and_batched_mdp_agree():
    fam = rl.TabularMDPFamily(n_states=4, n_actions=3, horizon=5)
    task = _deterministic_mdp()
    single = fam.make_env(task)
    batched = fam.batched([task], seed=0)
    s_single, _ = single.reset(seed=0)
    s_batched = batched.reset()
    assert s_single == int(s_batched[0]) == 0
    for a in np.random.default_rng(1).integers(0, 3, size=23):
        o1, r1, term1, trunc1, _ = single.step(int(a))
        o2, r2, term2, trunc2, info = batched.step(torch.tensor([int(a)]))
        assert o1 == int(info["final_obs"][0]) and r1 == pytest.approx(float(r2[0]), abs=1e-6)
        assert (term1, trunc1) == (bool(term2[0]), bool(trunc2[0]))
        if term1:
            o1, _ = single.reset()
        assert o1 == int(o2[0])


def test_single_and_batched_mdp_returns_match_policy_evaluation():
    fam = rl.TabularMDPFamily(n_states=5, n_actions=3, horizon=6)
    task = fam.sample_tasks(1, gen(11))[0]
    policy = [s % 3 for s in range(5)]
    R, P = task.rewards_mean, task.transitions
    v = torch.zeros(5, dtype=torch.float64)
    for _ in range(fam.horizon):
        v = torch.stack([R[s, policy[s]] + P[s, policy[s]] @ v for s in range(5)])
    expected = float(v[0])
    n = 3000
    env = fam.batched([task], envs_per_task=n, seed=3)
    s = env.reset()
    total = torch.zeros(n, dtype=torch.float64)
    pol = torch.tensor(policy)
    for _ in range(fam.horizon):
        s, r, *_ = env.step(pol[s])
        total += r
    single = fam.make_env(task)
    singles = []
    for i in range(n):
        st, _ = single.reset(seed=i)
        ret, done = 0.0, False
        while not done:
            st, r, done, _, _ = single.step(policy[st])
            ret += r
        singles.append(ret)
    for values in (total.numpy(), np.array(singles)):
        se = values.std() / math.sqrt(n)
        assert abs(values.mean() - expected) < 4 * se, (values.mean(), expected, se)


def test_single_and_batched_navigation_agree():
    fam = rl.NavigationFamily()
    tasks = fam.sample_tasks(3, gen(4))
    batched = fam.batched(tasks)
    singles = [fam.make_env(t) for t in tasks]
    obs_b = batched.reset()
    obs_s = [e.reset(seed=0)[0] for e in singles]
    assert np.allclose(np.stack(obs_s), obs_b.numpy()) and not obs_b.abs().sum()
    rng = np.random.default_rng(2)
    for _ in range(250):  # actions beyond the box are clipped per axis
        actions = rng.normal(scale=0.12, size=(3, 2)).astype(np.float32)
        obs_b, r_b, term_b, trunc_b, info = batched.step(torch.from_numpy(actions))
        for i, env in enumerate(singles):
            o, r, term, trunc, _ = env.step(actions[i])
            assert np.allclose(o, info["final_obs"][i].numpy(), atol=1e-6)
            assert r == pytest.approx(float(r_b[i]), abs=1e-6)
            assert (term, trunc) == (bool(term_b[i]), bool(trunc_b[i]))
            if term or trunc:
                o, _ = env.reset()
            assert np.allclose(o, obs_b[i].numpy(), atol=1e-6)


# --------------------------------------------------------------------------- navigation rules


def test_navigation_truncates_after_the_horizon_and_clips_per_axis():
    env = rl.BatchedNavigation(rl.NavTask(torch.tensor([[0.4, -0.3]])))
    env.reset()
    for t in range(100):
        obs, r, term, trunc, info = env.step(torch.tensor([[1.0, 1.0]]))
        if t == 0:
            assert torch.allclose(info["final_obs"], torch.tensor([[0.1, 0.1]]))  # clipped per axis, not to norm 0.1
        assert not bool(term[0]) and bool(trunc[0]) == (t == 99)
    assert torch.equal(obs, torch.zeros(1, 2)) and int(env.episode_count[0]) == 1


def test_navigation_observations_stay_inside_the_declared_box():
    env = rl.NavigationFamily().make_env(rl.NavTask(torch.tensor([-0.5, 0.5])))
    assert np.isfinite(env.observation_space.low).all() and np.isfinite(env.observation_space.high).all()
    for direction in ([1.0, 1.0], [-1.0, -1.0]):  # the farthest a point can go: full steps away for the whole horizon
        obs, _ = env.reset(seed=0)
        assert env.observation_space.contains(obs)
        trunc = False
        while not trunc:
            obs, _, _, trunc, _ = env.step(np.array(direction, np.float32))
            assert env.observation_space.contains(obs), obs
        assert np.allclose(np.abs(obs), 10.0, atol=1e-4)


def test_navigation_terminates_inside_the_goal_box():
    env = rl.BatchedNavigation(rl.NavTask(torch.tensor([[0.05, 0.05]])))
    env.reset()
    # (0.009, 0.009) from the goal: outside the L2 ball of 0.01, inside MAML's box test
    obs, r, term, trunc, info = env.step(torch.tensor([[0.041, 0.041]]))
    assert bool(term[0]) and not bool(trunc[0])
    assert float(r[0]) == pytest.approx(-0.009 * math.sqrt(2), abs=1e-6)
    assert torch.equal(obs, torch.zeros(1, 2))


def _navigation_return(policy: str, n_goals: int = 10000) -> tuple[float, float]:
    fam = rl.NavigationFamily()
    env = fam.batched(fam.sample_tasks(n_goals, gen(5)))
    pos = env.reset()
    total = torch.zeros(env.num_envs, dtype=torch.float64)
    alive = torch.ones(env.num_envs, dtype=torch.bool)
    for _ in range(fam.horizon):
        a = torch.zeros_like(pos) if policy == "still" else rl.oracle_action(pos, env.env_goals, 0.1, policy)
        pos, r, term, trunc, _ = env.step(a)
        total += torch.where(alive, r.double(), torch.zeros((), dtype=torch.float64))
        alive &= ~(term | trunc)
    assert not bool(alive.any())
    return rl.mean_ci(total)


def test_navigation_reference_returns():
    assert rl.expected_standing_still_return() == pytest.approx(-38.26, abs=0.005)
    mean, ci = _navigation_return("still")
    assert abs(mean - rl.expected_standing_still_return()) < ci
    mean, ci = _navigation_return("axis")  # the straight-line oracle, about -0.51
    assert mean == pytest.approx(-0.506, abs=0.01) and ci < 0.01
    mean, _ = _navigation_return("vector")  # an L2-clipped oracle would be slower
    assert mean == pytest.approx(-0.650, abs=0.01)


# ------------------------------------------------------------------------- Gymnasium envs


@pytest.mark.parametrize("family", [rl.BanditFamily(), rl.TabularMDPFamily(), rl.NavigationFamily()],
                         ids=["bandit", "mdp", "navigation"])
def test_gymnasium_env_checker(family):
    env = family.make_env()
    check_env(env, skip_render_check=True)
    tasks = env.sample_tasks(2, gen(0))
    env.set_task(tasks[1])
    assert env.get_task() is tasks[1]
    env.reset(seed=1)


def test_env_without_task_draws_one_reproducibly_and_keeps_it():
    a, b = rl.TabularMDPFamily().make_env(), rl.TabularMDPFamily().make_env()
    a.reset(seed=3)
    b.reset(seed=3)
    assert torch.equal(a.get_task().transitions, b.get_task().transitions)
    task = a.get_task()
    a.reset(seed=4)
    assert a.get_task() is task


def test_single_env_errors_name_the_fix():
    env = rl.BanditFamily(n_arms=3).make_env()
    with pytest.raises(TaskError, match="reset"):
        env.step(0)
    env.reset(seed=0)
    with pytest.raises(TaskError, match="action must be in Discrete"):
        env.step(7)
    env.step(1)
    with pytest.raises(TaskError, match="Call reset"):
        env.step(1)
    with pytest.raises(TaskError, match="task.probs must be 3 probabilities"):
        env.set_task(rl.BanditTask(torch.rand(5)))
    with pytest.raises(TaskError, match="task must be a BanditTask"):
        env.set_task(rl.NavTask(torch.zeros(2)))


# --------------------------------------------------------------------------------- MuJoCo


# gymnasium's own HalfCheetah declares an unbounded observation box (velocities have no bound), and its
# env checker warns about that; the warning is about gymnasium's model, not about this wrapper
_UNBOUNDED_CHEETAH_BOX = "ignore:.*A Box observation space (minimum|maximum) value is:UserWarning"


@pytest.fixture
def _mujoco_log_elsewhere(tmp_path, monkeypatch):
    """MuJoCo writes MUJOCO_LOG.TXT into the working directory when it warns."""
    monkeypatch.chdir(tmp_path)


@needs_mujoco
@pytest.mark.usefixtures("_mujoco_log_elsewhere")
@pytest.mark.filterwarnings(_UNBOUNDED_CHEETAH_BOX)
def test_half_cheetah_velocity_reward_and_horizon():
    fam = rl.HalfCheetahVelFamily(horizon=5)
    env = fam.make_env(rl.VelocityTask(1.5))
    check_env(env, skip_render_check=True)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for t in range(5):
        a = rng.uniform(-1.5, 1.5, size=6).astype(np.float32)  # beyond the box: the cost uses the clipped action
        obs, r, term, trunc, info = env.step(a)
        ctrl = 0.05 * float(np.square(np.clip(a, -1, 1)).sum())
        assert r == pytest.approx(-abs(info["forward_velocity"] - 1.5) - ctrl, abs=1e-5)
        assert info["reward_ctrl"] == pytest.approx(-ctrl, abs=1e-5)
        assert obs.shape == (17,) and not term and trunc == (t == 4)


@needs_mujoco
@pytest.mark.usefixtures("_mujoco_log_elsewhere")
@pytest.mark.filterwarnings(_UNBOUNDED_CHEETAH_BOX)
def test_half_cheetah_direction_reward():
    fam = rl.HalfCheetahDirFamily(horizon=4)
    env = fam.make_env(rl.DirectionTask(-1.0))
    check_env(env, skip_render_check=True)
    env.reset(seed=1)
    a = np.full(6, 0.5, np.float32)
    _, r, _, _, info = env.step(a)
    assert r == pytest.approx(-info["forward_velocity"] - 0.05 * 6 * 0.25, abs=1e-5)
    env.set_task(rl.DirectionTask(1.0))
    with pytest.raises(TaskError, match="reset"):
        env.step(a)
    with pytest.raises(TaskError, match=r"\+1 or -1"):
        env.set_task(rl.DirectionTask(0.5))


def test_missing_mujoco_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mujoco", None)
    with pytest.raises(rl.MissingExtraError, match=r'pip install "metafit\[mujoco\]"'):
        rl.HalfCheetahVelFamily().make_env()


def test_metafit_rl_imports_without_gymnasium():
    code = (
        "import sys; sys.modules['gymnasium'] = None\n"
        "import torch, metafit.rl as rl\n"
        "env = rl.BanditFamily(3).batched(rl.BanditFamily(3).sample_tasks(2), seed=0); env.reset()\n"
        "env.step(torch.zeros(2, dtype=torch.long))\n"
        "try:\n    rl.BanditEnv\nexcept rl.MissingExtraError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "metafit[rl]"' in out.stdout


# ------------------------------------------------------------------------------ user errors


@pytest.mark.parametrize("make, message", [
    (lambda: rl.NavigationFamily(goal_range=-1),
     "NavigationFamily: goal_range must be positive; got -1. Pass a positive number."),
    (lambda: rl.BanditFamily(n_arms=1), "BanditFamily: n_arms must be an integer >= 2; got 1."),
    (lambda: rl.TabularMDPFamily(horizon=0), "TabularMDPFamily: horizon must be an integer >= 1; got 0."),
    (lambda: rl.HalfCheetahVelFamily(target_range=(2.0, 0.0)),
     "HalfCheetahVelFamily: target_range must be a finite (min, max) pair with min <= max"),
])
def test_family_config_errors(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value).startswith(message)


def test_family_registry():
    assert isinstance(rl.make_family("bandit", n_arms=10), rl.BanditFamily)
    assert set(rl.FAMILIES) == {"bandit", "tabular-mdp", "navigation", "halfcheetah-vel", "halfcheetah-dir"}
    with pytest.raises(ConfigError, match="make_family: name must be one of"):
        rl.make_family("cartpole")
    with pytest.raises(ConfigError, match="Valid settings: n_arms"):
        rl.make_family("bandit", arms=3)


def test_batched_env_input_errors():
    env = rl.BatchedBandit(rl.BanditFamily(3).sample_tasks(2, gen(0)))
    env.reset()
    with pytest.raises(TaskError, match=r"BatchedBandit: actions must be in \[0, 3\); got \(0, 5\)"):
        env.step(torch.tensor([0, 5]))
    with pytest.raises(TaskError, match=r"actions must be an integer tensor of shape \(2,\)"):
        env.step(torch.tensor([0.0, 1.0]))
    with pytest.raises(TaskError, match="tasks must be a non-empty list of BanditTask"):
        rl.BatchedBandit([])
    bad = rl.MDPTask(torch.zeros(2, 2), torch.ones(2, 2, 2), 1.0)
    with pytest.raises(TaskError, match="transitions must be probability rows"):
        rl.BatchedMDP([bad])
    nav = rl.BatchedNavigation(rl.NavigationFamily().sample_tasks(2, gen(0)))
    nav.reset()
    with pytest.raises(TaskError, match=r"actions must be a finite float tensor of shape \(2, 2\)"):
        nav.step(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))


@pytest.mark.parametrize("family", [rl.BanditFamily(3), rl.TabularMDPFamily()], ids=["bandit", "mdp"])
def test_family_batched_can_skip_the_action_check(family):
    # the check reads the actions' min and max: on a GPU that is a device sync per step, which a
    # learner whose actions come from its own sampler can skip; the default keeps it
    tasks = family.sample_tasks(2, gen(0))
    checked = family.batched(tasks, seed=0)
    unchecked = family.batched(tasks, seed=0, check_actions=False)
    assert checked.check and not unchecked.check
    checked.reset()
    unchecked.reset()
    with pytest.raises(TaskError, match="actions must be in"):
        checked.step(torch.tensor([0, 7]))
    for _ in range(3):  # valid actions: the same transitions either way
        a, b = checked.step(torch.tensor([1, 2])), unchecked.step(torch.tensor([1, 2]))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
