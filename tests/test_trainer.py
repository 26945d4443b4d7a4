"""Trainer: exact resume, divergence guard, checkpoints kept, logs, schedules."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import metafit
from conftest import tiny_config
from metafit import CheckpointError, TrainingError
from metafit.algorithms import MetaOutput
from metafit.training import Trainer, make_config, read_checkpoint


def _cfg(tmp_path, name="run", **train):
    t = {"meta_steps": 8, "eval_every": 4, "save_interval": 4, "log_every": 2}
    t.update(train)
    return make_config(tiny_config(tmp_path / name, augment={"affine": True}, train=t))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_is_bit_for_bit(tmp_path, synthetic_splits, optimizer):
    extra = dict(optimizer=optimizer, lr_schedule="step", lr_step_size=3, grad_clip=1.0)
    straight = Trainer(_cfg(tmp_path, "straight", **extra), splits=synthetic_splits)
    straight.fit()

    half = Trainer(_cfg(tmp_path, "halves", meta_steps=4, **extra), splits=synthetic_splits)
    half.fit()
    resumed = Trainer(_cfg(tmp_path, "halves", **extra), splits=synthetic_splits)
    resumed.fit(resume=True)

    assert resumed.step == straight.step == 8
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for pid in sa:
        for name, value in sa[pid].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[pid][name])), (pid, name)
    assert torch.equal(straight.train_sampler.get_state(), resumed.train_sampler.get_state())
    assert straight.best_step == resumed.best_step and straight.best_val == resumed.best_val
    # the metrics log of the resumed run continues the first half's
    steps = [json.loads(l)["step"] for l in (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["split"] == "train"]
    assert steps == [2, 4, 6, 8]


def test_checkpoints_best_interval_last_and_logs(tmp_path, synthetic_splits):
    trainer = Trainer(_cfg(tmp_path), splits=synthetic_splits)
    result = trainer.fit()
    out = tmp_path / "run"
    names = sorted(p.name for p in out.iterdir())
    assert {"best.safetensors", "last.safetensors", "step-0000004.safetensors", "step-0000008.safetensors",
            "metrics.jsonl", "metrics.csv", "config.json"} <= set(names)
    assert result.checkpoint == out / "best.safetensors"
    best_meta, _ = read_checkpoint(out / "best.safetensors")
    assert best_meta["step"] == result.best_step and "train_state" not in best_meta
    assert "train_state" in read_checkpoint(out / "last.safetensors")[0]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["split"] for r in rows].count("val") == 2
    assert all(float(r["loss"]) > 0 for r in rows)
    assert metafit.load(out / "best.safetensors").checkpoint_meta["step"] == result.best_step


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_splits, monkeypatch):
    trainer = Trainer(_cfg(tmp_path, meta_steps=20), splits=synthetic_splits)
    real = trainer.model.meta_loss
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        out = real(batch)
        if calls["n"] == 6:
            return MetaOutput(out.loss * float("nan"), out.accuracy)
        return out

    monkeypatch.setattr(trainer.model, "meta_loss", flaky)
    with pytest.raises(TrainingError, match=r"loss must be finite; got nan at step 6.*last\.safetensors.*meta_lr"):
        trainer.fit()
    meta, _ = read_checkpoint(tmp_path / "run" / "last.safetensors")
    assert meta["step"] == 4
    last_line = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last_line)["loss"] is None


def test_learning_rate_schedules(tmp_path, synthetic_splits):
    t = Trainer(_cfg(tmp_path, meta_steps=100, lr_schedule="step", lr_step_size=10, lr_gamma=0.5,
                     meta_lr=0.1), splits=synthetic_splits)
    assert t.lr_at(0) == 0.1 and t.lr_at(9) == 0.1 and t.lr_at(10) == 0.05 and t.lr_at(25) == 0.025
    t = Trainer(_cfg(tmp_path, meta_steps=100, lr_schedule="cosine", warmup_steps=10, meta_lr=0.1),
                splits=synthetic_splits)
    assert t.lr_at(0) == pytest.approx(0.01) and t.lr_at(9) == pytest.approx(0.1)
    assert t.lr_at(10) == pytest.approx(0.1) and t.lr_at(55) == pytest.approx(0.05)
    assert t.lr_at(100) == pytest.approx(0.0, abs=1e-12)
    t = Trainer(_cfg(tmp_path, meta_steps=100, lr_schedule="linear", meta_lr=1.0), splits=synthetic_splits)
    assert t.lr_at(0) == 1.0 and t.lr_at(25) == pytest.approx(0.75) and t.lr_at(99) == pytest.approx(0.01)
    assert t.lr_at(100) == 0.0 and t.lr_at(150) == 0.0


def test_time_budget_stops_and_validates(tmp_path, synthetic_splits):
    t = Trainer(_cfg(tmp_path, meta_steps=10_000, max_minutes=1e-6, eval_every=10_000), splits=synthetic_splits)
    result = t.fit()
    assert 1 <= result.steps < 10_000 and result.best_val is not None


def test_resume_needs_a_resumable_checkpoint(tmp_path, synthetic_splits):
    t = Trainer(_cfg(tmp_path), splits=synthetic_splits)
    with pytest.raises(CheckpointError, match="resume needs an existing checkpoint"):
        t.fit(resume=True)
    t.fit()
    t2 = Trainer(_cfg(tmp_path), splits=synthetic_splits)
    with pytest.raises(CheckpointError, match="only model weights"):
        t2.resume(tmp_path / "run" / "best.safetensors")


def test_colour_folder_data_builds_a_three_channel_model(tmp_path):
    from conftest import write_image_tree

    root = write_image_tree(tmp_path / "rgb", n_classes=9, per_class=5, size=16, mode="RGB")
    cfg = make_config(tiny_config(tmp_path / "run", data={"root": str(root), "val_fraction": 0.34, "test_fraction": 0.33},
                                  task={"n_ways": 3}, eval={"n_ways": 3, "val_episodes": 2},
                                  train={"meta_steps": 2, "eval_every": 2}))
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert trainer.config.data.channels == 3
    model = metafit.load(result.checkpoint)
    assert model.run_config.data.channels == 3 and model.run_config.data.in_channels == 3


def test_bf16_autocast_training_matches_fp32_loss_closely(tmp_path, synthetic_splits):
    from metafit.training import build_model

    cfg = _cfg(tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = Trainer(cfg, splits=synthetic_splits).train_sampler.sample(2)
    fp32 = model.meta_loss(batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.meta_loss(batch)
    assert bf16.loss.dtype == torch.float32  # the prototype head runs in float32
    torch.testing.assert_close(bf16.loss, fp32, rtol=0.05, atol=0.02)
    bf16.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    result = Trainer(_cfg(tmp_path, "bf16", precision="bf16"), splits=synthetic_splits).fit()
    assert result.steps == 8 and result.best_val is not None


def test_vmap_execution_trains_with_the_default_channels_last_setting(tmp_path, synthetic_splits):
    """vmap over tasks cannot query memory formats: the trainer keeps the contiguous layout for it
    (on a GPU, where vmap is the default for MAML, this was a crash)."""
    cfg = make_config(tiny_config(tmp_path / "vm", algorithm={"name": "maml", "execution": "vmap", "inner_steps": 1},
                                  train={"meta_steps": 2, "eval_every": 2, "save_interval": 2, "channels_last": True}))
    trainer = Trainer(cfg, splits=synthetic_splits)
    assert not trainer.channels_last
    trainer.fit()
    assert trainer.step == 2


def test_reptile_with_inner_adam_resumes_exactly_and_loads(tmp_path, synthetic_splits):
    """Reptile's carried-over inner Adam moments are model state: checkpointed and resumed."""
    algo = {"name": "reptile", "inner_optimizer": "adam", "inner_lr": 0.001, "inner_batch_size": 5,
            "inner_steps": 2, "eval_inner_steps": 3}

    def cfg(name, steps):
        return make_config(tiny_config(tmp_path / name, algorithm=algo,
                                       train={"meta_steps": steps, "eval_every": 2, "save_interval": 2,
                                              "optimizer": "sgd", "meta_lr": 1.0}))

    straight = Trainer(cfg("straight", 4), splits=synthetic_splits)
    straight.fit()
    Trainer(cfg("halves", 2), splits=synthetic_splits).fit()
    resumed = Trainer(cfg("halves", 4), splits=synthetic_splits)
    resumed.fit(resume=True)
    assert int(straight.model.inner_adam.t) == 8
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    loaded = metafit.load(tmp_path / "straight" / "last.safetensors")
    assert torch.equal(loaded.algorithm.inner_adam.t, straight.model.inner_adam.t)
