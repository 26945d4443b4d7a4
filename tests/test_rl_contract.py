"""The contract every registered meta-RL learner and environment family meets, parametrised over
the registries (:data:`metafit.rl.RL_LEARNERS`, :data:`metafit.rl.FAMILIES`): a learner or family
added with one module and one registry line is covered here without further edits."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import pytest
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from metafit.errors import ConfigError
from metafit.rl import FAMILIES, RL_LEARNERS, RLLearner, make_family
from metafit.rl.envs import BatchedFamily, Family
from metafit.rl.envs._common import check_int, check_positive, make_generator, stack_tasks
from metafit.training.rl_run import build_learner, load_rl_config, train_rl
from metafit.validation import ConfigModel
from test_contract import _invalid_values

# settings that make any learner small enough for a contract test, applied to the fields a
# learner's config has (anything else stays at its default)
SMALL = {"meta_batch_size": 4, "ppo_minibatches": 2, "ppo_epochs": 2, "hidden_size": 8, "hidden": [8],
         "n_episodes": 3, "trajectories_per_task": 2, "inner_steps": 1, "eval_steps": 1}
# family settings that keep episodes short (where a family has the field)
SHORT = {"horizon": 5}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_config(name: str) -> dict:
    cls = RL_LEARNERS[name].Config
    return {"name": name, **{k: v for k, v in SMALL.items() if k in cls.model_fields}}


def small_family(name: str) -> Family:
    cls = FAMILIES[name]
    return cls(**{k: v for k, v in SHORT.items() if k in {f.name for f in fields(cls)}})


def accepts(learner: str, family: str) -> bool:
    """Whether a learner runs on a family with a batched environment (it refuses the others with a
    ConfigError naming the family)."""
    fam = FAMILIES[family]()
    if not isinstance(fam, BatchedFamily):
        return False
    try:
        RL_LEARNERS[learner](small_config(learner), fam)
    except ConfigError:
        return False
    return True


def learner_family_pairs() -> list[tuple[str, str]]:
    return [(lrn, fam) for lrn in sorted(RL_LEARNERS) for fam in sorted(FAMILIES) if accepts(lrn, fam)]


def build(learner: str, family: str, seed: int = 0) -> RLLearner:
    torch.manual_seed(seed)
    return RL_LEARNERS[learner](small_config(learner), small_family(family))


def same(a, b) -> bool:
    """Tasks (dataclasses of tensors and numbers) equal field by field."""
    return type(a) is type(b) and all(
        torch.equal(torch.as_tensor(getattr(a, f.name)), torch.as_tensor(getattr(b, f.name))) for f in fields(a))


# -------------------------------------------------------------------------- the learner contract


def check_learner(learner: str, family: str, tmp_path) -> None:
    """Builds from defaults (its config section alone), evaluates with the right shape, takes a
    seeded training step deterministically and round-trips its weights through safetensors."""
    assert load_rl_config({"learner": {"name": learner}}).learner.name == learner
    model = build(learner, family)
    tasks = model.family.sample_tasks(3, gen(1))
    points = model.eval_points()
    out = model.evaluate(tasks, gen(2))
    assert out.shape == (3, len(points)) and bool(torch.isfinite(out).all())
    assert torch.equal(model.evaluate(tasks, gen(2)), out)  # evaluation is seeded and leaves no trace

    a, b = build(learner, family), build(learner, family)
    stats_a, stats_b = a.train_iteration(gen(3)), b.train_iteration(gen(3))
    assert {"return", "env_steps"} <= set(stats_a) and all(math.isfinite(v) for v in stats_a.values())
    assert {k: v for k, v in stats_a.items() if "seconds" not in k and k != "env_steps_per_s"} == \
        {k: v for k, v in stats_b.items() if "seconds" not in k and k != "env_steps_per_s"}
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k

    path = tmp_path / f"{learner}-{family}.safetensors"
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(path))
    c = build(learner, family, seed=7)
    c.load_state_dict(load_file(str(path)))
    a.eval(), c.eval()
    assert torch.equal(c.evaluate(tasks, gen(4)), a.evaluate(tasks, gen(4)))


def check_learner_config_errors(learner: str) -> None:
    """Every value outside a config field's declared constraint is refused in one line naming it."""
    checked = 0
    for field_name, field in RL_LEARNERS[learner].Config.model_fields.items():
        for bad in _invalid_values(field):
            with pytest.raises(ConfigError) as err:
                load_rl_config({"learner": {"name": learner, field_name: bad}})
            assert f"learner.{field_name}" in str(err.value) and "\n" not in str(err.value), (field_name, bad)
            checked += 1
    with pytest.raises(ConfigError, match="unknown key 'learner.no_such_field'"):
        load_rl_config({"learner": {"name": learner, "no_such_field": 1}})
    assert checked >= 1


@pytest.mark.parametrize("learner, family", learner_family_pairs())
def test_learner_contract(learner, family, tmp_path):
    check_learner(learner, family, tmp_path)


