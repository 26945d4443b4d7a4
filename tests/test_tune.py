"""Hyperparameter search (metafit tune): space validation, a real study on tiny sinusoid runs,
resume, pruning, divergence, the CLI."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from PIL import Image

from metafit import ConfigError
from metafit.cli import main
from metafit.tools import load_space, tune
from metafit.training import builtin_configs, load_config, train
from metafit.tools.space import best_config

optuna = pytest.importorskip("optuna")  # the tune extra (metafit imports it only when a study runs)

# a few hundred milliseconds per trial
FAST = ["train.meta_steps=20", "train.eval_every=5", "train.log_every=5", "eval.val_episodes=10",
        "eval.test_episodes=10", "train.progress=false", "train.num_threads=1"]
SPACE = {
    "train.meta_lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "algorithm.inner_steps": {"type": "int", "low": 1, "high": 2},
    "train.optimizer": ["adam", "sgd"],
}


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_best_config_is_the_users_config_with_the_searched_values(tmp_path):
    folder = {"data": {"name": "folder", "root": str(tmp_path), "image_size": 28}, "algorithm": "protonet",
              "train": {"meta_steps": 5000, "meta_lr": 0.001}, "out_dir": "runs/mine"}
    params = load_space({"train.meta_lr": {"type": "float", "low": 1e-4, "high": 1e-2},
                         "task.n_ways": [5, 20], "backbone.hidden_channels": [32, 64]})
    data = best_config(folder, params, {"train.meta_lr": 0.003, "task.n_ways": 20, "backbone.hidden_channels": 32})
    assert data == {"data": {"name": "folder", "root": str(tmp_path), "image_size": 28}, "algorithm": "protonet",
                    "train": {"meta_steps": 5000, "meta_lr": 0.003}, "out_dir": "runs/mine",
                    "task": {"n_ways": 20}, "backbone": {"hidden_channels": 32}}  # no sinusoid fields, no defaults
    assert folder["train"]["meta_lr"] == 0.001  # the caller's mapping is left alone
    encoded = load_space({"backbone.hidden": [[40, 40], [64]]})["backbone.hidden"]
    assert best_config("sinusoid_maml", {"backbone.hidden": encoded}, {"backbone.hidden": "[64]"})["backbone"] == {
        "name": "mlp", "hidden": [64]}


def _trials(out) -> list[dict]:
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("space, message", [
    ({}, "Tune: the space (the space) must be a non-empty mapping of config fields to distributions; got {}."),
    ({"train.meta_lr": {"type": "float", "low": 1e-2, "high": 1e-4}},
     "Tune: train.meta_lr in the space must have low below high; got low=0.01, high=0.0001. Swap low and high"),
    ({"train.meta_lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}},
     "Tune: train.meta_lr in the space must have low > 0 with log: true; got low=0.0. Raise low above zero"),
    ({"train.meta_lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True, "step": 1e-4}},
     "Tune: train.meta_lr in the space must not set both log and step; got log=true, step=0.0001. Drop one"),
    ({"train.meta_lr": {"type": "gaussian", "low": 0, "high": 1}},
     "Tune: train.meta_lr.type in the space must be one of 'float', 'int', 'categorical'; got 'gaussian'."),
    ({"train.meta_lr": {"low": 0, "high": 1}},
     "Tune: train.meta_lr.type in the space must be one of 'float', 'int', 'categorical'; got None."),
    ({"train.meta_lr": {"type": "float", "low": 1e-4, "hi": 1e-2}},
     "Tune: train.meta_lr.hi in the space must not be set: a float distribution takes type, low, high, log, step;"),
    ({"train.meta_lr": {"type": "float", "low": 1e-4}},
     "Tune: train.meta_lr.high in the space must be given for a float distribution; got nothing."),
    ({"algorithm.inner_steps": {"type": "int", "low": 1.5, "high": 3}},
     "Tune: algorithm.inner_steps.low in the space must be a valid integer"),
    ({"train.optimizer": {"type": "categorical", "choices": []}},
     "Tune: train.optimizer.choices in the space "),
    ({"train.optimizer": {"type": "categorical", "choices": ["adam", "adam"]}},
     "Tune: train.optimizer in the space must list each choice once; got ['adam', 'adam']."),
    ({"train.meta_lr": 0.001}, "Tune: train.meta_lr in the space must be a distribution like"),
    ({"train..meta_lr": [1, 2]}, "Tune: a space key in the space must be a dotted config field like train.meta_lr;"),
    ({"out_dir": ["a", "b"]}, "Tune: the space in the space must not search out_dir;"),
])
def test_space_errors_name_the_entry_and_the_fix(space, message):
    with pytest.raises(ConfigError) as info:
        load_space(space)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_space_from_yaml_and_builtin(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("train.meta_lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                    "backbone.hidden: [[20, 20], [40, 40]]\n")
    space = load_space(path)
    assert space["train.meta_lr"].log and space["backbone.hidden"].labels() == ["[20, 20]", "[40, 40]"]
    builtin = load_space("omniglot_protonet_5w1s")  # shipped in metafit/configs/spaces
    assert "train.meta_lr" in builtin and "task.n_ways" in builtin
    from metafit.tools.space import check_space

    check_space("omniglot_protonet_5w1s", builtin)  # every value of its ranges is a valid config
    (tmp_path / "bad.yaml").write_text("train.meta_lr: {type: float, low: [\n")
    with pytest.raises(ConfigError, match=r"^Tune: '.*bad.yaml' must be valid YAML"):
        load_space(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=r"^Tune: --space must be a YAML file or a built-in space name; got 'nope'"):
        load_space("nope")


@pytest.mark.parametrize("space, overrides, message", [
    ({"train.metalr": {"type": "float", "low": 1e-4, "high": 1e-2}}, [],
     ("Tune: the space entry train.metalr must be a config field that accepts every value of its range; got "
      "train.metalr=0.0001, which the config refuses: Config: unknown key 'train.metalr'")),
    ({"train.meta_lr": {"type": "float", "low": 0.0, "high": 1e-2}}, [],
     ("Tune: the space entry train.meta_lr must be a config field that accepts every value of its range; got "
      "train.meta_lr=0.0, which the config refuses: Config: train.meta_lr must be greater than 0")),
    ({"train.optimizer": ["adam", "adamw"]}, [],
     "got train.optimizer=adamw, which the config refuses: Config: train.optimizer must be one of 'adam' or 'sgd'"),
    ({"train.meta_lr": [0.01, 0.001]}, ["train.meta_lr=0.1"],
     "Tune: a field must be either searched or set with --set; got train.meta_lr in both."),
])
def test_config_errors_come_before_any_trial(tmp_path, space, overrides, message):
    out = tmp_path / "tune"
    with pytest.raises(ConfigError) as info:
        tune("sinusoid_maml", space, 3, out_dir=out, overrides=FAST + overrides)
    assert message in str(info.value), str(info.value)
    assert not out.exists()  # refused before the study (and any trial) started


def test_study_writes_a_best_config_that_trains(tmp_path):
    out = tmp_path / "tune"
    summary = tune("sinusoid_maml", SPACE, 3, out_dir=out, overrides=FAST, seed=1)
    assert summary["metric"] == "mse" and summary["n_trials"] == {"complete": 3}
    rows = _trials(out)
    assert [r["trial"] for r in rows] == ["0", "1", "2"] and {r["state"] for r in rows} == {"complete"}
    for r in rows:  # each trial trained its sampled values; the objective is minus its best validation MSE
        cfg = json.loads((out / f"trial-{r['trial']}" / "config.json").read_text())
        assert cfg["train"]["meta_lr"] == pytest.approx(float(r["train.meta_lr"]))
        assert cfg["algorithm"]["inner_steps"] == int(r["algorithm.inner_steps"])
        assert cfg["train"]["optimizer"] == r["train.optimizer"]
        assert cfg["eval"]["calibrate"] is False and cfg["out_dir"] == str(out / f"trial-{r['trial']}")
        report = json.loads((out / f"trial-{r['trial']}" / "report.json").read_text())
        assert "test" not in report
        assert float(r["value"]) == pytest.approx(-report["val"]["mean"])
        assert float(r["val_mse"]) == pytest.approx(report["val"]["mean"])
        assert int(r["best_step"]) == report["best_step"]
    best = max(rows, key=lambda r: float(r["value"]))
    assert summary["best"]["number"] == int(best["trial"])
    saved = json.loads((out / "tune.json").read_text())
    assert saved["best"]["params"] == summary["best"]["params"] and saved["n_trials"] == {"complete": 3}
    md = (out / "trials.md").read_text()
    assert f"| {best['trial']} *" in md and "train.meta_lr" in md and "val MSE" in md
    with Image.open(out / "history.png") as img:
        assert img.format == "PNG" and img.size[0] > 300

    cfg = load_config(out / "best.yaml")  # ready to train: the best values in the user's config
    assert cfg.train.meta_lr == pytest.approx(summary["best"]["params"]["train.meta_lr"])
    assert cfg.algorithm.inner_steps == summary["best"]["params"]["algorithm.inner_steps"]
    assert cfg.train.optimizer == summary["best"]["params"]["train.optimizer"]
    assert cfg.eval.calibrate is True
    # the user's config with only the searched fields changed: not the trials' short budget (FAST)
    original = _flat(yaml.safe_load(builtin_configs()["sinusoid_maml"].read_text()))
    written = _flat(yaml.safe_load((out / "best.yaml").read_text()))
    changed = {k for k in original.keys() | written.keys() if original.get(k, "unset") != written.get(k, "unset")}
    assert changed <= set(SPACE) and written["train.meta_steps"] == 70000
    assert {k: written[k] for k in SPACE} == summary["best"]["params"]
    assert summary["best"]["train_command"] == (f"metafit train {out / 'best.yaml'} --out-dir "
                                                f"{tmp_path / 'sinusoid_maml-best'}")
    report = train(load_config(out / "best.yaml", [*FAST, "train.meta_steps=4", "train.eval_every=2",
                                                   f"out_dir={tmp_path / 'sinusoid_maml-best'}"]))
    assert report["steps"] == 4 and report["test"]["episodes"] == 10


def test_cli_tune_resumes_and_counts_finished_trials(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    out, db = tmp_path / "tune", tmp_path / "shared.db"
    args = ["tune", "sinusoid_maml", "--space", str(space), "--out", str(out), "--storage", f"sqlite:///{db}",
            "--study-name", "demo", "--seed", "3"] + [a for item in FAST for a in ("--set", item)]
    assert main(args + ["--trials", "2"]) == 0
    text = capsys.readouterr().out
    assert "study demo: 2 complete" in text and f"train it: metafit train {out / 'best.yaml'} --out-dir" in text
    assert "the trials' --set values (train.meta_steps=20, " in text  # not in best.yaml
    first = _trials(out)
    assert len(first) == 2

    assert main(args + ["--trials", "3"]) == 0  # resumes: runs exactly one more trial
    text = capsys.readouterr().out
    assert "study 'demo' in sqlite:///" in text and "2 finished trials, running up to 1 more" in text
    rows = _trials(out)
    assert [r["trial"] for r in rows] == ["0", "1", "2"] and (out / "trial-2" / "report.json").is_file()
    assert rows[:2] == first
    # the resumed sampler does not replay the first draws of the seed
    assert rows[2]["train.meta_lr"] not in {r["train.meta_lr"] for r in first}

    assert main(args + ["--trials", "3"]) == 0  # nothing left to run
    assert "already has 3 finished trials" in capsys.readouterr().out
    assert len(_trials(out)) == 3 and not (out / "trial-3").exists()
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{db}")
    assert len(study.trials) == 3 and study.user_attrs["metric"] == "mse"

    other = tmp_path / "other.yaml"  # the same study with another space is refused
    other.write_text(yaml.safe_dump({"train.meta_lr": [0.001, 0.01]}))
    args[args.index(str(space))] = str(other)
    assert main(args + ["--trials", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Tune: the space must be the one study 'demo' was started with") and err.count("\n") == 1


def test_cli_tune_errors_are_one_line(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("train.meta_lr: {type: float, low: 1.0e-2, high: 1.0e-4}\n")
    assert main(["tune", "sinusoid_maml", "--space", str(space), "--trials", "2", "--out", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Tune: train.meta_lr in space.yaml must have low below high") and err.count("\n") == 1
    space.write_text("train.meta_lr: [0.001]\n")
    assert main(["tune", "sinusoid_maml", "--space", str(space), "--trials", "0"]) == 1
    assert "Tune: --trials must be a positive integer; got 0." in capsys.readouterr().err
    assert main(["tune", "sinusoid_maml", "--space", str(space), "--trials", "1", "--out", str(tmp_path / "t"),
                 "--storage", "study.db"]) == 1
    assert "Tune: --storage must be a database URL; got 'study.db'." in capsys.readouterr().err


def test_median_pruner_stops_bad_trials(tmp_path):
    # Trials differ only in the amplitude of their sinusoids: small ones give a far lower MSE at every
    # validation, so once one completed, the median pruner must stop every large-amplitude trial early.
    out = tmp_path / "tune"
    summary = tune("sinusoid_maml", {"data.amplitude_max": [0.2, 5.0]}, 6, out_dir=out, overrides=FAST,
                   seed=0, pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    rows = summary["trials"]
    pruned = [r for r in rows if r["state"] == "pruned"]
    small = [r for r in rows if r["params"]["data.amplitude_max"] == 0.2]
    assert pruned and small and len(rows) == 6
    assert all(r["params"]["data.amplitude_max"] == 5.0 for r in pruned)
    assert all(r["state"] == "complete" for r in small)
    first_small = min(r["number"] for r in small)
    for r in pruned:  # pruned at a validation before the end: training really stopped there
        assert r["number"] > first_small and r["last_step"] < 20
        lines = (out / f"trial-{r['number']}" / "metrics.jsonl").read_text().splitlines()
        assert max(json.loads(line)["step"] for line in lines) == r["last_step"]
        assert not (out / f"trial-{r['number']}" / "report.json").exists()
    assert summary["best"]["params"] == {"data.amplitude_max": 0.2}
    assert "(" in (out / "trials.md").read_text()  # a pruned trial shows its last validation


def test_diverged_trial_is_pruned_and_the_study_goes_on(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("train.meta_lr: [1.0e+12]\n")  # SGD with this step size overflows at once
    out = tmp_path / "tune"
    assert main(["tune", "sinusoid_maml", "--space", str(space), "--trials", "2", "--out", str(out),
                 "--set", "train.optimizer=sgd", "--set", "train.momentum=0.0"]
                + [a for item in FAST for a in ("--set", item)]) == 0
    text = capsys.readouterr().out
    assert "trial 0 pruned (diverged): Trainer: the" in text and "must be finite" in text
    assert "no trial completed yet" in text
    summary = json.loads((out / "tune.json").read_text())
    assert summary["n_trials"] == {"pruned": 2} and summary["best"] is None
    assert not (out / "best.yaml").exists()
    assert all(r["state"] == "pruned (diverged)" for r in summary["trials"])
