"""benchmarks/rl2.py on the CPU with tiny settings: it trains through metafit rl train, kept weights
re-score (the manifest's commands to the recorded figure), start a curriculum, and are refused where
they do not fit; runs are recorded and merged; the diagnostics score kept weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = "--val-every 2 --val-instances 16 --instances 16 --set meta_batch_size=8 --set hidden_size=8"
MANIFEST = REPO / "benchmarks" / "results" / "weights" / "MANIFEST.json"


def _rl2(args: list[str], check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "rl2.py"), *args], cwd=cwd, check=check,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))


def _bench_module(name: str = "rl2"):
    """A script of benchmarks/ imported as a module."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_the_manifest_rescore_command_reproduces_the_recorded_figure(tmp_path):
    """The re-score command of the MDP n=10 weights (the fastest; the others are the same code path),
    as MANIFEST.json writes it, gives the recorded figures to the last digit."""
    entry = next(f for f in json.loads(MANIFEST.read_text())["files"] if f["setting"] == "mdp-n10")
    cmd = entry["rescore"]["command"].replace("/tmp/rescore.json", str(tmp_path / "r.json")).split()
    assert cmd[:2] == ["python", "benchmarks/rl2.py"]
    _rl2(cmd[2:])
    scored = json.loads((tmp_path / "r.json").read_text())["settings"]["mdp-n10"]
    assert f"{scored['eval']['mean']:.2f} +/- {scored['eval']['ci95']:.2f}" == entry["headline"]["test_sampled"]
    assert f"{scored['eval_greedy']['mean']:.2f} +/- {scored['eval_greedy']['ci95']:.2f}" == entry["headline"]["test_greedy"]
    recorded = json.loads((REPO / "benchmarks" / "results" / "rl2.json").read_text())["settings"]["mdp-n10"]
    assert scored["eval"]["mean"] == recorded["eval"]["mean"] and scored["iterations"] == 0


def test_a_run_goes_through_metafit_rl_train_and_its_kept_weights_rescore(tmp_path):
    """--save-weights keeps the run's best checkpoint (a metafit rl checkpoint); --iterations 0
    only evaluates it, on the same instances, to the same validation score and figure."""
    first, again, weights = tmp_path / "first.json", tmp_path / "again.json", tmp_path / "bandit.safetensors"
    _rl2(["--settings", "bandit-n10-k5", "--iterations", "3", *TINY.split(), "--ema", "0.9", "--save-weights",
          str(weights), "--run-dir", str(tmp_path / "runs"), "--out", str(first)])
    kept = json.loads(first.read_text())["settings"]["bandit-n10-k5"]
    run = kept["run_config"]
    assert run["train"]["weight_average"] == 0.9 and run["train"]["eval_seed"] == 2000 + 31 * 5 and run["seed"] == 0
    assert kept["iterations"] == 3 and [v["iteration"] for v in kept["validation_curve"]] == [2, 3]
    assert (tmp_path / "runs" / "bandit-n10-k5" / "metrics.jsonl").is_file()  # the run's own folder
    from metafit.training.rl_run import load_rl

    assert load_rl(weights).run_config.learner.hidden_size == 8
    _rl2(["--settings", "bandit-n10-k5", "--iterations", "0", "--init-weights", str(weights), *TINY.split(),
          "--out", str(again)])
    scored = json.loads(again.read_text())["settings"]["bandit-n10-k5"]
    assert scored["iterations"] == 0 and "--iterations 0" in scored["command"]
    assert "--val-instances 16 --instances 16" in scored["command"]  # the command reproduces the run
    assert scored["best_val_return"] == pytest.approx(kept["best_val_return"], abs=1e-4)  # same weights, instances
    assert scored["eval"] == kept["eval"]


