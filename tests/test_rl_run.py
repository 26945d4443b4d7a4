"""The meta-RL training layer (metafit rl train / eval): loop, validation, checkpoints, exact
resume, learning curve, test report and the CLI, driven by a small learner defined here so that
they are tested independently of RL2 and MAML-RL."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
import yaml
from PIL import Image

import metafit
from metafit import CheckpointError, ConfigError
from metafit.cli import main
from metafit.rl.learners import RL_LEARNERS, RLLearner
from metafit.training.rl_run import (_init_from, build_learner, evaluate_rl_checkpoint, load_rl, load_rl_config,
                                     rl_device, train_rl)
from metafit.training.checkpoint import read_checkpoint
from metafit.validation import ConfigModel


class ArmPickerConfig(ConfigModel):
    name: Literal["arm-picker"] = "arm-picker"
    lr: float = 0.1


class ArmPicker(RLLearner):
    """Softmax preferences over arms trained by policy gradient on expected reward; the
    evaluation points are 'before' and 'after' one greedy look at the task's arms."""

    name = "arm-picker"
    Config = ArmPickerConfig

    def __init__(self, config, family):
        super().__init__(config, family)
        self.logits = torch.nn.Parameter(torch.zeros(family.n_arms))
        self.opt = torch.optim.Adam([self.logits], lr=config.lr)

    def train_iteration(self, generator):
        tasks = self.family.sample_tasks(16, generator)
        probs = torch.stack([t.probs for t in tasks])
        noise = torch.rand(probs.shape, generator=generator) * 0.1
        expected = (torch.softmax(self.logits, 0) * (probs + noise)).sum(1).mean()
        self.opt.zero_grad()
        (-expected).backward()
        self.opt.step()
        return {"return": float(expected.detach()), "env_steps": 16}

    def evaluate(self, tasks, generator):
        probs = torch.stack([t.probs for t in tasks])
        before = (torch.softmax(self.logits.detach(), 0) * probs).sum(1)
        return torch.stack([before, probs.max(1).values], 1)

    def eval_points(self):
        return ["0 steps", "1 step"]

    def optimizer_state_dict(self):
        return self.opt.state_dict()

    def load_optimizer_state_dict(self, state):
        self.opt.load_state_dict(state)


def _cfg(tmp_path, name="run", **train):
    t = {"iterations": 6, "eval_every": 2, "save_interval": 2, "eval_tasks": 20, "test_tasks": 30, "progress": False}
    t.update(train)
    return {"seed": 3, "out_dir": str(tmp_path / name), "family": {"name": "bandit", "settings": {"n_arms": 4}},
            "learner": {"name": "arm-picker", "lr": 0.2}, "train": t}


def test_a_finished_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    train_rl(load_rl_config(_cfg(tmp_path, iterations=2)), test=False)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"out_dir must be a new or empty folder; got .*run' holding best.safetensors"):
        train_rl(load_rl_config(_cfg(tmp_path, iterations=2)), test=False)
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(_cfg(tmp_path, iterations=2)))
    assert main(["rl", "train", str(path), "--no-test"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["rl", "train", str(path), "--no-test", "--overwrite"]) == 0
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only what a run writes is deleted
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) > 0


def test_training_keeps_best_and_interval_checkpoints_logs_and_tests(tmp_path):
    report = train_rl(load_rl_config(_cfg(tmp_path)))
    out = tmp_path / "run"
    assert {"best.safetensors", "last.safetensors", "step-0000002.safetensors", "step-0000006.safetensors",
            "metrics.jsonl", "config.json", "report.json", "learning_curve.png"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["iteration"] for r in val] == [2, 4, 6]
    best = max(val, key=lambda r: r["score"])
    assert report["best_iteration"] == best["iteration"] and report["val"]["score"] == pytest.approx(best["score"])
    assert list(report["test"]["points"]) == ["0 steps", "1 step"] and report["test"]["tasks"] == 30
    assert report["env_steps"] == 6 * 16
    Image.open(out / "learning_curve.png").verify()
    # the test report is the best checkpoint on test tasks from eval_seed + 1
    again = evaluate_rl_checkpoint(out / "best.safetensors")
    assert again["score"] == pytest.approx(report["test"]["score"]) and again["seed"] == 2025


