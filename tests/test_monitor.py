"""Monitoring: loss and gradient-norm spikes and non-finite steps, under the warn / skip / rollback
policies, recorded in the log; TensorBoard event files beside it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from metafit import ConfigError, TrainingError
from metafit.algorithms import MetaOutput
from metafit.training import Trainer, make_config, read_checkpoint
from metafit.training.monitor import Monitor, MonitorConfig


def _cfg(tmp_path, monitor=None, **train):
    t = {"meta_steps": 30, "eval_every": 10, "save_interval": 10, "log_every": 5, "meta_lr": 1e-3}
    t.update(train)
    return make_config(tiny_config(tmp_path / "run", train=t,
                                   monitor={"min_history": 5, "window": 20, **(monitor or {})}))


def _spike_at(trainer, monkeypatch, steps: set[int], factor=float(1e4)):
    """Multiply the meta-loss (and so the gradients) of the given calls by ``factor``."""
    real = trainer.model.meta_loss
    calls = {"n": 0}

    def spiky(batch):
        calls["n"] += 1
        out = real(batch)
        return MetaOutput(out.loss * factor, out.accuracy) if calls["n"] in steps else out

    monkeypatch.setattr(trainer.model, "meta_loss", spiky)
    return calls


def _rows(tmp_path, split):
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_monitor_flags_spikes_only_after_enough_history():
    m = Monitor(MonitorConfig(min_history=5, window=10, loss_spike=6.0, grad_spike=10.0))
    assert m.check(100.0, 1e6) == []  # nothing to compare with yet
    for i in range(5):
        m.accept(1.0 + 0.01 * i, 2.0 + 0.1 * i)
    assert m.check(1.03, 2.2) == []
    events = {f.event for f in m.check(50.0, 2.0)}
    assert events == {"loss_spike"}
    assert {f.event for f in m.check(1.0, 100.0)} == {"grad_spike"}
    assert {f.event for f in m.check(float("nan"), 1.0)} == {"nonfinite_loss"}
    assert {f.event for f in m.check(1.0, float("inf"))} == {"nonfinite_grad"}
    # a falling loss is never a spike
    assert m.check(0.1, 2.0) == []
    limit = Monitor(MonitorConfig(max_grad_norm=5.0))
    assert [f.event for f in limit.check(1.0, 6.0)] == ["grad_norm_limit"]


def test_warn_policy_logs_the_spike_and_applies_the_step(tmp_path, synthetic_splits, monkeypatch):
    trainer = Trainer(_cfg(tmp_path, {"policy": "warn"}), splits=synthetic_splits)
    _spike_at(trainer, monkeypatch, {12})
    trainer.fit()
    rows = _rows(tmp_path, "monitor")
    assert rows and {r["step"] for r in rows} == {12} and {r["action"] for r in rows} == {"apply"}
    assert {"loss_spike", "grad_spike"} <= {r["event"] for r in rows}
    assert trainer.events["flagged"] == 1 and trainer.events["skipped"] == 0


def test_skip_policy_drops_the_update_of_the_spiking_step(tmp_path, synthetic_splits, monkeypatch):
    trainer = Trainer(_cfg(tmp_path, {"policy": "skip"}, meta_steps=12), splits=synthetic_splits)
    _spike_at(trainer, monkeypatch, {12})
    real_step = trainer.optimizer.step
    seen = []
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: (seen.append(trainer.step + 1), real_step(*a, **k)))
    trainer.fit()
    assert trainer.step == 12 and 12 not in seen and seen == list(range(1, 12))
    assert [r["action"] for r in _rows(tmp_path, "monitor")][0] == "skip"
    assert trainer.events["skipped"] == 1


def test_rollback_policy_reloads_the_last_checkpoint_and_continues_with_new_tasks(tmp_path, synthetic_splits,
                                                                                 monkeypatch):
    trainer = Trainer(_cfg(tmp_path, {"policy": "rollback"}), splits=synthetic_splits)
    calls = _spike_at(trainer, monkeypatch, {15})
    loaded = []
    real_restore = trainer.loop.restore
    monkeypatch.setattr(trainer.loop, "restore", lambda path, everything: (loaded.append(path.name), real_restore(path, everything)))
    trainer.fit()
    assert loaded == ["last.safetensors"] and trainer.step == 30
    assert calls["n"] == 30 + 5  # steps 11..15 ran again (with new tasks) after returning to step 10
    rollback = [r for r in _rows(tmp_path, "monitor") if r["event"] == "rollback"]
    assert rollback == [{**rollback[0], "step": 15, "to_step": 10}]
    meta, _ = read_checkpoint(tmp_path / "run" / "last.safetensors")
    assert meta["train_state"]["events"]["rolled_back"] == 1


def test_rollback_before_any_checkpoint_returns_to_the_initial_weights(tmp_path, synthetic_splits, monkeypatch):
    trainer = Trainer(_cfg(tmp_path, {"policy": "rollback", "min_history": 3}), splits=synthetic_splits)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    _spike_at(trainer, monkeypatch, {6})
    restored = {}
    real_restore = trainer.loop.restore

    def spy(path, everything):
        real_restore(path, everything)
        restored.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    monkeypatch.setattr(trainer.loop, "restore", spy)
    trainer.fit()
    assert restored and all(torch.equal(start[k], restored[k]) for k in start)


def test_too_many_rollbacks_or_flagged_steps_stop_with_a_clear_error(tmp_path, synthetic_splits, monkeypatch):
    trainer = Trainer(_cfg(tmp_path, {"policy": "rollback", "max_rollbacks": 1}), splits=synthetic_splits)
    _spike_at(trainer, monkeypatch, {12, 14})
    with pytest.raises(TrainingError, match=r"max_rollbacks=1.*meta_lr"):
        trainer.fit()
    trainer = Trainer(_cfg(tmp_path, {"policy": "skip", "patience": 2}), splits=synthetic_splits)
    _spike_at(trainer, monkeypatch, {12, 13, 14})
    with pytest.raises(TrainingError, match=r"monitor.patience=2.*3 in a row"):
        trainer.fit(overwrite=True)  # the first case's run folder is replaced


def test_skip_policy_steps_over_a_nan_batch(tmp_path, synthetic_splits, monkeypatch):
    trainer = Trainer(_cfg(tmp_path, {"policy": "skip"}, meta_steps=10), splits=synthetic_splits)
    _spike_at(trainer, monkeypatch, {3}, factor=float("nan"))
    trainer.fit()
    assert trainer.step == 10
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert _rows(tmp_path, "monitor")[0]["event"] == "nonfinite_loss"


def test_monitor_config_is_validated():
    with pytest.raises(ConfigError, match="policy"):
        make_config({"monitor": {"policy": "ignore"}})
    with pytest.raises(ConfigError, match="grad_spike"):
        make_config({"monitor": {"grad_spike": 0.5}})


def test_tensorboard_event_files_hold_the_training_scalars(tmp_path, synthetic_splits):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(_cfg(tmp_path, meta_steps=10), splits=synthetic_splits).fit()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "train/lr", "train/grad_norm", "train/step_s",
            "val/accuracy", "val/loss", "val/ci95"} <= tags
    logged = {r["step"]: r["loss"] for r in _rows(tmp_path, "train")}
    assert {e.step: pytest.approx(e.value, rel=1e-6) for e in acc.Scalars("train/loss")} == logged


def test_tensorboard_can_be_turned_off(tmp_path, synthetic_splits):
    Trainer(_cfg(tmp_path, meta_steps=4, tensorboard=False), splits=synthetic_splits).fit()
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_flagged_step_is_printed_once(tmp_path):
    """Console output once per finding (it was printed twice: by tqdm and by logging's
    last-resort handler when nobody configured logging); a subprocess, because pytest's own log
    capture would hide the second copy."""
    import subprocess
    import sys
    from pathlib import Path
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import conftest
from metafit.training import Trainer, make_config
data = conftest.synthetic_classes(n_classes=30); ids = torch.arange(data.n_classes)
splits = {{"train": data.subset(ids[:18]), "val": data.subset(ids[18:24]), "test": data.subset(ids[24:])}}
cfg = make_config(conftest.tiny_config({str(tmp_path / "run")!r}, train={{"meta_steps": 6, "eval_every": 6,
    "save_interval": 6, "tensorboard": False}}, monitor={{"grad_spike": 1.0001, "over_recent_max": None, "min_history": 3,
    "patience": 100}}))
Trainer(cfg, splits=splits).fit()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    printed = [line for line in (out.stdout + out.stderr).splitlines() if "spike" in line]
    flagged = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
               if r["split"] == "monitor"]
    assert flagged and len(printed) == len(flagged), (printed, flagged)
