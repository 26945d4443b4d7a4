"""RL² (metafit.rl.rl2): hidden-state handling across episodes and trials, GAE, the PPO loss
gradient, a learning test that can fail, evaluate() shape/determinism, config errors and an exact
state round trip."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from metafit.errors import ConfigError, TaskError
from metafit.rl import BanditFamily, BanditTask, NavigationFamily, NavTask, RL2, RL2Config, TabularMDPFamily
from metafit.rl.learners import RL_LEARNERS, get_rl_learner
from metafit.rl.learners.ppo import gae, ppo_loss
from metafit.validation import parse_config


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _learner(family, seed=0, **cfg):
    torch.manual_seed(seed)
    base = dict(hidden_size=8, meta_batch_size=8, ppo_minibatches=2, ppo_epochs=2)
    base.update(cfg)
    return RL2(base, family)


def test_registered():
    assert RL_LEARNERS["rl2"] is RL2 and get_rl_learner("rl2") is RL2
    assert RL2.Config is RL2Config and RL2.name == "rl2"


# ------------------------------------------------------------------------- hidden state / inputs


def test_inputs_and_hidden_state_carry_across_episodes():
    fam = TabularMDPFamily(n_states=4, n_actions=3, horizon=3)
    learner = _learner(fam, n_episodes=3)
    tasks = fam.sample_tasks(5, torch.Generator().manual_seed(1))
    ro = learner.rollout(tasks, torch.Generator().manual_seed(2))
    T, N, D = ro.inputs.shape
    assert (T, N, D) == (9, 5, 4 + 3 + 2) and bool(ro.mask.all())
    S, A = 4, 3
    x = ro.inputs
    # first step of the trial: start state, no previous action, reward or done flag
    assert torch.equal(x[0, :, :S], torch.nn.functional.one_hot(torch.zeros(N, dtype=torch.long), S).float())
    assert torch.equal(x[0, :, S:], torch.zeros(N, A + 2))
    for t in range(1, T):
        # previous action one-hot, previous reward, done flag exactly where an episode ended
        assert torch.equal(x[t, :, S:S + A], torch.nn.functional.one_hot(ro.actions[t - 1], A).float())
        assert torch.allclose(x[t, :, S + A], ro.rewards[t - 1])
        assert torch.equal(x[t, :, S + A + 1], torch.full((N,), float(t % 3 == 0)))
    for t in (3, 6):  # a new episode starts in the start state
        assert torch.equal(x[t, :, :S].argmax(1), torch.zeros(N, dtype=torch.long))
    # episode returns partition the trial's rewards
    per_ep = ro.rewards.reshape(3, 3, N).sum(1).T
    assert torch.allclose(ro.episode_returns, per_ep, atol=1e-5)

    with torch.no_grad():
        # one GRU state over the whole trial: recomputing from a zero state at t=0 reproduces every
        # log-probability of the collection (the PPO update relies on this) ...
        h = learner.sequence(x)
        logp, _ = learner._log_prob_entropy(learner._dist(h), ro.actions)
        assert torch.allclose(logp, ro.log_probs, atol=1e-5)
        # ... and the state is NOT reset at the episode boundary t=3: restarting there differs
        h_reset = learner.sequence(x[3:])
        assert not torch.allclose(h_reset[0], h[3], atol=1e-3)
        # step_hidden (collection) equals nn.GRUCell with the same weights
        cell = torch.nn.GRUCell(D, 8)
        cell.load_state_dict({k.replace("_l0", ""): v for k, v in learner.gru.state_dict().items()})
        h0 = torch.randn(N, 8)
        assert torch.allclose(cell(x[1], h0), learner.step_hidden(x[1], h0), atol=1e-6)


@pytest.mark.parametrize("cell, value_network, head_hidden_size", [("ln-gru", "shared", 0), ("gru", "separate", 0),
                                                                   ("ln-gru", "separate", 0), ("gru", "shared", 6)])
def test_other_networks_recompute_the_collection(cell, value_network, head_hidden_size):
    """Whatever the cell, critic and heads, the update's recomputation from stored inputs
    reproduces the log-probabilities and values of the step-by-step collection."""
    fam = TabularMDPFamily(n_states=4, n_actions=3, horizon=3)
    learner = _learner(fam, n_episodes=3, cell=cell, value_network=value_network, head_hidden_size=head_hidden_size)
    assert isinstance(learner.policy_head, torch.nn.Sequential) == (head_hidden_size > 0)
    ro = learner.rollout(fam.sample_tasks(5, torch.Generator().manual_seed(1)), torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = learner.sequence(ro.inputs)
        logp, _ = learner._log_prob_entropy(learner._dist(h), ro.actions)
        hv = h if learner.value_gru is None else learner.value_gru.sequence(ro.inputs)
        assert torch.allclose(logp, ro.log_probs, atol=1e-5)
        assert torch.allclose(learner._value(hv), ro.values, atol=1e-5)
        assert not torch.allclose(learner.sequence(ro.inputs[3:])[0], h[3], atol=1e-3)  # state carried
    assert (learner.value_gru is None) == (value_network == "shared")


def test_time_input_is_the_fraction_of_the_trial_elapsed():
    fam = TabularMDPFamily(n_states=4, n_actions=3, horizon=3)
    learner = _learner(fam, n_episodes=2, time_input=True)
    ro = learner.rollout(fam.sample_tasks(2, torch.Generator().manual_seed(1)), torch.Generator().manual_seed(2))
    assert ro.inputs.shape == (6, 2, 4 + 3 + 2 + 1)
    assert torch.allclose(ro.inputs[:, 0, -1], torch.arange(6) / 6)


def test_transition_input_files_each_reward_under_its_state_action_pair():
    """transition_input: the previous (state, action) pair one-hot and the reward at that pair's
    index, zeros at the trial's first step; bandits have the one state, so the pair is the arm."""
    fam = TabularMDPFamily(n_states=4, n_actions=3, horizon=3)
    learner = _learner(fam, n_episodes=3, transition_input=True)
    ro = learner.rollout(fam.sample_tasks(5, torch.Generator().manual_seed(1)), torch.Generator().manual_seed(2))
    S, A = 4, 3
    base = S + A + 2
    x = ro.inputs
    assert x.shape == (9, 5, base + 2 * S * A) and learner.input_dim == base + 2 * S * A
    assert torch.equal(x[0, :, base:], torch.zeros(5, 2 * S * A))
    states = x[:, :, :S].argmax(-1)  # the state each action was taken in
    for t in range(1, 9):
        pair = states[t - 1] * A + ro.actions[t - 1]
        onehot = torch.nn.functional.one_hot(pair, S * A).float()
        assert torch.equal(x[t, :, base:base + S * A], onehot), t
        assert torch.allclose(x[t, :, base + S * A:], onehot * ro.rewards[t - 1].unsqueeze(1)), t
    with torch.no_grad():
        logp, _ = learner._log_prob_entropy(learner._dist(learner.sequence(x)), ro.actions)
    assert torch.allclose(logp, ro.log_probs, atol=1e-5)

    bandit = _learner(BanditFamily(n_arms=3), n_episodes=4, transition_input=True)
    ro = bandit.rollout(BanditFamily(n_arms=3).sample_tasks(2, torch.Generator().manual_seed(0)),
                        torch.Generator().manual_seed(1))
    arm = torch.nn.functional.one_hot(ro.actions[:-1], 3).float()
    assert torch.equal(ro.inputs[1:, :, 1 + 3 + 2:1 + 3 + 2 + 3], arm)
    assert torch.allclose(ro.inputs[1:, :, -3:], arm * ro.rewards[:-1].unsqueeze(-1))

    with pytest.raises(ConfigError, match=r"RL2: transition_input must be false for a family with continuous "
                                          r"observations or actions; got True\. Use transition_input with bandits"):
        RL2({"transition_input": True}, NavigationFamily())


