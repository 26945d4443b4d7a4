"""Trainer: exact resume, divergence guard, checkpoints kept, logs, schedules."""

from __future__ import annotations

import csv
import dataclasses
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


def _averaged(states, decay):
    """torch's EMA of a list of state dicts (the first is copied)."""
    avg = {k: v.double().clone() for k, v in states[0].items()}
    for s in states[1:]:
        for k in avg:
            avg[k] = decay * avg[k] + (1 - decay) * s[k].double()
    return avg


def _model_tensors(path, prefix="model."):
    _, tensors = read_checkpoint(path)
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def test_weight_average_follows_the_updates_keeps_the_better_and_leaves_training_unchanged(
        tmp_path, synthetic_splits, monkeypatch):
    from metafit.training.supervised import SupervisedRun

    # the average scores higher at every validation (the second evaluation of each): best.safetensors keeps it
    real, calls = SupervisedRun.evaluate, []

    def evaluate(self):
        res = real(self)
        calls.append(res)
        return dataclasses.replace(res, mean=0.9 if len(calls) % 2 == 0 else 0.1)

    monkeypatch.setattr(SupervisedRun, "evaluate", evaluate)
    running = {"backbone": {"name": "conv4", "hidden_channels": 8, "bn_mode": "running"}}
    common = dict(meta_steps=4, eval_every=4, save_interval=1)
    plain = Trainer(make_config(tiny_config(tmp_path / "plain", **running, train={**common})), splits=synthetic_splits)
    plain.fit()
    calls.clear()
    cfg = make_config(tiny_config(tmp_path / "avg", **running, train={**common, "weight_average": 0.75}))
    Trainer(cfg, splits=synthetic_splits).fit()
    out = tmp_path / "avg"
    # the live weights train exactly as without the average
    live, plain_live = _model_tensors(out / "last.safetensors"), _model_tensors(tmp_path / "plain" / "last.safetensors")
    assert live.keys() == plain_live.keys() and all(torch.equal(live[k], plain_live[k]) for k in live), \
        [k for k in live if not torch.equal(live[k], plain_live[k])]
    # the average is torch's EMA of the live weights after every update, BatchNorm statistics included
    steps = [_model_tensors(out / f"step-{i:07d}.safetensors") for i in range(1, 5)]
    expected = _averaged([{k: v for k, v in s.items() if v.is_floating_point()} for s in steps], 0.75)
    stored = _model_tensors(out / "last.safetensors", "average.")
    assert set(stored) - {"n_averaged"} == set(expected) and any("running_var" in k for k in expected)
    assert int(stored["n_averaged"]) == 4
    for k, v in expected.items():
        torch.testing.assert_close(stored[k].double(), v, rtol=1e-6, atol=1e-7)
    meta, _ = read_checkpoint(out / "best.safetensors")
    assert meta["metrics"]["weights"] == "average" and meta["step"] == 4
    best = _model_tensors(out / "best.safetensors")
    for k, v in expected.items():
        torch.testing.assert_close(best[k].double(), v, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(best[k], steps[-1][k]) for k in expected)  # not the live weights of step 4
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert val and all("accuracy_average" in r for r in val)


def test_weight_average_resumes_exactly_and_needs_a_run_that_kept_one(tmp_path, synthetic_splits):
    extra = dict(weight_average=0.9)
    Trainer(_cfg(tmp_path, "straight", **extra), splits=synthetic_splits).fit()
    Trainer(_cfg(tmp_path, "halves", meta_steps=4, **extra), splits=synthetic_splits).fit()
    Trainer(_cfg(tmp_path, "halves", **extra), splits=synthetic_splits).fit(resume=True)
    (ma, a), (mb, b) = (read_checkpoint(tmp_path / n / "last.safetensors") for n in ("straight", "halves"))
    averages = [k for k in a if k.startswith("average.")]
    assert averages and int(a["average.n_averaged"]) == 8
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert ma["train_state"]["run"]["best_weights"] == mb["train_state"]["run"]["best_weights"]
    Trainer(_cfg(tmp_path, "without", meta_steps=4), splits=synthetic_splits).fit()
    with pytest.raises(CheckpointError, match="resume with train.weight_average needs the average"):
        Trainer(_cfg(tmp_path, "without", **extra), splits=synthetic_splits).fit(resume=True)