def test_weights_kept_at_one_trial_length_start_another_of_the_same_family(tmp_path):
    weights, out = tmp_path / "mdp10.safetensors", tmp_path / "r.json"
    runs = ["--run-dir", str(tmp_path / "runs")]
    _rl2(["--settings", "mdp-n10", "--iterations", "1", *TINY.split(), "--save-weights", str(weights), *runs,
          "--out", str(out)])
    _rl2(["--settings", "mdp-n25", "--iterations", "1", "--init-weights", str(weights), *TINY.split(), *runs,
          "--out", str(out)])
    settings = json.loads(out.read_text())["settings"]
    assert settings["mdp-n25"]["init_weights_setting"] == "mdp-n10" and settings["mdp-n10"]["init_weights_setting"] is None
    assert settings["mdp-n25"]["run_config"]["train"]["init_from"] == str(weights)
    assert settings["mdp-n25"]["config"]["n_episodes"] == 25

    # another family's weights, the same family's with other network options, and the weights files of
    # the earlier script (re-scored only): refused, saying what to pass
    wrong = _rl2(["--settings", "bandit-n10-k5", "--iterations", "0", "--init-weights", str(weights),
                  *TINY.split(), "--out", str(out)], check=False)
    assert wrong.returncode != 0 and "same observations and actions (bandit-n10-k5, bandit-n100-k5)" in wrong.stderr
    shape = _rl2(["--settings", "mdp-n25", "--iterations", "0", "--init-weights", str(weights), *TINY.split(),
                  "--set", "hidden_size=16", "--out", str(out)], check=False)
    assert shape.returncode != 0 and "Pass the same --set options" in shape.stderr and "'hidden_size': 16" in shape.stderr
    old = REPO / "benchmarks" / "results" / "weights" / "rl2_mdp-n10_transition_head64.safetensors"
    legacy = _rl2(["--settings", "mdp-n25", "--iterations", "1", "--init-weights", str(old), *TINY.split(), *runs,
                   "--set", "hidden_size=64", "--set", "transition_input=true", "--set", "head_hidden_size=64",
                   "--out", str(out)], check=False)
    assert legacy.returncode != 0 and "can be re-scored (--iterations 0)" in legacy.stderr


def test_the_manifest_regeneration_commands_are_runnable_configs(monkeypatch):
    """Every regeneration step of MANIFEST.json parses and builds a valid metafit rl train config
    (what it would train; nothing is trained here), and keeps the command it was recorded with."""
    import shlex

    from metafit.training.rl_run import load_rl_config

    bench = _bench_module()
    steps = [s for f in json.loads(MANIFEST.read_text())["files"] for s in f["regenerate"]["steps"]]
    for step in steps:
        monkeypatch.setattr(sys, "argv", shlex.split(step["command"])[1:])
        args = bench.parse_args()
        cfg = bench.run_config(args.names[0], args, args.overrides, Path("unused"), args.minutes)
        config = load_rl_config({**cfg, "train": {**cfg["train"], "init_from": None}})
        assert config.learner.n_episodes == bench.SETTINGS[args.names[0]][1]
        assert step["recorded_command"].startswith("python benchmarks/rl2.py") and step["command_differs"]
    assert len(steps) >= 4


def test_iterations_zero_needs_weights_to_rescore(tmp_path):
    proc = _rl2(["--settings", "mdp-n10", "--iterations", "0", "--out", str(tmp_path / "r.json")], check=False)
    assert proc.returncode == 2 and "pass --init-weights PATH" in proc.stderr