def test_hidden_state_reset_between_trials():
    fam = BanditFamily(n_arms=3)
    learner = _learner(fam, n_episodes=6)
    tasks = fam.sample_tasks(7, torch.Generator().manual_seed(3))
    a = learner.rollout(tasks, torch.Generator().manual_seed(5))
    learner.rollout(tasks, torch.Generator().manual_seed(6))  # another trial in between
    b = learner.rollout(tasks, torch.Generator().manual_seed(5))
    assert a.inputs.shape[0] == 6  # one pull per episode
    for name in ("inputs", "actions", "log_probs", "values", "rewards", "episode_returns"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.inputs[0, :, 1:], torch.zeros(7, 3 + 2))  # fresh trial: zero previous inputs


# ---------------------------------------------------------------------------------- GAE / PPO


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.5], [1.0, 1.0], [1.5, 1.5]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, True], [True, False]])  # trial 2 ends after step 1
    adv, tgt = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # trial 1: d2 = 3 - 1.5 = 1.5 (terminal); d1 = 2 + .9*1.5 - 1 = 2.35; d0 = 1 + .9*1 - .5 = 1.4
    #          A2 = 1.5, A1 = 2.35 + .45*1.5 = 3.025, A0 = 1.4 + .45*3.025 = 2.76125
    # trial 2: d1 = 2 - 1 = 1 (terminal), A1 = 1, A0 = 1.4 + .45*1 = 1.85, A2 = 0 (masked)
    expected = torch.tensor([[2.76125, 1.85], [3.025, 1.0], [1.5, 0.0]], dtype=torch.float64)
    assert torch.allclose(adv, expected, atol=1e-12)
    assert torch.allclose(tgt, (expected + values) * mask, atol=1e-12)
    # lambda = 1, gamma = 1: advantages are Monte-Carlo returns minus values
    adv1, tgt1 = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(tgt1[:, 0], torch.tensor([6.0, 5.0, 3.0], dtype=torch.float64))
    assert torch.allclose(tgt1[:, 1], torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64))