@pytest.mark.parametrize("learner", sorted(RL_LEARNERS))
def test_learner_runs_on_some_family_and_refuses_invalid_config_values(learner):
    assert any(lrn == learner for lrn, _ in learner_family_pairs()), learner
    check_learner_config_errors(learner)


# --------------------------------------------------------------------------- the family contract


def _invalid_settings(annotation: str) -> list:
    """Values no family field of this type accepts (ints have a minimum of 0 or more; floats are
    finite; ranges are increasing pairs)."""
    if annotation == "int":
        return [-1, True, "x"]
    if annotation == "float":
        return [math.nan, math.inf, "x"]
    if annotation.startswith("tuple"):
        return [(2.0, 1.0), (1.0,), "x"]
    raise AssertionError(f"no invalid values for a family field of type {annotation}")


def _random_actions(fam: Family, n: int, g: torch.Generator) -> torch.Tensor:
    if fam.discrete_actions:
        return torch.randint(0, fam.action_size, (n,), generator=g)
    return (2 * torch.rand(n, fam.action_size, generator=g) - 1) * fam.action_bound


def check_family(name: str) -> None:
    """Builds from defaults, samples tasks reproducibly, and (where it has one) steps a batched
    environment with the declared shapes, reproducibly from its seed."""
    fam = FAMILIES[name]()
    assert isinstance(fam, Family) and make_family(name) == fam
    tasks = fam.sample_tasks(4, gen(0))
    assert len(tasks) == 4 and all(isinstance(t, fam.task_type) for t in tasks)
    assert all(same(a, b) for a, b in zip(tasks, fam.sample_tasks(4, gen(0))))
    assert not all(same(a, b) for a, b in zip(tasks, fam.sample_tasks(4, gen(1))))
    assert fam.observation_size >= 1 and fam.action_size >= 1 and fam.horizon >= 1 and fam.action_bound > 0
    if not isinstance(fam, BatchedFamily):
        return
    runs = []
    for _ in range(2):
        env = fam.batched(tasks[:3], 2, seed=5)
        obs = env.reset()
        n = env.num_envs
        assert n == 6 and obs.shape == ((n,) if fam.discrete_observations else (n, fam.observation_size))
        g, rewards = gen(6), []
        for _ in range(3):
            obs, reward, terminated, truncated, info = env.step(_random_actions(fam, n, g))
            assert obs.shape[0] == n and reward.shape == (n,) and terminated.shape == truncated.shape == (n,)
            assert terminated.dtype == truncated.dtype == torch.bool and env.episode_count.shape == (n,)
            rewards.append(reward)
        runs.append(torch.stack(rewards))
    assert torch.equal(runs[0], runs[1])


def check_family_config_errors(name: str) -> None:
    cls, checked = FAMILIES[name], 0
    for f in fields(cls):
        for bad in _invalid_settings(str(f.type)):
            with pytest.raises(ConfigError) as err:
                make_family(name, **{f.name: bad})
            assert f.name in str(err.value) and "\n" not in str(err.value), (f.name, bad)
            checked += 1
    assert checked >= 1 or not fields(cls)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_contract(name):
    check_family(name)
    check_family_config_errors(name)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_gym_env(name):
    """The single-task Gymnasium environment has the family's sizes and plays a few steps."""
    pytest.importorskip("gymnasium")
    if name.startswith("halfcheetah"):
        pytest.importorskip("mujoco")
    fam = FAMILIES[name]()
    task = fam.sample_tasks(1, gen(0))[0]
    env = fam.make_env(task)
    try:
        obs_space, act_space = env.observation_space, env.action_space
        if fam.discrete_observations:
            assert obs_space.n == fam.observation_size
        else:
            assert obs_space.shape == (fam.observation_size,)
        if fam.discrete_actions:
            assert act_space.n == fam.action_size
        else:
            assert act_space.shape == (fam.action_size,) and float(act_space.high.max()) == pytest.approx(fam.action_bound)
        env.reset(seed=0)
        act_space.seed(0)
        for _ in range(3):
            _, reward, terminated, truncated, _ = env.step(act_space.sample())
            assert math.isfinite(reward)
            if terminated or truncated:
                env.reset()
        assert env.get_task() is task
    finally:
        env.close()


def test_rl_rooms_are_layers():
    """tests/test_layers.py resolves metafit.rl.<room> imports to the room, so that the rooms' order
    (envs below baselines and learners) is enforced."""
    from test_layers import _allowed, _room

    assert _room(["rl", "envs", "bandits"]) == "rl.envs" and _room(["rl"]) == "rl"
    assert "rl.learners" not in _allowed("rl.envs") and "rl.baselines" not in _allowed("rl.learners")
    assert {"rl.envs", "rl.learners", "rl.baselines"} <= _allowed("training")


# ------------------------------------------------- a new learner and family: one class, one line each


@dataclass(frozen=True)
class CoinTask:
    bias: torch.Tensor  # [k] probabilities that each coin shows heads (reward 1)


