"""The command line, called in-process with tiny budgets."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import tiny_config, write_image_tree
from metafit.cli import main


@pytest.fixture
def folder_config(tmp_path):
    data = write_image_tree(tmp_path / "data", n_classes=12, per_class=6, size=16, groups=2)
    cfg = tiny_config(tmp_path / "run", data={"root": str(data), "val_fraction": 0.25, "test_fraction": 0.25})
    cfg["eval"].update({"n_ways": 3, "val_episodes": 5, "test_episodes": 8})
    cfg["task"]["n_ways"] = 3
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / "run"


def test_train_eval_info_resume(folder_config, capsys, tmp_path):
    path, out = folder_config
    assert main(["train", str(path), "--set", "train.meta_steps=4", "--set", "train.eval_every=2"]) == 0
    text = capsys.readouterr().out
    assert "best validation accuracy" in text and "test accuracy (3-way 1-shot, 8 fixed episodes)" in text
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and report["test"]["episodes"] == 8

    assert main(["train", str(path), "--resume", "--set", "train.meta_steps=6", "--no-test"]) == 0
    assert json.loads((out / "report.json").read_text())["steps"] == 6

    assert main(["eval", str(out / "best.safetensors"), "--ways", "2", "--shots", "2", "--queries", "2",
                 "--episodes", "7", "--json", str(tmp_path / "e.json")]) == 0
    assert "2-way 2-shot: accuracy" in capsys.readouterr().out
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["episodes"] == 7 and e["n_ways"] == 2 and 0 <= e["mean"] <= 1

    assert main(["eval", str(out / "best.safetensors"), "--within-group", "--ways", "2", "--episodes", "3",
                 "--split", "val"]) == 0
    assert "val 2-way 1-shot within-group" in capsys.readouterr().out
    assert main(["eval", str(out / "best.safetensors"), "--within-group", "--ways", "5", "--split", "val"]) == 1
    assert "Sampler (val split): the dataset must have at least n_ways = 5 classes; got 3" in capsys.readouterr().err

    assert main(["info", str(out / "last.safetensors")]) == 0
    info = capsys.readouterr().out
    assert "protonet" in info and "resumable True" in info


def test_errors_are_one_line_with_exit_code_1(folder_config, capsys, tmp_path):
    path, _ = folder_config
    assert main(["train", str(path), "--set", "train.optimizer=adamw"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Config: train.optimizer must be one of 'adam' or 'sgd'") and err.count("\n") == 1
    assert main(["train", str(path), "--set", "bogus.key=1"]) == 1
    assert "unknown key 'bogus'" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 1
    assert "existing checkpoint file" in capsys.readouterr().err
    assert main(["train", str(path), "--resume", "--set", f"out_dir={tmp_path / 'fresh'}"]) == 1
    assert "resume needs an existing checkpoint" in capsys.readouterr().err


def test_configs_lists_builtins_and_fields(capsys):
    assert main(["configs"]) == 0
    assert "omniglot_protonet_20w1s" in capsys.readouterr().out
    assert main(["configs", "--fields"]) == 0
    fields = capsys.readouterr().out
    assert "train.meta_lr" in fields and "backbone.bn_mode" in fields and "algorithm.distance" in fields


def test_quickstart_without_data_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("METAFIT_DATA_DIR", raising=False)
    assert main(["quickstart", "--data-dir", str(tmp_path)]) == 1
    assert "--download" in capsys.readouterr().err


def test_quickstart_on_omniglot(omniglot_dir, tmp_path, capsys):
    assert main(["quickstart", "--data-dir", str(omniglot_dir), "--steps", "20",
                 "--out-dir", str(tmp_path / "qs")]) == 0
    out = capsys.readouterr().out
    assert "test accuracy (5-way 1-shot, 600 fixed episodes)" in out
    assert (tmp_path / "qs" / "best.safetensors").is_file()


def test_train_on_omniglot_and_eval_on_runs(omniglot_dir, tmp_path, capsys):
    from test_evaluate import _make_runs

    runs = _make_runs(omniglot_dir, tmp_path / "runs", n_runs=2, same_image=False)
    assert main(["train", "omniglot_protonet_20w1s", "--data-dir", str(omniglot_dir), "--out-dir", str(tmp_path / "o"),
                 "--set", "train.meta_steps=3", "--set", "eval.val_episodes=3", "--set", "eval.test_episodes=3",
                 "--set", "train.progress=false"]) == 0
    assert main(["eval", str(tmp_path / "o" / "best.safetensors"), "--runs", str(runs)]) == 0
    assert "Lake one-shot runs (2 runs)" in capsys.readouterr().out


def test_transfer_pretrains_then_evaluates_with_another_head(folder_config, capsys):
    path, out = folder_config
    assert main(["train", str(path), "--set", "algorithm.name=transfer", "--set", "algorithm.batch_size=16",
                 "--set", "train.meta_steps=4", "--set", "train.eval_every=2", "--no-test"]) == 0
    assert "mini-batches of 16 images over all training classes" in capsys.readouterr().out
    assert main(["info", str(out / "best.safetensors")]) == 0
    assert "mini-batches of 16 images over" in capsys.readouterr().out
    assert main(["eval", str(out / "best.safetensors"), "--ways", "2", "--episodes", "3",
                 "--set", "algorithm.head=finetune", "--set", "algorithm.finetune_steps=2"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["eval", str(out / "best.safetensors"), "--set", "algorithm.n_base_classes=3"]) == 1
    assert "must keep the trained parameters" in capsys.readouterr().err