def test_bandit_diagnostics_compare_kept_weights_with_gittins_on_the_same_instances(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import rl2_bandit_diagnostics as diag
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    import torch

    # two trials of four pulls in 3-armed tasks: statistics by hand
    probs = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.3, 0.8]], dtype=torch.float64)
    actions = torch.tensor([[1, 0], [0, 2], [0, 2], [2, 2]])
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    d = diag.describe(actions, rewards, probs)
    assert d["reward"].tolist() == [2.0, 3.0] and d["arms_tried"].tolist() == [3.0, 2.0]
    assert d["expected"].tolist() == pytest.approx([0.5 + 0.9 + 0.9 + 0.1, 0.2 + 0.8 * 3])
    assert (d["regret_early"] + d["regret_late"]).tolist() == pytest.approx([0.4 + 0.8, 0.6])

    weights, out = tmp_path / "w.safetensors", tmp_path / "diag.json"
    _rl2(["--settings", "bandit-n10-k5", "--iterations", "1", *TINY.split(), "--save-weights", str(weights),
          "--run-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "r.json")])
    proc = subprocess.run([sys.executable, "benchmarks/rl2_bandit_diagnostics.py", "--weights",
                           f"bandit-n10-k5={weights}", "--seeds", "2", "--out", str(out)], cwd=REPO, check=True,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert "gittins" in proc.stdout
    report = json.loads(out.read_text())
    assert report["seeds"] == 2 and "--seeds 2" in report["command"]
    test = report["settings"]["bandit-n10-k5"]["instances"]["test"]
    assert test["count"] == 1000
    rows = test["agents"]
    for r in rows.values():
        assert 1.0 <= r["arms_tried"] <= 5.0 and 0.0 <= r["last20_p"] <= 1.0
        assert abs(r["reward"] - r["expected"]) < 4 * r["reward_ci95_one_seed"]  # one estimate of one mean
    # Bayes-optimal play beats an agent trained for one tiny update
    assert rows["gittins"]["expected"] > rows["rl2_sampled"]["expected"]
    bad = subprocess.run([sys.executable, "benchmarks/rl2_bandit_diagnostics.py", "--weights", f"mdp-n10={weights}"],
                         cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert bad.returncode != 0 and "a bandit setting of benchmarks/rl2.py" in bad.stderr


def _entry(tag: str, points: int = 10, **extra) -> dict:
    curve = [[i + 1, float(i)] for i in range(points)]
    return {"config": {"tag": tag}, "eval": {"mean": 1.0, "ci95": 0.1}, "best_val_return": 1.0,
            "learning_curve_stride": 1, "learning_curve": curve,
            "training_stats_curve": [[i + 1, 0.5, 0.01, 4] for i in range(points)],
            "validation_curve": [{"iteration": 0, "val_return": 1.0}], **extra}


def test_record_keeps_every_earlier_run_of_a_setting():
    bench = _bench_module("rl2_record")
    results = {"mdp-n25": {**_entry("old main", points=1000), "variant_a": _entry("a")}}
    # a new main entry: the old main run and its variants stay, the old run's curves thinned
    assert bench.record(results, "mdp-n25", _entry("new main")) == "mdp-n25"
    main = results["mdp-n25"]
    assert main["config"] == {"tag": "new main"} and main["variant_a"]["config"] == {"tag": "a"}
    prev = main["previous_run"]
    assert prev["config"] == {"tag": "old main"} and "variant_a" not in prev
    assert len(prev["learning_curve"]) <= bench.VARIANT_CURVE_POINTS + 1
    assert prev["learning_curve_stride"] == 4 and prev["learning_curve"][1] == [5, 4.0]
    assert prev["learning_curve"][-1] == [1000, 999.0]  # the last update stays
    assert len(prev["training_stats_curve"]) == len(prev["learning_curve"])
    assert prev["validation_curve"] == [{"iteration": 0, "val_return": 1.0}]
    # again: the next free name, or the one asked for
    bench.record(results, "mdp-n25", _entry("third"))
    assert results["mdp-n25"]["previous_run_2"]["config"] == {"tag": "new main"}
    bench.record(results, "mdp-n25", _entry("fourth"), previous_as="variant_third")
    assert set(results["mdp-n25"]) >= {"variant_a", "previous_run", "previous_run_2", "variant_third"}
    # a variant leaves the main entry as it is; a name in use is refused, naming the fix
    assert bench.record(results, "mdp-n25", _entry("v", points=600), variant="variant_v") == "variant_v"
    assert results["mdp-n25"]["config"] == {"tag": "fourth"}
    assert results["mdp-n25"]["variant_v"]["learning_curve_stride"] == 3
    with pytest.raises(ValueError, match="'variant_v' is taken. Choose another name"):
        bench.record(results, "mdp-n25", _entry("w"), variant="variant_v")
    with pytest.raises(ValueError, match="'eval' is taken"):
        bench.record(results, "mdp-n25", _entry("w"), variant="eval")
    with pytest.raises(ValueError, match="has no main entry"):
        bench.record(results, "mdp-n10", _entry("w"), variant="variant_w")
    # a first run of a setting simply becomes its entry
    bench.record(results, "mdp-n10", _entry("first"))
    assert results["mdp-n10"]["config"] == {"tag": "first"} and "previous_run" not in results["mdp-n10"]


def test_merge_files_a_run_from_another_file_and_refuses_a_taken_name(tmp_path):
    src, out = tmp_path / "run.json", tmp_path / "rl2.json"
    src.write_text(json.dumps({"benchmark": "rl2", "settings": {"mdp-n25": _entry("run", points=400)}}))
    out.write_text(json.dumps({"benchmark": "rl2", "settings": {"mdp-n25": _entry("main")}}))
    proc = _rl2(["--settings", "mdp-n25", "--merge", str(src), "--variant", "variant_run", "--out", str(out)])
    assert "recorded as variant variant_run" in proc.stdout
    entry = json.loads(out.read_text())["settings"]["mdp-n25"]
    assert entry["config"] == {"tag": "main"} and entry["variant_run"]["config"] == {"tag": "run"}
    assert entry["variant_run"]["learning_curve_stride"] == 2
    again = _rl2(["--settings", "mdp-n25", "--merge", str(src), "--variant", "variant_run", "--out", str(out)],
                 check=False)
    assert again.returncode == 2 and "'variant_run' is taken" in again.stderr
    # training refuses the name before it starts, not after
    train = _rl2(["--settings", "mdp-n25", "--iterations", "1", *TINY.split(), "--variant", "variant_run",
                  "--out", str(out)], check=False)
    assert train.returncode == 2 and "'variant_run' is taken" in train.stderr
    wrong = _rl2(["--settings", "mdp-n10", "--merge", str(src), "--out", str(out)], check=False)
    assert wrong.returncode == 2 and "has no run of mdp-n10" in wrong.stderr and "(mdp-n25)" in wrong.stderr
    # as the main entry: the replaced one is kept as a variant
    _rl2(["--settings", "mdp-n25", "--merge", str(src), "--previous-as", "variant_old_main", "--out", str(out)])
    entry = json.loads(out.read_text())["settings"]["mdp-n25"]
    assert entry["config"] == {"tag": "run"} and entry["variant_old_main"]["config"] == {"tag": "main"}
    assert entry["variant_run"]["config"] == {"tag": "run"} and len(entry["learning_curve"]) == 400


def _diag_module(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


class _QAgent:
    """Acts by a fixed table ``Q [N, H, S, A]`` (greedy) or uniformly at random (``Q`` None)."""

    def __init__(self, Q=None):
        self.Q = Q

    def begin_trial(self, num_envs, n_states, n_actions, horizon, *, seed=0, device="cpu"):
        import torch
        self.n, self.A, self.gen = num_envs, n_actions, torch.Generator().manual_seed(seed)

    def begin_episode(self, episode):
        pass

    def act(self, states, t):
        import torch
        if self.Q is None:
            return torch.randint(0, self.A, (self.n,), generator=self.gen)
        return self.Q[torch.arange(self.n), t, states].argmax(-1)

    def observe(self, *args):
        pass


def test_mdp_diagnostics_regret_is_zero_for_the_optimal_policy_and_the_return_gap_for_another():
    import torch
    from metafit import rl
    from metafit.rl import solve_finite_horizon

    diag = _diag_module("rl2_mdp_diagnostics")
    family = rl.TabularMDPFamily()
    tasks = family.sample_tasks(400, torch.Generator().manual_seed(3))
    R = torch.stack([t.rewards_mean for t in tasks]).double()
    P = torch.stack([t.transitions for t in tasks]).double()
    Q, V = solve_finite_horizon(R, P, family.horizon)
    best = diag.describe(*diag.play_agent(_QAgent(Q), family, tasks, 3, seed=1), Q, family.horizon)
    assert best["regret"].abs().max() < 1e-9 and best["optimal"].tolist() == [1.0, 1.0, 1.0]
    rand = diag.describe(*diag.play_agent(_QAgent(), family, tasks, 3, seed=1), Q, family.horizon)
    assert bool((rand["regret"] > 1.0).all()) and bool((rand["optimal"] < 0.5).all())
    # performance difference: the expected regret of an episode is the optimal value minus the return
    oracle = float(V[:, 0, 0].mean())
    for e in range(3):
        assert float(rand["reward"][e]) + float(rand["regret"][e]) == pytest.approx(oracle, abs=0.6)


def test_mdp_diagnostics_score_kept_weights_beside_the_classical_agents(tmp_path):
    weights, out = tmp_path / "w.safetensors", tmp_path / "diag.json"
    _rl2(["--settings", "mdp-n10", "--iterations", "1", *TINY.split(), "--save-weights", str(weights),
          "--instances", "1000", "--run-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "r.json")])
    proc = subprocess.run([sys.executable, "benchmarks/rl2_mdp_diagnostics.py", "--weights", f"mdp-n10={weights}",
                           "--seeds", "1", "--out", str(out)], cwd=REPO, check=True, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert "myopic" in proc.stdout and "beb" in proc.stdout
    res = json.loads(out.read_text())["settings"]["mdp-n10"]
    rows = res["agents"]
    assert set(rows) == {"rl2_sampled", "rl2_greedy", "myopic", "beb"}
    assert all(len(r["reward"]) == 10 and set(r["regret_by_episodes"]) == {"1-5", "6-10"} for r in rows.values())
    # seed 0 of RL² sampling is the official evaluation (RL2.evaluate with generator 1001)
    official = json.loads((tmp_path / "r.json").read_text())["settings"]["mdp-n10"]["eval"]["mean"]
    assert rows["rl2_sampled"]["total_reward"] == pytest.approx(official, abs=0.01)
    assert rows["myopic"]["total_regret"] < rows["rl2_sampled"]["total_regret"]  # a tuned agent vs one update
    bad = subprocess.run([sys.executable, "benchmarks/rl2_mdp_diagnostics.py", "--weights", f"bandit-n10-k5={weights}"],
                         cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert bad.returncode != 0 and "an MDP setting of benchmarks/rl2.py" in bad.stderr