class BatchedCoins:
    """Flip one of ``k`` biased coins per environment; every flip is a one-step episode."""

    def __init__(self, tasks, envs_per_task: int = 1, *, seed=None, device="cpu", check_actions=True) -> None:
        self.envs_per_task, self.generator = envs_per_task, make_generator(seed)
        self.set_tasks(tasks)

    def set_tasks(self, tasks) -> None:
        bias = stack_tasks("BatchedCoins", tasks, CoinTask, {"bias": 1})["bias"].float()
        self.bias = bias.repeat_interleave(self.envs_per_task, 0)
        self.num_envs = self.bias.shape[0]
        self.episode_count = torch.zeros(self.num_envs, dtype=torch.long)

    def reset(self) -> torch.Tensor:
        self.episode_count.zero_()
        return torch.zeros(self.num_envs, dtype=torch.long)

    def step(self, actions):
        p = self.bias.gather(1, torch.as_tensor(actions).view(-1, 1)).squeeze(1)
        reward = (torch.rand(self.num_envs, generator=self.generator) < p).float()
        self.episode_count += 1
        obs, done = torch.zeros(self.num_envs, dtype=torch.long), torch.ones(self.num_envs, dtype=torch.bool)
        return obs, reward, done, ~done, {"final_obs": obs}


@dataclass(frozen=True)
class CoinFamily:
    """``n_coins`` coins with biases ``U[0, max_bias]``."""

    n_coins: int = 3
    max_bias: float = 0.8

    task_type = CoinTask
    discrete_observations = discrete_actions = True
    observation_size, action_bound, horizon = 1, 1.0, 1

    def __post_init__(self) -> None:
        check_int("CoinFamily", "n_coins", self.n_coins, 2)
        check_positive("CoinFamily", "max_bias", self.max_bias)

    @property
    def action_size(self) -> int:
        return self.n_coins

    def sample_tasks(self, n, generator=None):
        return [CoinTask(b) for b in torch.rand(n, self.n_coins, generator=generator) * self.max_bias]

    def batched(self, tasks, envs_per_task=1, *, seed=None, device="cpu", check_actions=True):
        return BatchedCoins(tasks, envs_per_task, seed=seed)

    def make_env(self, task=None):
        raise NotImplementedError("the toy family has no Gymnasium environment")


class GreedyConfig(ConfigModel):
    name: Literal["greedy"] = "greedy"
    meta_lr: float = Field(0.1, gt=0.0, description="step size of the action preferences")
    meta_batch_size: int = Field(8, ge=1, description="tasks per update")


class Greedy(RLLearner):
    """Action preferences trained by REINFORCE on one-step episodes of a batched environment."""

    name = "greedy"
    Config = GreedyConfig

    def __init__(self, config, family) -> None:
        super().__init__(config, family)
        self.prefs = torch.nn.Parameter(torch.zeros(family.action_size))

    def train_iteration(self, generator):
        tasks = self.family.sample_tasks(self.config.meta_batch_size, generator)
        env = self.family.batched(tasks, 1, seed=int(torch.randint(0, 2**31, (1,), generator=generator)))
        env.reset()
        dist = torch.distributions.Categorical(logits=self.prefs.expand(env.num_envs, -1))
        actions = torch.multinomial(dist.probs, 1, generator=generator).squeeze(1)  # seeded: the contract checks
        _, reward, *_ = env.step(actions)
        grad, = torch.autograd.grad((dist.log_prob(actions) * reward).mean(), self.prefs)
        with torch.no_grad():
            self.prefs += self.config.meta_lr * grad
        return {"return": float(reward.mean()), "env_steps": float(env.num_envs)}

    def evaluate(self, tasks, generator):
        env = self.family.batched(tasks, 1, seed=int(torch.randint(0, 2**31, (1,), generator=generator)))
        env.reset()
        _, reward, *_ = env.step(self.prefs.detach().argmax().expand(env.num_envs))
        return reward.view(-1, 1)

    def eval_points(self):
        return ["1 flip"]


def test_a_new_learner_and_family_are_picked_up_from_one_registry_line_each(monkeypatch, tmp_path):
    monkeypatch.setitem(FAMILIES, "coins", CoinFamily)
    monkeypatch.setitem(RL_LEARNERS, Greedy.name, Greedy)
    assert ("greedy", "coins") in learner_family_pairs() and ("rl2", "coins") in learner_family_pairs()
    check_family("coins")
    check_family_config_errors("coins")
    check_learner("greedy", "coins", tmp_path)
    check_learner("rl2", "coins", tmp_path)  # RL2 reads the family through the protocol only
    check_learner_config_errors("greedy")
    config = load_rl_config({"out_dir": str(tmp_path / "run"), "family": {"name": "coins", "settings": {"n_coins": 4}},
                             "learner": {"name": "greedy"}},
                            ["train.iterations=2", "train.eval_every=1", "train.eval_tasks=4", "train.test_tasks=4",
                             "train.progress=false", "train.tensorboard=false"])
    assert isinstance(build_learner(config), Greedy) and build_learner(config).family == CoinFamily(n_coins=4)
    report = train_rl(config)
    assert report["iterations"] == 2 and report["test"]["points"].keys() == {"1 flip"}
    with pytest.raises(ConfigError, match="family.name"):
        load_rl_config({"family": {"name": "dice"}})