def test_ppo_surrogate_gradient_matches_formula():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(6, 4, generator=g, dtype=torch.float64)
    new = (old + 0.3 * torch.randn(6, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(6, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 4, generator=g) < 0.8
    zeros = torch.zeros(6, 4, dtype=torch.float64)
    clip = 0.1
    loss, stats = ppo_loss(new, old, adv, zeros, zeros, zeros, mask, clip, 0.0, 0.0)
    loss.backward()
    r = torch.exp(new.detach() - old)
    # d/dlogp of -min(rA, clip(r)A): -rA/n where the unclipped term is the minimum and r is inside
    # the clip range or the clipped side is not the smaller one, else 0
    unclipped_active = (r * adv <= r.clamp(1 - clip, 1 + clip) * adv) | ((r >= 1 - clip) & (r <= 1 + clip))
    expected = -(r * adv) * unclipped_active * mask / mask.sum()
    assert torch.allclose(new.grad, expected, atol=1e-12)
    assert 0 < float(stats["clip_fraction"]) < 1


@pytest.mark.parametrize("variant, shift", [({}, 0.05),
                                            ({"cell": "ln-gru", "value_network": "separate"}, 0.3),
                                            ({"head_hidden_size": 3}, 0.13),
                                            ({"head_hidden_size": 3, "transition_input": True}, 0.1)])
def test_ppo_loss_gradient_finite_differences_float64(variant, shift):
    fam = TabularMDPFamily(n_states=3, n_actions=2, horizon=2)
    learner = _learner(fam, n_episodes=2, hidden_size=4, ppo_clip=0.05, entropy_coef=0.1, time_input=True,
                       **variant).double()
    tasks = fam.sample_tasks(3, torch.Generator().manual_seed(0))
    ro = learner.rollout(tasks, torch.Generator().manual_seed(1))
    adv, tgt = gae(ro.rewards, ro.values, ro.mask, 0.9, 0.5)
    learner._update_value_stats(tgt[ro.mask])
    with torch.no_grad():  # move away from the collecting policy so ratios differ from 1
        g = torch.Generator().manual_seed(2)
        for p in learner.parameters():
            p.add_(shift * torch.randn(p.shape, generator=g, dtype=p.dtype))
    params = [p for p in learner.parameters()]
    learner.zero_grad()
    loss, stats = learner.loss(ro, adv, tgt)
    loss.backward()
    assert 0 < float(stats["clip_fraction"]) < 1  # both branches of the clipped objective are exercised
    eps = 1e-6
    g = torch.Generator().manual_seed(3)
    checked = 0
    for p in params:
        flat, grad = p.data.view(-1), p.grad.view(-1)
        for i in torch.randperm(flat.numel(), generator=g)[:4].tolist():
            old = float(flat[i])
            with torch.no_grad():
                flat[i] = old + eps
                up = float(learner.loss(ro, adv, tgt)[0])
                flat[i] = old - eps
                down = float(learner.loss(ro, adv, tgt)[0])
                flat[i] = old
            fd = (up - down) / (2 * eps)
            assert abs(fd - float(grad[i])) <= 1e-6 + 1e-5 * abs(fd), (p.shape, i, fd, float(grad[i]))
            checked += 1
    assert checked >= 12


def test_separate_value_network_isolates_policy_and_value_gradients():
    """value_network="separate": the value loss reaches only the critic's network and head, the
    policy loss only the policy's; the collection's values are the critic's."""
    fam = TabularMDPFamily(n_states=3, n_actions=2, horizon=3)
    learner = _learner(fam, n_episodes=2, cell="ln-gru", value_network="separate")
    assert learner.value_gru is not None and learner.value_gru is not learner.gru
    tasks = fam.sample_tasks(4, torch.Generator().manual_seed(0))
    ro = learner.rollout(tasks, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(learner._value(learner.value_gru.sequence(ro.inputs)), ro.values, atol=1e-5)
    adv, tgt = gae(ro.rewards, ro.values, ro.mask, 0.9, 0.5)
    policy_side = {n for n, _ in learner.named_parameters() if n.startswith(("gru.", "policy_head."))}
    value_side = {n for n, _ in learner.named_parameters() if n.startswith(("value_gru.", "value_head."))}
    assert policy_side and value_side and not policy_side & value_side
    for coefs, reached in [((1.0, 0.0), value_side), ((0.0, 1.0), policy_side)]:
        learner.config = learner.config.model_copy(update={"value_coef": coefs[0], "entropy_coef": 0.0})
        learner.zero_grad(set_to_none=True)
        loss, _ = learner.loss(ro, adv if coefs[1] else torch.zeros_like(adv), tgt)
        loss.backward()
        touched = {n for n, p in learner.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        assert touched and touched <= reached, touched - reached


# ------------------------------------------------------------------------------------ learning


@dataclass(frozen=True)
class _EasyBandit(BanditFamily):
    """Two arms, one pays with p = 0.9 and the other with 0.1; which one varies per task."""

    n_arms: int = 2

    def sample_tasks(self, n, generator=None):
        good = torch.randint(0, 2, (n,), generator=generator)
        probs = torch.where(good.unsqueeze(1) == torch.arange(2), 0.9, 0.1).double()
        return [BanditTask(p) for p in probs]


def test_learns_an_easy_bandit_above_random():
    fam = _EasyBandit()
    learner = _learner(fam, seed=0, n_episodes=10, hidden_size=16, meta_batch_size=64, ppo_minibatches=2,
                       ppo_epochs=4, meta_lr=1e-2, entropy_coef=0.01)
    tasks = fam.sample_tasks(400, torch.Generator().manual_seed(9))
    before = float(learner.evaluate(tasks, torch.Generator().manual_seed(1)).sum(1).mean())
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        stats = learner.train_iteration(g)
    after = float(learner.evaluate(tasks, torch.Generator().manual_seed(1)).sum(1).mean())
    # random play earns 5 per trial; identifying the good arm after one or two pulls earns ~8.5
    assert before < 5.6
    assert after > 7.5, (before, after)
    assert {"return", "env_steps", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction",
            "seconds"} <= set(stats)
    assert stats["env_steps"] == 64 * 10


# --------------------------------------------------------------------------- evaluate / state


@pytest.mark.parametrize("mode", ["sample", "greedy"])
def test_evaluate_shape_and_determinism(mode):
    fam = TabularMDPFamily(horizon=4)
    learner = _learner(fam, n_episodes=3, eval_actions=mode)
    tasks = fam.sample_tasks(6, torch.Generator().manual_seed(0))
    a = learner.evaluate(tasks, torch.Generator().manual_seed(4))
    b = learner.evaluate(tasks, torch.Generator().manual_seed(4))
    assert a.shape == (6, 3) and torch.equal(a, b)
    assert learner.eval_points() == ["episode 1", "episode 2", "episode 3"]
    if mode == "sample":
        assert not torch.equal(a, learner.evaluate(tasks, torch.Generator().manual_seed(5)))


def test_navigation_gaussian_policy_runs():
    fam = NavigationFamily(horizon=5)
    learner = _learner(fam, n_episodes=2)
    tasks = fam.sample_tasks(4, torch.Generator().manual_seed(0))
    out = learner.evaluate(tasks, torch.Generator().manual_seed(1))
    assert out.shape == (4, 2) and bool((out < 0).all())
    stats = learner.train_iteration(torch.Generator().manual_seed(2))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert stats["env_steps"] <= 8 * 2 * 5


@pytest.mark.parametrize("variant", [{}, {"cell": "ln-gru", "value_network": "separate"},
                                     {"head_hidden_size": 5, "time_input": True},
                                     {"transition_input": True}])
def test_state_round_trip_reproduces_evaluate_and_training(variant):
    fam = BanditFamily(n_arms=4)
    a = _learner(fam, seed=0, n_episodes=5, **variant)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        a.train_iteration(g)
    model, optim, gstate = copy.deepcopy(a.state_dict()), copy.deepcopy(a.optimizer_state_dict()), g.get_state()
    assert int(model["value_stats_count"]) == 2

    b = _learner(fam, seed=123, n_episodes=5, **variant)  # different initialisation, then loaded
    b.load_state_dict(model)
    b.load_optimizer_state_dict(optim)
    tasks = fam.sample_tasks(20, torch.Generator().manual_seed(7))
    assert torch.equal(a.evaluate(tasks, torch.Generator().manual_seed(3)),
                       b.evaluate(tasks, torch.Generator().manual_seed(3)))
    # resuming continues exactly as the uninterrupted run
    sa = a.train_iteration(g)
    g2 = torch.Generator()
    g2.set_state(gstate)
    sb = b.train_iteration(g2)
    assert sa["return"] == sb["return"] and sa["policy_loss"] == sb["policy_loss"]
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), k


def test_learning_rate_decays_linearly_and_resumes_with_the_schedule():
    fam = BanditFamily(n_arms=3)
    a = _learner(fam, n_episodes=3, meta_lr=1e-2, lr_decay_iterations=4, final_lr_fraction=0.25)
    g = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(3):
        seen.append(a.train_iteration(g)["lr"])
        assert a.optimizer.param_groups[0]["lr"] == seen[-1]
    assert seen == pytest.approx([1e-2, 1e-2 * (1 - 0.75 / 4), 1e-2 * (1 - 1.5 / 4)])
    assert int(a.state_dict()["iterations_done"]) == 3
    # a learner rebuilt from the state continues the schedule where it stopped, then holds the floor
    b = _learner(fam, n_episodes=3, meta_lr=1e-2, lr_decay_iterations=4, final_lr_fraction=0.25)
    b.load_state_dict(a.state_dict())
    assert [b.train_iteration(g)["lr"] for _ in range(3)] == pytest.approx([1e-2 * (1 - 2.25 / 4), 2.5e-3, 2.5e-3])
    # a delayed decay holds meta_lr for lr_decay_start updates first
    d = _learner(fam, n_episodes=3, meta_lr=1e-2, lr_decay_start=2, lr_decay_iterations=2)
    assert [d.train_iteration(g)["lr"] for _ in range(5)] == pytest.approx([1e-2, 1e-2, 1e-2, 5e-3, 0.0])
    # the default is a constant rate
    c = _learner(fam, n_episodes=3, meta_lr=3e-3)
    assert [c.train_iteration(g)["lr"] for _ in range(2)] == [3e-3, 3e-3]


def test_a_new_run_from_kept_weights_starts_its_schedule_at_the_beginning():
    """Weights kept after many updates start a new run (``train.init_from``, ``--init-weights``) with
    the schedule at update 0: continuing the count would start it mid-decay (or at a zero rate)."""
    fam = BanditFamily(n_arms=3)
    a = _learner(fam, n_episodes=3, meta_lr=1e-2, lr_decay_iterations=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        a.train_iteration(g)
    assert a.current_lr() == 0.0
    b = _learner(fam, seed=5, n_episodes=3, meta_lr=1e-2, lr_decay_iterations=2)
    b.load_state_dict(a.state_dict())
    b.start_new_run()
    assert int(b.iterations_done) == 0
    assert [b.train_iteration(g)["lr"] for _ in range(2)] == pytest.approx([1e-2, 5e-3])
    # the weights and the value statistics are those kept
    kept = {k: v for k, v in a.state_dict().items() if k != "iterations_done"}
    c = _learner(fam, seed=5, n_episodes=3)
    c.load_state_dict(a.state_dict())
    c.start_new_run()
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in kept.items())


def test_state_without_the_iteration_counter_still_loads():
    """Checkpoints written before the schedule existed have no ``iterations_done``: they load
    (strictly) and count from zero."""
    fam = BanditFamily(n_arms=3)
    a = _learner(fam, n_episodes=3)
    a.train_iteration(torch.Generator().manual_seed(0))
    old = {k: v for k, v in a.state_dict().items() if k != "iterations_done"}
    b = _learner(fam, seed=5, n_episodes=3)
    b.load_state_dict(old)
    assert int(b.iterations_done) == 0
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in old.items())


# -------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("field, value", [("hidden_size", 0), ("gamma", 1.5), ("gae_lambda", -0.1),
                                          ("ppo_clip", 0.0), ("meta_lr", 0.0), ("n_episodes", 0),
                                          ("eval_actions", "argmax"), ("cell", "lstm"), ("head_hidden_size", -1),
                                          ("value_network", "own")])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        parse_config(RL2Config, {field: value})
    msg = str(err.value)
    assert field in msg and ("--set" in msg or "Choose" in msg)
    with pytest.raises(ConfigError, match=field):
        RL2({field: value}, BanditFamily())


def test_unknown_config_key():
    with pytest.raises(ConfigError, match="hidden_units"):
        RL2({"hidden_units": 3}, BanditFamily())


def test_user_errors_name_problem_and_fix():
    with pytest.raises(ConfigError, match=r"RL2: ppo_minibatches must be <= meta_batch_size \(8\); got 16\. Lower"):
        RL2({"meta_batch_size": 8, "ppo_minibatches": 16}, BanditFamily())

    class Other:
        pass

    with pytest.raises(ConfigError, match=r"RL2: family must be a family with a batched environment \(BanditFamily, "
                                          r"TabularMDPFamily or NavigationFamily\); got 'Other'\. Build"):
        RL2({}, Other())
    learner = _learner(BanditFamily(3), n_episodes=2)
    with pytest.raises(TaskError, match=r"RL2: tasks must be a non-empty list of BanditTask; got .*MDPTask"):
        learner.evaluate(TabularMDPFamily().sample_tasks(2, torch.Generator().manual_seed(0)),
                         torch.Generator().manual_seed(0))
    with pytest.raises(TaskError, match="non-empty list"):
        learner.evaluate([], torch.Generator().manual_seed(0))
