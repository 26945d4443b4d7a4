"""Calibrated confidence: ECE, temperature scaling stored in checkpoints, abstaining."""

from __future__ import annotations

import math

import pytest
import torch

import metafit
from conftest import tiny_config, write_image_tree
from metafit import TaskError
from metafit.cli.main import main
from metafit.data import list_labelled_images
from metafit.training import evaluate_checkpoint, make_config, read_checkpoint, train
from metafit.training.calibration import TEMPERATURE_RANGE, calibrate_checkpoint, fit_temperature
from metafit.training.evaluate import expected_calibration_error


def test_ece_by_hand():
    # bin (0.6, 0.6667]: two predictions at 0.65, one right -> |0.5 - 0.65| * 2/4
    # bin (0.9333, 1.0]: two at 0.95, both right -> |1.0 - 0.95| * 2/4
    conf = torch.tensor([0.65, 0.65, 0.95, 0.95])
    correct = torch.tensor([1, 0, 1, 1])
    assert expected_calibration_error(conf, correct) == pytest.approx(0.5 * 0.15 + 0.5 * 0.05)
    assert expected_calibration_error(torch.ones(3), torch.ones(3)) == 0.0


def test_ece_of_diverged_predictions_is_nan_not_a_crash():
    # NaN logits (e.g. support-set fine-tuning at too high a rate) gave an IndexError while binning
    conf = torch.softmax(torch.tensor([[float("nan"), 1.0], [0.2, 0.1]]), -1).max(-1).values
    assert math.isnan(expected_calibration_error(conf, torch.tensor([0, 1])))


def test_fitted_temperature_recovers_the_one_that_generated_the_labels():
    g = torch.Generator().manual_seed(0)
    z = 3.0 * torch.randn(20000, 5, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(z / 2.5, -1), 1, generator=g).flatten()
    assert fit_temperature(z, labels) == pytest.approx(2.5, rel=0.05)



def test_a_temperature_the_queries_do_not_determine_stays_in_range():
    # every query right with a wide margin: the NLL keeps falling as T -> 0
    z = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]], dtype=torch.float64)
    assert fit_temperature(z, torch.tensor([0, 1, 2])) == TEMPERATURE_RANGE[0]
    assert fit_temperature(z, torch.tensor([1, 2, 0])) == TEMPERATURE_RANGE[1]  # all wrong: T -> infinity

@pytest.fixture
def trained(tmp_path, synthetic_splits):
    cfg = make_config(tiny_config(tmp_path / "run", train={"meta_steps": 30, "eval_every": 30, "save_interval": 30,
                                                           "meta_lr": 3e-3}))
    report = train(cfg, splits=synthetic_splits)
    return report, synthetic_splits


def test_training_calibrates_and_reports_ece_before_and_after(trained):
    report, splits = trained
    cal = report["calibration"]
    assert cal["temperature"] > 0 and cal["nll_after"] <= cal["nll_before"] + 1e-9
    meta, _ = read_checkpoint(report["best_checkpoint"])
    assert meta["calibration"]["temperature"] == cal["temperature"]
    assert report["test"]["temperature"] == cal["temperature"]
    assert 0.0 <= report["test"]["ece"] <= 1.0 and 0.0 <= report["test"]["ece_calibrated"] <= 1.0
    r = evaluate_checkpoint(report["best_checkpoint"], splits=splits, episodes=10)
    assert r["temperature"] == cal["temperature"] and r["ece_calibrated"] is not None
    assert metafit.load(report["best_checkpoint"]).temperature == cal["temperature"]


