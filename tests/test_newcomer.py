"""What a new user trips over (issue 38), checked the way they meet it: through the CLI in-process.

An existing run folder is refused (and --overwrite replaces it cleanly); the data split is printed,
stored in the run folder and the checkpoints, and shown by ``metafit info``; a stop by the time
budget is announced; a normal run of the shipped quick configs logs no monitor spike, while a real
spike is still caught and what was done about it is worded."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from conftest import tiny_config, write_image_tree
from test_monitor import _spike_at
from metafit import ConfigError, TrainingError
from metafit.cli import main
from metafit.training import Trainer, load_config, make_config, read_checkpoint, train
from metafit.training.checkpoint import write_checkpoint


def _rows(run, split=None):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if split is None or r["split"] == split]


@pytest.fixture
def ten_digits(tmp_path):
    """The issue's setting: a folder of 10 classes, default data settings (no rotations given)."""
    data = write_image_tree(tmp_path / "digits", n_classes=10, per_class=6, size=16)
    cfg = tiny_config(tmp_path / "run", data={"root": str(data)})
    del cfg["data"]["rotations"]  # the folder default applies
    cfg["task"]["n_ways"] = 2
    cfg["eval"].update({"n_ways": 2, "val_episodes": 4, "test_episodes": 4})
    cfg["train"].update({"meta_steps": 4, "eval_every": 2, "save_interval": 2})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / "run"


