"""MAML-RL (metafit.rl.maml_rl): meta-gradient against float64 finite differences on every path
(REINFORCE / LVC inner objective, 0 / 1 / 2 inner steps, PPO clipping active), the batched
per-task computation against a plain per-task loop, the linear baseline against least squares,
GAE against a direct sum, 0 inner steps = the plain policy, a short training run, evaluate()
shape and determinism, config/family/task errors, state_dict round trip, a HalfCheetah smoke run."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from metafit.errors import ConfigError, TaskError
from metafit.rl import MAMLRL, BanditFamily, NavigationFamily
from metafit.rl.learners import RL_LEARNERS, get_rl_learner
from metafit.rl.learners.maml_rl_ops import (
    RolloutBatch,
    compute_advantages,
    discounted_returns,
    expand_params,
    fit_linear_baseline,
    linear_baseline_features,
    outer_losses,
    policy_forward,
    policy_log_prob,
)
from metafit.validation import parse_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_learner(dtype=torch.float64, **cfg) -> MAMLRL:
    torch.manual_seed(0)
    learner = MAMLRL({"hidden": [6, 5], **cfg}, NavigationFamily())
    with torch.no_grad():  # non-zero biases and log-std so that no gradient term vanishes by symmetry
        for p in learner.policy.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    return learner.to(dtype)


def random_batch(params_t: dict, g: torch.Generator, T=2, E=2, H=4, noise=0.3) -> RolloutBatch:
    """A fixed batch of trajectories; sampling log-probs = the current policy's plus ``noise`` (so
    that likelihood ratios differ from 1 and some are clipped)."""
    obs = torch.randn(T, E, H, 2, generator=g, dtype=torch.float64)
    actions = torch.randn(T, E, H, 2, generator=g, dtype=torch.float64)
    rewards = torch.randn(T, E, H, generator=g, dtype=torch.float64)
    mask = torch.ones(T, E, H, dtype=torch.float64)
    mask[0, 1, 2:] = 0  # an episode that ended early
    with torch.no_grad():
        logp = policy_log_prob({k: v.detach() for k, v in params_t.items()}, obs.reshape(T, E * H, 2),
                               actions.reshape(T, E * H, 2)).reshape(T, E, H)
    logp = (logp + noise * torch.randn(T, E, H, generator=g, dtype=torch.float64)) * mask
    adv = compute_advantages(obs, rewards, mask, 0.9, 0.8, 1e-5, True)
    return RolloutBatch(obs, actions, rewards * mask, mask, logp, adv)


def batches_for(learner: MAMLRL, n_inner: int, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    p = expand_params({k: v.detach() for k, v in learner.params().items()}, 2)
    inner = []
    for _ in range(n_inner):
        b = random_batch(p, g, noise=noise)
        inner.append(b)
        p = _step(learner, p, b)
    outer = random_batch(p, g, noise=noise)
    return inner, outer


def _step(learner, p, batch):
    from metafit.rl.learners.maml_rl_ops import inner_update

    leaf = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    return {k: v.detach() for k, v in inner_update(leaf, batch, learner.config.inner_lr,
                                                   learner.config.inner_objective).items()}


def flat_meta_loss(learner: MAMLRL, inner, outer):
    names = list(learner.params())
    shapes = [learner.params()[k].shape for k in names]
    sizes = [math.prod(s) for s in shapes]

    def f(flat):
        parts = torch.split(flat, sizes)
        params = {k: x.view(s) for k, x, s in zip(names, parts, shapes)}
        return learner.meta_loss(inner, outer, params)

    flat0 = torch.cat([learner.params()[k].detach().flatten() for k in names])
    return f, flat0


# ---- the meta-gradient against finite differences, every path ------------------------------------

@pytest.mark.parametrize("objective", ["reinforce", "lvc"])
@pytest.mark.parametrize("n_inner", [0, 1, 2])
def test_meta_gradient_matches_finite_differences(objective, n_inner):
    learner = tiny_learner(inner_objective=objective, inner_lr=0.3, clip_ratio=0.2)
    inner, outer = batches_for(learner, n_inner, seed=n_inner)
    f, flat0 = flat_meta_loss(learner, inner, outer)
    # the clip must be active for some samples and inactive for others, so both branches are checked
    with torch.no_grad():
        p = learner.adapt(inner, learner.params(), create_graph=False) if inner else expand_params(learner.params(), 2)
        ratio = torch.exp(policy_log_prob(p, outer.flat("obs"), outer.flat("actions")) - outer.flat("logp"))
    clipped = ((ratio - 1).abs() > 0.2) & (outer.flat("mask") > 0)
    assert 0 < int(clipped.sum()) < int(outer.mask.sum())
    x = flat0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_second_order_terms_matter():
    """The check above can fail: the first-order approximation (adapted parameters' dependence on
    the inner gradient dropped) differs from the finite-difference gradient."""
    learner = tiny_learner(inner_lr=0.3)
    inner, outer = batches_for(learner, 1)
    f, flat0 = flat_meta_loss(learner, inner, outer)
    x = flat0.clone().requires_grad_(True)
    (full,) = torch.autograd.grad(f(x), x)
    params = learner.params()
    fast = learner.adapt(inner, params, create_graph=False)
    fo = {k: expand_params(params, 2)[k] + (fast[k] - expand_params(params, 2)[k]).detach() for k in fast}
    loss_fo = outer_losses(fo, outer, learner.config.clip_ratio)[0].mean()
    grads_fo = torch.autograd.grad(loss_fo, list(params.values()))
    first = torch.cat([g.flatten() for g in grads_fo])
    assert (full - first).norm() > 1e-3 * full.norm()


def _loop_meta_loss(learner: MAMLRL, inner, outer, params):
    """The meta-loss task by task with unbatched parameters (reference for the batched code)."""
    cfg = learner.config
    losses = []
    for i in range(outer.num_tasks):
        p = dict(params)
        for b in inner:
            obs, act = b.obs[i].reshape(-1, 2), b.actions[i].reshape(-1, 2)
            m, adv, old = b.mask[i].reshape(-1), b.advantages[i].reshape(-1), b.logp[i].reshape(-1)
            mean, log_std = policy_forward(p, obs)
            z = (act - mean) / log_std.exp()
            logp = (-0.5 * z ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
            w = torch.exp(logp - old) if cfg.inner_objective == "lvc" else logp
            loss = -(w * adv * m).sum() / m.sum()
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            p = {k: v - cfg.inner_lr * g for (k, v), g in zip(p.items(), grads)}
        obs, act = outer.obs[i].reshape(-1, 2), outer.actions[i].reshape(-1, 2)
        m, adv, old = outer.mask[i].reshape(-1), outer.advantages[i].reshape(-1), outer.logp[i].reshape(-1)
        mean, log_std = policy_forward(p, obs)
        z = (act - mean) / log_std.exp()
        ratio = torch.exp((-0.5 * z ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1) - old)
        surr = torch.min(ratio * adv, ratio.clamp(1 - cfg.clip_ratio, 1 + cfg.clip_ratio) * adv)
        losses.append(-(surr * m).sum() / m.sum())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("objective", ["reinforce", "lvc"])
def test_batched_meta_loss_equals_per_task_loop(objective):
    learner = tiny_learner(inner_objective=objective, inner_lr=0.3)
    inner, outer = batches_for(learner, 2, seed=5)
    params = learner.params()
    batched = learner.meta_loss(inner, outer, params)
    loop = _loop_meta_loss(learner, inner, outer, params)
    torch.testing.assert_close(batched, loop, rtol=1e-9, atol=1e-12)
    gb = torch.autograd.grad(batched, list(params.values()))
    gl = torch.autograd.grad(loop, list(params.values()))
    for a, b in zip(gb, gl):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


# ---- the linear feature baseline and advantages -----------------------------------------------------

def test_linear_baseline_matches_least_squares():
    g = torch.Generator().manual_seed(0)
    T, E, H = 3, 4, 7
    obs = 4 * torch.randn(T, E, H, 2, generator=g, dtype=torch.float64)
    obs[0, 0, 0, 0] = 25.0  # clipped to 10
    mask = torch.ones(T, E, H, dtype=torch.float64)
    mask[1, 2, 3:] = 0
    mask[2, 0, 1:] = 0
    feats = linear_baseline_features(obs, mask)
    # rllab's features, written out for one step
    o, al = obs[1, 0, 5].clamp(-10, 10), 5 / 100
    expected = torch.cat([o, o ** 2, torch.tensor([al, al ** 2, al ** 3, 1.0], dtype=torch.float64)])
    torch.testing.assert_close(feats[1, 0, 5], expected)
    assert feats[0, 0, 0, 0] == 10.0 and feats[0, 0, 0, 2] == 100.0
    assert feats[1, 2, 4].abs().sum() == 0  # a padded step has no features
    y = torch.randn(T, E, H, generator=g, dtype=torch.float64) * mask
    reg = 1e-5
    w = fit_linear_baseline(feats.reshape(T, E * H, -1), y.reshape(T, E * H), reg)
    for i in range(T):
        valid = mask[i].reshape(-1) > 0
        A = feats[i].reshape(E * H, -1)[valid].numpy()
        k = A.shape[1]
        A_aug = np.vstack([A, math.sqrt(reg) * np.eye(k)])  # ridge as augmented least squares
        b_aug = np.concatenate([y[i].reshape(-1)[valid].numpy(), np.zeros(k)])
        ref = np.linalg.lstsq(A_aug, b_aug, rcond=None)[0]
        np.testing.assert_allclose(w[i].numpy(), ref, rtol=1e-6, atol=1e-8)


def test_advantages_are_gae_of_the_fitted_baseline():
    g = torch.Generator().manual_seed(1)
    T, E, H, gamma, lam = 2, 3, 6, 0.9, 0.7
    obs = torch.randn(T, E, H, 2, generator=g, dtype=torch.float64)
    rewards = torch.randn(T, E, H, generator=g, dtype=torch.float64)
    mask = torch.ones(T, E, H, dtype=torch.float64)
    mask[0, 1, 4:] = 0
    returns = discounted_returns(rewards * mask, mask, gamma)
    feats = linear_baseline_features(obs, mask)
    w = fit_linear_baseline(feats.reshape(T, E * H, -1), returns.reshape(T, E * H), 1e-5)
    adv = compute_advantages(obs, rewards, mask, gamma, lam, 1e-5, normalize=False)
    for i in range(T):
        for e in range(E):
            n = int(mask[i, e].sum())
            r = rewards[i, e, :n]
            b = torch.cat([feats[i, e, :n] @ w[i], torch.zeros(1, dtype=torch.float64)])
            for t in range(n):
                ret = sum(gamma ** k * float(r[t + k]) for k in range(n - t))
                assert math.isclose(float(returns[i, e, t]), ret, rel_tol=1e-12, abs_tol=1e-12)
                ref = sum((gamma * lam) ** k * float(r[t + k] + gamma * b[t + k + 1] - b[t + k]) for k in range(n - t))
                assert math.isclose(float(adv[i, e, t]), ref, rel_tol=1e-9, abs_tol=1e-9)
            assert adv[i, e, n:].abs().sum() == 0
    norm = compute_advantages(obs, rewards, mask, gamma, lam, 1e-5, normalize=True)
    for i in range(T):
        v = norm[i][mask[i] > 0]
        assert abs(float(v.mean())) < 1e-9 and abs(float(v.std(unbiased=False)) - 1) < 1e-6
    # lambda = 1: discounted return minus the baseline
    adv1 = compute_advantages(obs, rewards, mask, gamma, 1.0, 1e-5, normalize=False)
    base = (feats @ w.view(T, 1, -1, 1)).squeeze(-1) * mask
    torch.testing.assert_close(adv1, (returns - base) * mask)


# ---- sampling, zero steps, evaluate ---------------------------------------------------------------

def test_sampler_log_probs_and_rewards_are_consistent():
    learner = tiny_learner(dtype=torch.float32)
    fam = learner.family
    tasks = fam.sample_tasks(3, torch.Generator().manual_seed(0))
    p = expand_params({k: v.detach() for k, v in learner.params().items()}, 3)
    batch = learner.sample(p, tasks, 4, torch.Generator().manual_seed(1))
    assert batch.obs.shape == (3, 4, fam.horizon, 2)
    logp = policy_log_prob(p, batch.flat("obs"), batch.flat("actions"))
    torch.testing.assert_close(logp * batch.flat("mask"), batch.flat("logp") * batch.flat("mask"),
                               rtol=1e-5, atol=1e-5)
    # positions: cumulative per-axis clipped displacements of action_scale * action; reward -distance
    step = (batch.actions * fam.max_action).clamp(-fam.max_action, fam.max_action)
    pos = step.cumsum(2)
    goals = torch.stack([t.goal for t in tasks]).float().view(3, 1, 1, 2)
    reward = -(pos - goals).norm(dim=-1)
    m = batch.mask
    torch.testing.assert_close(batch.rewards * m, reward * m, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch.obs[:, :, 1:] * m[:, :, 1:, None], pos[:, :, :-1] * m[:, :, 1:, None],
                               rtol=1e-4, atol=1e-4)


def test_zero_inner_steps_is_the_plain_policy():
    learner = tiny_learner()
    _, outer = batches_for(learner, 0)
    params = learner.params()
    loss0 = learner.meta_loss([], outer, params)
    # the plain, unbatched policy on each task's data
    logp = torch.stack([policy_log_prob(params, outer.obs[i].reshape(-1, 2), outer.actions[i].reshape(-1, 2))
                        for i in range(outer.num_tasks)])
    ratio = torch.exp(logp - outer.flat("logp"))
    adv, m = outer.flat("advantages"), outer.flat("mask")
    surr = torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    torch.testing.assert_close(loss0, (-(surr * m).sum(1) / m.sum(1)).mean(), rtol=1e-12, atol=1e-12)
    # evaluate(): the "0 steps" point is the plain policy's return, whatever eval_steps is
    tasks = learner.family.sample_tasks(4, torch.Generator().manual_seed(3))
    l0 = tiny_learner(eval_steps=0, trajectories_per_task=3)
    l3 = tiny_learner(eval_steps=3, trajectories_per_task=3)
    r0 = l0.evaluate(tasks, torch.Generator().manual_seed(7))
    r3 = l3.evaluate(tasks, torch.Generator().manual_seed(7))
    assert r0.shape == (4, 1) and r3.shape == (4, 4)
    torch.testing.assert_close(r0[:, 0], r3[:, 0], rtol=0, atol=0)
    batch = l0.sample(expand_params({k: v.detach() for k, v in l0.params().items()}, 4), tasks, 3,
                      torch.Generator().manual_seed(7))
    torch.testing.assert_close(r0[:, 0], batch.episode_returns().double().mean(1), rtol=0, atol=0)


def test_evaluate_shape_determinism_and_no_side_effects():
    learner = tiny_learner(dtype=torch.float32, trajectories_per_task=4, eval_task_chunk=3)
    tasks = learner.family.sample_tasks(5, torch.Generator().manual_seed(0))
    before = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    a = learner.evaluate(tasks, torch.Generator().manual_seed(1))
    b = learner.evaluate(tasks, torch.Generator().manual_seed(1))
    c = learner.evaluate(tasks, torch.Generator().manual_seed(2))
    assert a.shape == (5, 4) and learner.eval_points() == ["0 steps", "1 step", "2 steps", "3 steps"]
    assert torch.isfinite(a).all() and (a <= 0).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    for k, v in learner.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad():  # works under no_grad (the training layer may call it that way)
        assert torch.equal(learner.evaluate(tasks, torch.Generator().manual_seed(1)), a)


def test_short_training_improves_post_adaptation_return():
    torch.manual_seed(0)
    fam = NavigationFamily()
    learner = MAMLRL({"hidden": [32, 32], "meta_batch_size": 10, "trajectories_per_task": 10, "ppo_epochs": 3,
                      "meta_lr": 3e-3, "eval_steps": 1}, fam)
    tasks = fam.sample_tasks(20, torch.Generator().manual_seed(100))
    start = learner.evaluate(tasks, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(1)
    stats = [learner.train_iteration(g) for _ in range(12)]
    end = learner.evaluate(tasks, torch.Generator().manual_seed(5))
    for s in stats:
        assert {"return", "return_before", "env_steps", "loss", "kl_post", "seconds"} <= set(s)
        assert all(math.isfinite(v) for v in s.values())
    assert stats[0]["env_steps"] > 0
    # post-adaptation return improves by a wide margin (random init: about -65; after 12 updates about -35)
    assert end[:, 1].mean() > start[:, 1].mean() + 15, (start.mean(0), end.mean(0))
    assert end[:, 1].mean() > end[:, 0].mean()  # and adaptation helps


def test_state_dict_round_trip_reproduces_evaluate_and_training():
    torch.manual_seed(0)
    fam = NavigationFamily()
    cfg = {"hidden": [16], "meta_batch_size": 3, "trajectories_per_task": 3, "ppo_epochs": 2}
    learner = MAMLRL(cfg, fam)
    g = torch.Generator().manual_seed(0)
    learner.train_iteration(g)
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    opt = copy.deepcopy(learner.optimizer_state_dict())  # a checkpoint holds a copy, not the live tensors
    torch.manual_seed(123)
    other = MAMLRL(cfg, fam)
    other.load_state_dict(state)
    other.load_optimizer_state_dict(opt)
    tasks = fam.sample_tasks(4, torch.Generator().manual_seed(9))
    torch.testing.assert_close(learner.evaluate(tasks, torch.Generator().manual_seed(1)),
                               other.evaluate(tasks, torch.Generator().manual_seed(1)), rtol=0, atol=0)
    s1 = learner.train_iteration(torch.Generator().manual_seed(4))
    s2 = other.train_iteration(torch.Generator().manual_seed(4))
    assert s1["loss"] == s2["loss"] and s1["return"] == s2["return"]
    for k, v in learner.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])


# ---- config and errors ------------------------------------------------------------------------------

def test_registered_and_defaults_follow_the_paper():
    assert get_rl_learner("maml-rl") is MAMLRL and RL_LEARNERS["maml-rl"] is MAMLRL
    cfg = MAMLRL.Config()
    assert (cfg.hidden, cfg.inner_lr, cfg.meta_batch_size, cfg.trajectories_per_task, cfg.gamma, cfg.gae_lambda) == (
        [100, 100], 0.1, 20, 20, 0.99, 1.0)
    for name, field in MAMLRL.Config.model_fields.items():
        assert name == "name" or field.description, name


@pytest.mark.parametrize("key,value", [("inner_lr", 0), ("inner_lr", -0.1), ("meta_batch_size", 0),
                                       ("trajectories_per_task", 0), ("gamma", 1.5), ("gae_lambda", -0.1),
                                       ("clip_ratio", 1.0), ("ppo_epochs", 0), ("hidden", [0]), ("hidden", []),
                                       ("inner_steps", -1), ("inner_objective", "trpo"), ("meta_lr", 0.0),
                                       ("eval_trajectories_per_task", 0), ("max_grad_norm", -1.0)])
def test_invalid_config_names_field_and_fix(key, value):
    with pytest.raises(ConfigError) as err:
        parse_config(MAMLRL.Config, {key: value}, "learner")
    msg = str(err.value)
    assert f"learner.{key}" in msg and ("--set" in msg or "Choose one" in msg), msg
    with pytest.raises(ConfigError, match=key):
        MAMLRL({key: value}, NavigationFamily())


def test_unknown_key_and_wrong_family_and_tasks():
    with pytest.raises(ConfigError, match="unknown key 'learner.inner_lrr'.*inner_lr"):
        MAMLRL({"inner_lrr": 0.1}, NavigationFamily())
    with pytest.raises(ConfigError, match=r"MAMLRL: family must be .*continuous.*got 'BanditFamily'.*rl2"):
        MAMLRL({}, BanditFamily())
    learner = tiny_learner(dtype=torch.float32)
    with pytest.raises(TaskError, match=r"MAMLRL: tasks must be a non-empty list.*sample_tasks"):
        learner.evaluate([], torch.Generator())
    with pytest.raises(TaskError, match=r"MAMLRL: tasks must be"):
        learner.evaluate(["not a task"], torch.Generator())


# ---- HalfCheetah (Gymnasium + MuJoCo) ---------------------------------------------------------------

def test_halfcheetah_velocity_smoke():
    pytest.importorskip("mujoco")
    from metafit.rl import HalfCheetahVelFamily

    torch.manual_seed(0)
    fam = HalfCheetahVelFamily(horizon=8)
    learner = MAMLRL({"hidden": [8], "meta_batch_size": 2, "trajectories_per_task": 2, "ppo_epochs": 1,
                      "eval_steps": 1}, fam)
    assert (learner.obs_dim, learner.act_dim, learner.action_scale) == (17, 6, 1.0)
    stats = learner.train_iteration(torch.Generator().manual_seed(0))
    assert stats["env_steps"] == 2 * 2 * 2 * 8 and math.isfinite(stats["return"]) and stats["env_steps_per_s"] > 0
    tasks = fam.sample_tasks(2, torch.Generator().manual_seed(1))
    r1 = learner.evaluate(tasks, torch.Generator().manual_seed(2))
    r2 = learner.evaluate(tasks, torch.Generator().manual_seed(2))
    assert r1.shape == (2, 2) and torch.isfinite(r1).all() and torch.equal(r1, r2)
    learner.close()


def test_benchmark_halfcheetah_path_runs_end_to_end(tmp_path):
    pytest.importorskip("mujoco")
    spec = importlib.util.spec_from_file_location("bench_maml_rl", REPO / "benchmarks" / "maml_rl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cheetah.json"
    res = bench.main(["--family", "halfcheetah-vel", "--iterations", "1", "--eval-tasks", "1", "--set",
                      "meta_batch_size=1", "--set", "trajectories_per_task=1", "--set", "hidden=[8]", "--set",
                      "ppo_epochs=1", "--set", "eval_steps=1", "--out", str(out)])
    assert out.is_file() and res["runs"]["maml"]["iterations"] == 1
    assert res["sampler"]["steps_per_s_with_policy_and_baseline"] > 0