def test_resume_is_exact(tmp_path):
    straight = train_rl(load_rl_config(_cfg(tmp_path, "straight")), test=False)
    train_rl(load_rl_config(_cfg(tmp_path, "halves", iterations=3)), test=False)
    resumed = train_rl(load_rl_config(_cfg(tmp_path, "halves")), resume=True, test=False)
    a, b = read_checkpoint(tmp_path / "straight" / "last.safetensors"), read_checkpoint(tmp_path / "halves" / "last.safetensors")
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
    assert straight["best_iteration"] == resumed["best_iteration"]
    lines = (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines if json.loads(x)["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_configs_and_checkpoints_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="family.name|name"):
        load_rl_config({**_cfg(tmp_path), "family": {"name": "chess"}})
    with pytest.raises(ConfigError, match="learner.name must be one of"):
        load_rl_config({**_cfg(tmp_path), "learner": {"name": "alphazero"}})
    with pytest.raises(ConfigError, match="RL config must be a YAML file or a built-in name"):
        load_rl_config("no-such-config")
    with pytest.raises(CheckpointError, match="resume needs"):
        train_rl(load_rl_config(_cfg(tmp_path, "fresh")), resume=True)
    train_rl(load_rl_config(_cfg(tmp_path, iterations=2)), test=False)
    with pytest.raises(CheckpointError, match="meta-RL checkpoint"):
        metafit.load(tmp_path / "run" / "best.safetensors")
    learner = load_rl(tmp_path / "run" / "best.safetensors")
    assert learner.run_config.learner.name == "arm-picker" and not learner.training


def test_cli_rl_train_eval_and_configs(tmp_path, capsys):
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(_cfg(tmp_path)))
    assert main(["rl", "train", str(path), "--set", "train.iterations=4"]) == 0
    out = capsys.readouterr().out
    assert "| 0 steps |" in out and "learning curve" in out
    assert main(["rl", "eval", str(tmp_path / "run" / "best.safetensors"), "--tasks", "12",
                 "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["tasks"] == 12
    assert main(["rl", "configs"]) == 0
    assert main(["rl", "eval", str(tmp_path / "missing.safetensors")]) == 1


def test_device_setting_is_checked_against_the_learner_and_the_machine(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"train.device must be one that learner 'arm-picker' runs on \(cpu\); "
                                          r"got 'cuda'. Use --set train.device=cpu"):
        train_rl(load_rl_config(_cfg(tmp_path, device="cuda")))
    report = train_rl(load_rl_config(_cfg(tmp_path, device="auto", iterations=2)))  # auto: the CPU for this learner
    assert report["test"]["device"] == "cpu"
    assert rl_device("auto", "maml-rl").type == "cpu" and rl_device("cpu", "rl2").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device must be available on this machine; got 'cuda' without"):
            rl_device("cuda", "rl2")
        assert rl_device("auto", "rl2").type == "cpu"
    assert main(["rl", "eval", str(tmp_path / "run" / "best.safetensors"), "--device", "cuda"]) == 1
    assert "evaluation device must be one that learner 'arm-picker' runs on" in capsys.readouterr().err


class SwingerConfig(ConfigModel):
    name: Literal["swinger"] = "swinger"


class Swinger(RLLearner):
    """A parameter that overshoots its target by +/-1 on alternate updates while drifting
    towards it (the score is minus its distance to 1): the kind of swinging that a weight
    average smooths out, so the average must score higher than the live weights."""

    name = "swinger"
    Config = SwingerConfig

    def __init__(self, config, family):
        super().__init__(config, family)
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def train_iteration(self, generator):
        self.updates += 1
        t = int(self.updates)
        with torch.no_grad():
            self.w.copy_(1.0 - 0.5 ** t + (-1.0) ** t)
        return {"return": float(-abs(self.w.detach() - 1.0)), "env_steps": 1}

    def evaluate(self, tasks, generator):
        return torch.full((len(tasks), 1), -abs(float(self.w.detach()) - 1.0))

    def eval_points(self):
        return ["trial"]

    def optimizer_state_dict(self):
        return {"state": {}, "param_groups": []}

    def load_optimizer_state_dict(self, state):
        pass


def _swinger(tmp_path, name, **train):
    cfg = _cfg(tmp_path, name, save_interval=1, **train)
    cfg["learner"] = {"name": "swinger"}
    return load_rl_config(cfg)


def test_weight_average_is_scored_kept_when_better_and_leaves_training_unchanged(tmp_path):
    decay = 0.6
    plain = train_rl(_swinger(tmp_path, "plain"))
    avg = train_rl(_swinger(tmp_path, "avg", weight_average=decay))
    # the average is an exponential moving average of the live weights after each update
    live = [float(read_checkpoint(tmp_path / "avg" / f"step-{i:07d}.safetensors")[1]["model.w"]) for i in range(1, 7)]
    expected = [live[0]]
    for w in live[1:]:
        expected.append(decay * expected[-1] + (1 - decay) * w)
    _, last = read_checkpoint(tmp_path / "avg" / "last.safetensors")
    assert float(last["average.w"]) == pytest.approx(expected[-1]) and int(last["average.n_averaged"]) == 6
    # scoring the average leaves the live weights (and so training) exactly as without it
    _, last_plain = read_checkpoint(tmp_path / "plain" / "last.safetensors")
    for k in ("model.w", "model.updates"):
        assert torch.equal(last[k], last_plain[k]), k
    rows = [json.loads(x) for x in (tmp_path / "avg" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["score_average"] for r in val] == pytest.approx([-abs(expected[i - 1] - 1) for i in (2, 4, 6)])
    assert [r["score"] for r in val] == pytest.approx([-abs(live[i - 1] - 1) for i in (2, 4, 6)])
    # the average scored higher, so best.safetensors holds it (with the live buffers) and says so
    best_i = max(val, key=lambda r: r["score_average"])["iteration"]
    assert avg["best_weights"] == "average" and avg["best_iteration"] == best_i and plain["best_weights"] == "live"
    assert avg["val"]["score"] > plain["val"]["score"]
    meta, best = read_checkpoint(tmp_path / "avg" / "best.safetensors")
    assert float(best["model.w"]) == pytest.approx(expected[best_i - 1]) and int(best["model.updates"]) == best_i
    assert meta["metrics"]["weights"] == "average"
    assert avg["test"]["score"] == pytest.approx(-abs(expected[best_i - 1] - 1))


def test_weight_average_resumes_exactly_and_needs_a_run_that_kept_one(tmp_path):
    train_rl(_swinger(tmp_path, "straight", weight_average=0.9), test=False)
    train_rl(_swinger(tmp_path, "halves", weight_average=0.9, iterations=3), test=False)
    resumed = train_rl(_swinger(tmp_path, "halves", weight_average=0.9), resume=True, test=False)
    a = read_checkpoint(tmp_path / "straight" / "last.safetensors")
    b = read_checkpoint(tmp_path / "halves" / "last.safetensors")
    assert set(a[1]) == set(b[1]) and "average.w" in a[1]
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
    assert resumed["best_weights"] == a[0]["train_state"]["run"]["best_weights"]  # the learner kind's part
    train_rl(_swinger(tmp_path, "without", iterations=3), test=False)
    with pytest.raises(CheckpointError, match="resume with train.weight_average needs the average"):
        train_rl(_swinger(tmp_path, "without", weight_average=0.9), resume=True, test=False)
    with pytest.raises(ConfigError, match="weight_average"):
        _swinger(tmp_path, "bad", weight_average=1.0)


@pytest.fixture(autouse=True)
def _toy_learners(monkeypatch):
    """The toy learners of this module, registered for each test the way a new learner is: one line
    in the registry dict."""
    monkeypatch.setitem(RL_LEARNERS, ArmPicker.name, ArmPicker)
    monkeypatch.setitem(RL_LEARNERS, Swinger.name, Swinger)


def test_builtin_rl_configs_validate_and_the_real_learners_run_through_the_cli(tmp_path, capsys):
    from metafit.training.rl_run import builtin_rl_configs

    names = builtin_rl_configs()
    assert {"rl2_bandit_k5_n10", "rl2_mdp_n10", "maml_rl_navigation", "maml_rl_cheetah_vel"} <= set(names)
    for name in names:
        assert load_rl_config(name).learner.name in ("rl2", "maml-rl")
    tiny = ["train.iterations=2", "train.eval_every=1", "train.save_interval=2", "train.eval_tasks=4",
            "train.test_tasks=4", "train.progress=false", "train.tensorboard=false"]
    assert main(["rl", "train", "rl2_bandit_k5_n10", "--out-dir", str(tmp_path / "rl2"),
                 "--set", "learner.meta_batch_size=8", "--set", "learner.hidden_size=8", *sum((["--set", s] for s in tiny), [])]) == 0
    assert main(["rl", "train", "maml_rl_navigation", "--out-dir", str(tmp_path / "maml"),
                 "--set", "learner.meta_batch_size=2", "--set", "learner.trajectories_per_task=2",
                 "--set", "learner.inner_steps=1", "--set", "learner.eval_steps=1",
                 *sum((["--set", s] for s in tiny), [])]) == 0
    out = capsys.readouterr().out
    assert "| episode 10 |" in out and "| 1 step |" in out
    rl2 = json.loads((tmp_path / "rl2" / "report.json").read_text())
    assert rl2["test"]["score"] == pytest.approx(sum(v["mean"] for v in rl2["test"]["points"].values()), rel=1e-6)


def test_builtin_curricula_start_from_a_network_of_the_same_shape():
    """A built-in config whose ``train.init_from`` names another built-in config's best checkpoint
    (rl2_mdp_n25 from rl2_mdp_n10) builds a network of the same shapes, so the curriculum the
    config comments describe loads (the network options of the two must change together)."""
    from pathlib import Path

    from metafit.training.rl_run import builtin_rl_configs

    configs = {name: load_rl_config(name) for name in builtin_rl_configs()}
    by_best = {str(Path(c.out_dir) / "best.safetensors"): name for name, c in configs.items()}
    pairs = [(by_best[c.train.init_from], name) for name, c in configs.items() if c.train.init_from in by_best]
    assert ("rl2_mdp_n10", "rl2_mdp_n25") in pairs
    for source, target in pairs:
        shapes = [{k: tuple(v.shape) for k, v in build_learner(configs[n]).state_dict().items()} for n in (source, target)]
        assert shapes[0] == shapes[1], (source, target)


def test_init_from_starts_a_run_from_another_runs_weights_with_a_longer_trial(tmp_path):
    tiny = {"iterations": 1, "eval_every": 1, "save_interval": 1, "eval_tasks": 4, "test_tasks": 4,
            "progress": False, "tensorboard": False}
    learner = {"name": "rl2", "n_episodes": 2, "meta_batch_size": 4, "hidden_size": 8, "head_hidden_size": 4}
    first = {"seed": 0, "out_dir": str(tmp_path / "short"), "family": {"name": "tabular-mdp"},
             "learner": learner, "train": tiny}
    train_rl(load_rl_config(first), test=False)
    src = tmp_path / "short" / "best.safetensors"
    longer = {**first, "out_dir": str(tmp_path / "long"), "learner": {**learner, "n_episodes": 5},
              "train": {**tiny, "iterations": 1, "init_from": str(src)}}
    config = load_rl_config(longer)
    started = build_learner(config)  # the starting point is exactly the kept weights
    _init_from(started, str(src), config)
    kept = load_rl(src)
    for (k, a), (_, b) in zip(started.state_dict().items(), kept.state_dict().items()):
        if k != "iterations_done":
            assert torch.equal(a, b), k
    # a new run: its learning-rate schedule counts from its own first update
    assert int(kept.iterations_done) >= 1 and int(started.iterations_done) == 0
    report = train_rl(config, test=False)
    assert report["init_from"] == str(src) and report["iterations"] == 1
    assert list(load_rl(tmp_path / "long" / "best.safetensors").eval_points())[-1] == "episode 5"

    with pytest.raises(CheckpointError, match="no such file.*Train the run it comes from first"):
        train_rl(load_rl_config({**longer, "train": {**tiny, "init_from": str(tmp_path / "nope.safetensors")}}),
                 overwrite=True)
    with pytest.raises(CheckpointError, match=r"same network.*'hidden_size': \(8, 16\)"):
        train_rl(load_rl_config({**longer, "learner": {**learner, "hidden_size": 16},
                                 "train": {**tiny, "init_from": str(src)}}), overwrite=True)
    with pytest.raises(ConfigError, match="unknown key 'train.init_widen'"):  # a research knob that left
        load_rl_config({**longer, "train": {**tiny, "init_from": str(src), "init_widen": True}})
    train_rl(load_rl_config(_cfg(tmp_path, "picker", iterations=2)), test=False)
    with pytest.raises(CheckpointError, match="of learner 'rl2'.*'arm-picker'"):
        train_rl(load_rl_config({**longer, "train": {**tiny, "init_from": str(tmp_path / "picker" / "best.safetensors")}}),
                 overwrite=True)