# -- 1. a finished run is never destroyed silently ---------------------------------------------------
def test_an_existing_run_folder_is_refused_unless_resume_or_overwrite(ten_digits, capsys):
    path, run = ten_digits
    assert main(["train", str(path), "--no-test"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert "step-0000002.safetensors" in before

    assert main(["train", str(path), "--set", "train.meta_steps=3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: Trainer: out_dir must be a new or empty folder;")
    assert repr(str(run)) in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing touched

    assert main(["train", str(path), "--resume", "--overwrite"]) == 1
    assert "resume and overwrite must not both be set" in capsys.readouterr().err

    # --overwrite: the old run's files go first, so nothing stale mixes in (its step-2 checkpoint)
    assert main(["train", str(path), "--overwrite", "--no-test", "--set", "train.meta_steps=3",
                 "--set", "train.save_interval=3"]) == 0
    assert "deleted the earlier run's files" in capsys.readouterr().out
    names = {p.name for p in run.iterdir()}
    assert "step-0000002.safetensors" not in names and "step-0000003.safetensors" in names
    assert max(r["step"] for r in _rows(run)) == 3 and json.loads((run / "report.json").read_text())["steps"] == 3

    # --resume continues the run in place
    assert main(["train", str(path), "--resume", "--no-test", "--set", "train.meta_steps=5"]) == 0
    assert json.loads((run / "report.json").read_text())["steps"] == 5


def test_the_python_api_refuses_too(ten_digits, tmp_path):
    path, run = ten_digits
    cfg = load_config(str(path))
    train(cfg, test=False)
    best = (run / "best.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"out_dir must be a new or empty folder.*overwrite=True"):
        train(cfg, test=False)
    with pytest.raises(ConfigError, match=r"out_dir must be a new or empty folder"):
        Trainer(cfg).fit()
    assert (run / "best.safetensors").read_bytes() == best
    (run / "notes.txt").write_text("mine")  # not a run file: kept by overwrite
    train(cfg, test=False, overwrite=True)
    assert (run / "notes.txt").read_text() == "mine"
    # a folder holding anything else is refused as well (e.g. a mistyped --out-dir)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="holding holiday.jpg"):
        train(cfg.model_copy(update={"out_dir": str(other)}), test=False)


# -- 2. the data split is visible ----------------------------------------------------------------------
def test_the_split_is_printed_stored_and_shown_by_info(ten_digits, capsys):
    path, run = ten_digits
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "data split: train 6 classes, val 2 classes, test 2 classes (folder data: the classes of" in out
    assert "data.val_fraction=0.15" in out and "rotations" not in out.split("data split")[1].split("\n")[0]
    split = json.loads((run / "split.json").read_text())
    assert split["classes"] == {"train": 6, "val": 2, "test": 2}
    assert split["rotations"] == {"train": False, "val": False, "test": False}
    test_names = split["names"]["test"]
    assert len(test_names) == 2 and f"test classes: {', '.join(test_names)}" in out
    assert sorted(sum(split["class_names"].values(), [])) == [f"class{c:02d}" for c in range(10)]
    report = json.loads((run / "report.json").read_text())
    assert report["split"]["classes"] == split["classes"]
    for name in ("best.safetensors", "last.safetensors"):
        meta, _ = read_checkpoint(run / name)
        assert meta["split"]["names"]["test"] == test_names

    assert main(["info", str(run / "best.safetensors")]) == 0
    info = capsys.readouterr().out
    assert "split        train 6 classes, val 2 classes, test 2 classes" in info
    assert f"test classes: {', '.join(test_names)}" in info
    data_line = next(line for line in info.splitlines() if line.startswith("data "))
    assert data_line.startswith("data         folder ") and "protocol" not in data_line and "storage" not in data_line

    # a checkpoint written before the split was stored still loads and shows
    meta, tensors = read_checkpoint(run / "best.safetensors")
    meta.pop("split")
    write_checkpoint(run / "old.safetensors", tensors, meta)
    assert main(["info", str(run / "old.safetensors")]) == 0
    assert "split " not in capsys.readouterr().out


def test_rotations_are_off_for_folders_and_warned_about_when_on(ten_digits, capsys):
    path, run = ten_digits
    assert main(["train", str(path), "--no-test", "--set", "data.rotations=true", "--set", "eval.n_ways=5"]) == 0
    out = capsys.readouterr().out
    assert "train 6 classes (x4 with rotations)" in out
    assert "warning: data.rotations is on" in out
    assert "warning: the test split has 2 classes, fewer than eval.n_ways=5" in out
    assert "warning: the val split has 2 classes" in out


def test_a_split_too_small_for_its_tasks_is_refused_before_training(ten_digits, capsys):
    path, run = ten_digits
    assert main(["train", str(path), "--set", "eval.n_ways=5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Trainer: the val split must have at least eval.n_ways=5 classes; got 2 "
                          "(train/val/test classes 6/2/2") and err.count("\n") == 1
    assert "data.val_fraction" in err and not run.exists()  # nothing trained or written


# -- 3. a time-budget stop is announced ----------------------------------------------------------------
def test_a_budget_stop_is_announced(ten_digits, capsys):
    path, run = ten_digits
    # a budget of 6 microseconds ends training after the first step, whatever the machine
    assert main(["train", str(path), "--no-test", "--set", "train.meta_steps=1000", "--set", "train.max_minutes=1e-7"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "report.json").read_text())
    assert report["stop"] == {"reason": "max_minutes", "step": report["steps"], "meta_steps": 1000, "max_minutes": 1e-7}
    assert report["steps"] < 1000
    step = report["steps"]
    assert f"the time budget train.max_minutes=1e-07 ended training at step {step} of 1000" in out
    assert f"stopped by the time budget train.max_minutes=1e-07 at step {step} of 1000" in out
    assert _rows(run, "stop") == [{**_rows(run, "stop")[0], "step": step, "event": "max_minutes"}]

    assert main(["train", str(path), "--no-test", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert json.loads((run / "report.json").read_text())["stop"]["reason"] == "meta_steps"
    assert "time budget" not in out


# -- 4. the monitor does not cry wolf ------------------------------------------------------------------
def _sinusoid_cli(out, *sets):
    return ["train", "sinusoid_maml", "--out-dir", str(out), "--no-test",
            *[a for s in ["train.meta_steps=1500", "train.eval_every=1500", "train.save_interval=1500",
                          "train.log_every=500", "eval.val_episodes=20", "train.progress=false", *sets]
              for a in ("--set", s)]]


def test_a_normal_sinusoid_run_logs_no_spike(tmp_path, capsys):
    assert main(_sinusoid_cli(tmp_path / "sin")) == 0
    out = capsys.readouterr()
    assert _rows(tmp_path / "sin", "monitor") == []
    assert "spike" not in out.out + out.err


def test_a_normal_folder_run_logs_no_spike(tmp_path, capsys):
    """Near-zero losses of single easy episodes: heavy-tailed noise (30x the median is ordinary)."""
    data = write_image_tree(tmp_path / "data", n_classes=40, per_class=10, size=20)
    cfg = tiny_config(tmp_path / "run", data={"root": str(data), "image_size": 20})
    del cfg["data"]["rotations"]
    cfg["train"].update({"meta_steps": 600, "eval_every": 600, "save_interval": 600, "log_every": 600})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--no-test"]) == 0
    out = capsys.readouterr()
    assert _rows(tmp_path / "run", "monitor") == []
    assert "spike" not in out.out + out.err


def test_omniglot_protonet_small_logs_no_spike(omniglot_dir, tmp_path, capsys):
    assert main(["train", "omniglot_protonet_small", "--data-dir", str(omniglot_dir), "--out-dir", str(tmp_path / "o"),
                 "--no-test", *[a for s in ["train.meta_steps=40", "task.n_ways=20", "train.eval_every=40",
                                            "train.save_interval=40", "eval.val_episodes=5", "train.progress=false",
                                            "monitor.min_history=10", "train.max_minutes=null"]
                                for a in ("--set", s)]]) == 0
    out = capsys.readouterr()
    assert "data split: train" in out.out
    assert _rows(tmp_path / "o", "monitor") == []
    assert "spike" not in out.out + out.err


def _sinusoid_config(out, **monitor):
    return load_config("sinusoid_maml", [
        f"out_dir={out}", "train.meta_steps=300", "train.eval_every=100", "train.save_interval=100",
        "train.log_every=100", "eval.val_episodes=10", "train.progress=false", "train.tensorboard=false",
        *[f"monitor.{k}={v}" for k, v in monitor.items()]])


def test_a_real_spike_is_still_caught_and_the_action_is_worded(tmp_path, capsys, monkeypatch):
    trainer = Trainer(_sinusoid_config(tmp_path / "warn"))
    _spike_at(trainer, monkeypatch, {250}, 100.0)
    trainer.fit()
    rows = _rows(tmp_path / "warn", "monitor")
    assert {r["step"] for r in rows} == {250} and "loss_spike" in {r["event"] for r in rows}
    assert "step 250: loss spike:" in capsys.readouterr().out
    # (tqdm.write prints on stdout) what "apply" did, in words
    trainer = Trainer(_sinusoid_config(tmp_path / "skip", policy="skip"))
    _spike_at(trainer, monkeypatch, {250}, 100.0)
    trainer.fit()
    assert "step 250: loss spike:" in (out := capsys.readouterr().out) and "-> skipped the step" in out
    trainer = Trainer(_sinusoid_config(tmp_path / "rollback", policy="rollback"))
    _spike_at(trainer, monkeypatch, {250}, 100.0)
    trainer.fit()
    assert "-> rolled back to the checkpoint of step 200" in capsys.readouterr().out


def test_the_warn_policy_says_it_kept_the_step_and_a_nan_stops(tmp_path, capsys, monkeypatch):
    trainer = Trainer(_sinusoid_config(tmp_path / "warn"))
    _spike_at(trainer, monkeypatch, {120}, 100.0)
    trainer.fit()
    assert "-> kept the step (its update is applied; monitor.policy=warn)" in capsys.readouterr().out
    trainer = Trainer(_sinusoid_config(tmp_path / "nan"))
    _spike_at(trainer, monkeypatch, {30}, math.nan)
    with pytest.raises(TrainingError, match="loss must be finite"):
        trainer.fit()
    assert "step 30: non-finite loss: nan -> stopped training" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_second_fit_of_the_same_trainer_continues_its_own_run(tmp_path, synthetic_splits):
    """(benchmarks/step_breakdown.py) Not a second run: its log is continued, not cut."""
    cfg = make_config(tiny_config(tmp_path / "run"))
    trainer = Trainer(cfg, splits=synthetic_splits)
    trainer.fit()
    first = _rows(tmp_path / "run")
    trainer.config = cfg.model_copy(update={"train": cfg.train.model_copy(update={"meta_steps": 8})})
    trainer.fit()
    rows = _rows(tmp_path / "run")
    assert rows[:len(first)] == first and max(r["step"] for r in rows) == 8
    assert json.loads((tmp_path / "run" / "split.json").read_text())["how"] == "the splits passed to the Trainer"
    # a new Trainer in that folder is another run: refused
    with pytest.raises(ConfigError, match="out_dir must be a new or empty folder"):
        Trainer(cfg, splits=synthetic_splits).fit()


def test_info_describes_a_saved_task_file(tmp_path, capsys):
    import metafit
    from metafit.data import list_labelled_images
    from metafit.training import build_model, make_config, save_checkpoint

    cfg = make_config(tiny_config(tmp_path / "run"))
    ckpt = save_checkpoint(tmp_path / "m.safetensors", build_model(cfg).eval(), cfg, step=0)
    files, labels = list_labelled_images(write_image_tree(tmp_path / "support", n_classes=3, per_class=1, size=16))
    task = metafit.load(ckpt).adapt(files, labels)
    path = task.save(tmp_path / "t.safetensors")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "algorithm    protonet (Prototypes)" in out and "classes      3: class00, class01, class02" in out
    assert f"model        {ckpt}" in out