def test_an_evaluation_that_changes_the_algorithm_does_not_apply_the_stale_temperature(trained):
    report, splits = trained
    ckpt = report["best_checkpoint"]
    assert read_checkpoint(ckpt)[0]["config"]["algorithm"]["name"] == "protonet"
    same = evaluate_checkpoint(ckpt, splits=splits, episodes=4, algorithm_overrides={"transductive_steps": 0})
    assert same["temperature"] == report["calibration"]["temperature"] and "calibration" not in same
    changed = evaluate_checkpoint(ckpt, splits=splits, episodes=4, algorithm_overrides={"transductive_steps": 2})
    assert changed["temperature"] is None and changed["ece_calibrated"] is None and changed["ece"] is not None
    assert "not applied: it was fitted without these algorithm overrides" in changed["calibration"]
    # the same rule wherever overrides are applied: a model loaded for prediction
    assert metafit.load(ckpt, algorithm={"transductive_steps": 0}).temperature == report["calibration"]["temperature"]
    assert metafit.load(ckpt, algorithm={"transductive_steps": 2}).temperature == 1.0


def test_calibrating_with_algorithm_overrides_writes_a_copy_that_keeps_them(trained, tmp_path, capsys):
    report, splits = trained
    ckpt = report["best_checkpoint"]
    before = read_checkpoint(ckpt)[0]
    with pytest.raises(metafit.ConfigError, match="must be written to a copy; got no out path. Pass --out"):
        calibrate_checkpoint(ckpt, splits=splits, episodes=4, algorithm={"transductive_steps": 2})
    out = tmp_path / "transductive.safetensors"
    cal = calibrate_checkpoint(ckpt, splits=splits, episodes=4, out=out, algorithm={"transductive_steps": 2})
    assert read_checkpoint(ckpt)[0] == before  # the trained checkpoint is untouched
    meta = read_checkpoint(out)[0]
    assert meta["config"]["algorithm"]["transductive_steps"] == 2
    assert meta["calibration"]["algorithm_overrides"] == {"transductive_steps": 2}
    # the copy is the changed model with its own temperature, fitted on the changed logits
    assert metafit.load(out).temperature == cal["temperature"] != report["calibration"]["temperature"]
    plain = evaluate_checkpoint(out, splits=splits, episodes=4)
    assert plain["temperature"] == cal["temperature"] and "calibration" not in plain
    # the command line passes --set through (refused here for want of --out, before any data is read)
    assert main(["calibrate", ckpt, "--set", "algorithm.transductive_steps=2"]) == 1
    assert "Pass --out PATH" in capsys.readouterr().err


def test_calibrate_writes_a_copy_and_predictions_use_the_temperature(trained, tmp_path, capsys):
    report, splits = trained
    ckpt = report["best_checkpoint"]
    out = tmp_path / "calibrated.safetensors"
    cal = calibrate_checkpoint(ckpt, splits=splits, episodes=5, out=out)
    assert read_checkpoint(out)[0]["calibration"]["episodes"] == 5
    support = write_image_tree(tmp_path / "support", n_classes=5, per_class=1, size=16)
    files, labels = list_labelled_images(support)
    model = metafit.load(out)
    task = model.adapt(files, labels)
    logits = task.logits(files)
    torch.testing.assert_close(task.predict(files).probabilities, torch.softmax(logits / cal["temperature"], -1))
    sure = task.predict(files, abstain_below=1.0)
    assert all(lab is None for lab, p in zip(sure.labels, sure.probabilities) if float(p.max()) < 1.0)
    with pytest.raises(TaskError, match="abstain_below must be a probability"):
        task.predict(files, abstain_below=1.5)
    task.save(tmp_path / "t.safetensors")
    csv_out = tmp_path / "p.csv"
    assert main(["predict", str(tmp_path / "t.safetensors"), "--images", str(support), "--abstain-below", "1.0",
                 "--out", str(csv_out)]) == 0
    assert "unknown" in csv_out.read_text()
    sinusoid = make_config({"data": {"name": "sinusoid"}, "algorithm": {"name": "maml"}, "backbone": {"name": "mlp"}})
    from metafit.training import build_model, save_checkpoint

    reg = save_checkpoint(tmp_path / "reg.safetensors", build_model(sinusoid), sinusoid, step=0)
    with pytest.raises(metafit.ConfigError, match="must be a classifier"):
        calibrate_checkpoint(reg)
