"""Sinusoid regression: the task family, the MLP backbone, training and evaluation with MSE,
the CLI quickstart (embedded default) and its plot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metafit import DataError, TaskError
from metafit.cli.main import main
from metafit.data import SinusoidFamily
from metafit.training import Trainer, evaluate_checkpoint, load, load_config, make_config


def test_tasks_follow_the_papers_distribution():
    fam = SinusoidFamily()
    batch = fam.sampler(5, 7, seed=0).sample(2000)
    assert batch.support_x.shape == (2000, 5, 1) and batch.query_y.shape == (2000, 7, 1)
    assert float(batch.support_x.min()) >= -5 and float(batch.support_x.max()) <= 5
    amp = batch.query_y.abs().amax((1, 2))
    assert float(amp.max()) <= 5.0 + 1e-5
    # query and support points lie on one curve per task: refit A, phase by least squares
    x, y = torch.cat([batch.support_x, batch.query_x], 1)[0, :, 0], torch.cat([batch.support_y, batch.query_y], 1)[0, :, 0]
    design = torch.stack([torch.sin(x), torch.cos(x)], 1).double()
    coef = torch.linalg.lstsq(design, y.double().unsqueeze(1)).solution.flatten()
    assert float((design @ coef - y.double()).abs().max()) < 1e-4
    assert 0.1 - 1e-6 <= math.hypot(*coef.tolist()) <= 5.0 + 1e-6


def test_fixed_episodes_depend_only_on_the_seed():
    a = SinusoidFamily().sampler(5, 10, seed=1).fixed_episodes(4, seed=9)
    b = SinusoidFamily().sampler(5, 10, seed=2).fixed_episodes(4, seed=9)
    for x, y in zip(a, b):
        assert torch.equal(x.support_x, y.support_x) and torch.equal(x.amplitude, y.amplitude)


def test_bad_ranges_and_settings_name_the_problem():
    with pytest.raises(DataError, match="amplitude must be a finite range"):
        SinusoidFamily(amplitude=(5.0, 0.1))
    with pytest.raises(DataError, match="k_shots must be an integer >= 1"):
        SinusoidFamily().sampler(0, 5)
    with pytest.raises(Exception, match="x_min must not exceed x_max"):
        make_config({"data": {"name": "sinusoid", "x_min": 3, "x_max": -3}})


def _config(tmp_path, **algorithm):
    return load_config("sinusoid_maml", [
        f"out_dir={tmp_path / 'run'}", "train.meta_steps=300", "train.eval_every=150", "train.save_interval=150",
        "train.progress=false", "eval.val_episodes=50", "eval.test_episodes=60", "train.num_threads=null",
        *(f"algorithm.{k}={v}" for k, v in algorithm.items()),
    ])


@pytest.mark.parametrize("name", ["maml", "metasgd", "anil", "reptile"])
def test_gradient_learners_reduce_regression_error(tmp_path, name):
    extra = {"inner_lr": 0.01} if name != "reptile" else {"inner_lr": 0.02, "inner_steps": 5}
    # Meta-SGD learns its step sizes for the one step it trains with: repeating it diverges
    cfg = _config(tmp_path, name=name, eval_inner_steps=1 if name == "metasgd" else 5, **extra)
    if name == "reptile":  # Adam on the Reptile direction (the paper's other variant) learns fast here
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"meta_lr": 0.01})})
    trainer = Trainer(cfg)
    assert trainer.model.task_kind == "regression" and trainer.model.head.out_features == 1
    before = trainer.validate()
    assert before.metric == "mse"
    trainer.fit()
    after = trainer.validate()
    assert after.mean < 0.8 * before.mean, (before.mean, after.mean)
    assert trainer.best_result.mean == min(r for r in [trainer.best_result.mean, after.mean])


def test_best_checkpoint_is_the_lowest_validation_mse(tmp_path):
    cfg = _config(tmp_path, name="maml")
    from metafit.training import train
    report = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert val and all("mse" in r for r in val)
    best = min(val, key=lambda r: r["mse"])
    assert report["best_step"] == best["step"]
    assert report["test"]["metric"] == "mse"
    res = evaluate_checkpoint(report["best_checkpoint"], inner_steps=0, episodes=20)
    more = evaluate_checkpoint(report["best_checkpoint"], inner_steps=5, episodes=20)
    assert res["inner_steps"] == 0 and more["mean"] < res["mean"]


def test_regression_model_rejects_bad_targets_and_protonet_rejects_regression(tmp_path):
    cfg = _config(tmp_path, name="maml")
    model = Trainer(cfg).model
    with pytest.raises(TaskError, match="regression targets must be a float tensor"):
        model.adapt(torch.zeros(5, 1), torch.zeros(5, dtype=torch.long), 1)
    from metafit import ConfigError
    from metafit.training import build_model
    with pytest.raises(ConfigError, match="'protonet' must be used on classification tasks"):
        build_model(make_config({"data": {"name": "sinusoid"}, "backbone": {"name": "mlp"},
                                 "algorithm": {"name": "protonet"}}))


def test_quickstart_without_data_trains_maml_on_sinusoids_and_plots(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("METAFIT_DATA_DIR", raising=False)
    monkeypatch.setenv("METAFIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "qs"
    assert main(["quickstart", "--steps", "200", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MAML on few-shot sinusoid regression" in text and "MAML paper" in text
    for steps in ("1", "5", "10"):
        assert any(line.split()[:1] == [steps] for line in text.splitlines())
    png = out / "adaptation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    model = load(out / "best.safetensors")
    assert model.config.name == "maml" and model.run_config.data.name == "sinusoid"
    assert main(["info", str(out / "best.safetensors")]) == 0
    assert "sinusoid amplitude=[0.1, 5.0]" in capsys.readouterr().out


def test_cli_eval_reports_mse_with_inner_steps(tmp_path, capsys):
    cfg = _config(tmp_path, name="maml")
    from metafit.training import train
    report = train(cfg, test=False)
    assert main(["eval", report["best_checkpoint"], "--inner-steps", "2", "--episodes", "10"]) == 0
    assert "5-shot regression, 2 inner steps: MSE" in capsys.readouterr().out
