"""The contract every registered algorithm meets (parametrised over the registry)."""

from __future__ import annotations

import typing

import pytest
import torch
from annotated_types import Ge, Gt, Le, Lt

from conftest import synthetic_classes, tiny_config
from metafit import ConfigError
from metafit.algorithms import ALGORITHMS, algorithm_config
from metafit.data import ClassBatchSampler, EpisodeSampler
from metafit.training import Trainer, build_model, load, make_config, save_checkpoint

NAMES = sorted(ALGORITHMS)


def _alg(name) -> dict:
    """The algorithm section of a tiny model; pretraining algorithms need their base-class count
    (the trainer fills it in from the data)."""
    return {"name": name, **({"n_base_classes": 10} if ALGORITHMS[name].training_data == "batches" else {})}


def _training_batch(model, seed=1):
    """What ``meta_loss`` trains on: two 5-way episodes, or a mini-batch of base-class images."""
    data = synthetic_classes(n_classes=10, size=16)
    if model.training_data == "batches":
        return ClassBatchSampler(data, seed=seed).sample(8)
    return EpisodeSampler(data, 5, 1, 3, seed=seed).sample(2)


def _model(name, tmp_path):
    cfg = make_config(tiny_config(tmp_path, algorithm=_alg(name)))
    torch.manual_seed(0)
    return build_model(cfg), cfg


def _task(n_ways=5, k=2, q=3, seed=0):
    data = synthetic_classes(n_classes=10, size=16, seed=seed)
    return EpisodeSampler(data, n_ways, k, q, seed=seed).sample_task()


@pytest.mark.parametrize("name", NAMES)
def test_builds_from_defaults(name):
    cfg = algorithm_config({"name": name})
    assert cfg.name == name
    assert make_config({"algorithm": {"name": name}}).algorithm == cfg


@pytest.mark.parametrize("name", NAMES)
def test_adapt_predict_shapes(name, tmp_path):
    model, _ = _model(name, tmp_path)
    model.eval()
    task = _task()
    adapted = model.adapt(task.support_x, task.support_y, task.n_ways)
    logits = model.predict(adapted, task.query_x)
    assert logits.shape == (task.query_x.shape[0], task.n_ways)
    assert model.task_logits(task).shape == logits.shape
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_meta_loss_fills_finite_gradients(name, tmp_path):
    model, _ = _model(name, tmp_path)
    out = model.meta_loss(_training_batch(model))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_learns_a_toy_task(name, tmp_path, synthetic_splits):
    cfg = make_config(tiny_config(tmp_path, algorithm={"name": name},
                                  train={"meta_steps": 60, "eval_every": 60, "save_interval": 60, "meta_lr": 3e-3}))
    trainer = Trainer(cfg, splits=synthetic_splits)
    before = trainer.validate().mean
    trainer.fit()
    after = trainer.validate().mean
    assert after > before + 0.1, (before, after)
    assert after > 0.6  # chance is 0.2


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(name, tmp_path):
    model, cfg = _model(name, tmp_path)
    model.eval()
    task = _task()
    path = save_checkpoint(tmp_path / "m.safetensors", model, cfg, step=3)
    loaded = load(path)
    assert type(loaded) is type(model) and loaded.run_config == cfg
    torch.testing.assert_close(loaded.task_logits(task), model.task_logits(task), rtol=0, atol=0)


def _invalid_values(field) -> list:
    """Values that violate a field's declared constraint."""
    ann = field.annotation
    if typing.get_origin(ann) is typing.Literal:
        return ["not-a-valid-choice"]
    out = []
    for m in field.metadata:
        if isinstance(m, Ge):
            out.append(m.ge - 1)
        if isinstance(m, Gt):
            out.append(m.gt - (1 if isinstance(m.gt, int) else 0.0))
        if isinstance(m, Le):
            out.append(m.le + 1)
        if isinstance(m, Lt):
            out.append(m.lt + 1)
    if ann is bool:
        out.append("maybe")
    return out


@pytest.mark.parametrize("name", NAMES)
def test_rejects_each_invalid_config_value(name):
    cls = ALGORITHMS[name].Config
    checked = 0
    for field_name, field in cls.model_fields.items():
        for bad in _invalid_values(field):
            with pytest.raises(ConfigError) as err:
                algorithm_config({"name": name, field_name: bad})
            assert f"algorithm.{field_name}" in str(err.value)
            checked += 1
    with pytest.raises(ConfigError, match="unknown key 'algorithm.no_such_field'"):
        algorithm_config({"name": name, "no_such_field": 1})
    assert checked >= 1
