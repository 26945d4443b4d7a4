"""A model built in Python trains, checkpoints and reloads through the same path as a config:
``Trainer(algorithm=..., data=..., optimizer=..., loop=...)`` over a backbone from the backbone
registry (:func:`metafit.nn.register_backbone`), ``metafit.load`` rebuilding it; a registered
backbone is also a ``backbone.name`` of configs; an unregistered module is refused at save time
with a one-line error that says how to register it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import metafit
from conftest import tiny_config
from metafit import ConfigError
from metafit.algorithms import ProtoNetConfig, algorithm_config, build_algorithm
from metafit.nn import BACKBONES, backbone_spec, register_backbone, unregister_backbone
from metafit.training import OptimizerSettings, Trainer, make_config, make_sampler, save_checkpoint, train

LOOP = {"meta_steps": 4, "eval_every": 2, "save_interval": 2, "log_every": 2, "progress": False, "device": "cpu",
        "tensorboard": False}
TASK = {"n_ways": 5, "k_shots": 1, "n_queries": 3}


def tiny_cnn(in_channels: int, image_size: int, width: int = 8, pool: str = "avg") -> nn.Module:
    """A backbone written for this test: conv, ReLU, pooled to a vector."""
    net = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2) if pool == "avg" else nn.AdaptiveMaxPool2d(2), nn.Flatten())
    net.out_features = 4 * width
    return net


class TinyNet(nn.Module):
    """The same backbone as a class."""

    def __init__(self, in_channels: int, width: int = 4) -> None:
        super().__init__()
        self.body = tiny_cnn(in_channels, 0, width)
        self.out_features = self.body.out_features

    def forward(self, x):
        return self.body(x)


@pytest.fixture
def registered():
    factory = register_backbone("test-tiny-cnn", tiny_cnn)
    register_backbone("test-tiny-net", TinyNet)
    yield factory
    unregister_backbone("test-tiny-cnn")
    unregister_backbone("test-tiny-net")
    assert "test-tiny-cnn" not in BACKBONES and "conv4" in BACKBONES


def _predictions(algorithm, splits, config):
    """Query logits of two fixed test episodes, the algorithm in eval mode."""
    sampler = make_sampler(splits["test"], config, "test", 0)
    algorithm.eval()
    out = []
    with torch.no_grad():
        for task in sampler.tasks(sampler.fixed_episodes(2, 7)):
            adapted = algorithm.adapt(task.support_x, task.support_y, config.eval.n_ways)
            out.append(algorithm.predict(adapted, task.query_x))
    return torch.cat(out)


def test_a_python_built_model_trains_checkpoints_and_reloads_with_metafit_load(tmp_path, synthetic_splits, registered):
    torch.manual_seed(0)
    backbone = registered(1, 16, width=6)
    assert backbone_spec(backbone).model_dump(exclude={"weights", "weights_prefix", "weights_strict"}) == {
        "name": "test-tiny-cnn", "width": 6, "pool": "avg"}
    model = build_algorithm(ProtoNetConfig(), backbone, n_outputs=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(algorithm=model, data=synthetic_splits, optimizer=OptimizerSettings(meta_lr=0.01),
                      loop=LOOP, task=TASK, eval={**TASK, "val_episodes": 4}, out_dir=tmp_path / "run")
    assert trainer.model is model  # the model itself is trained, not a rebuilt copy
    result = trainer.fit()
    assert result.steps == 4 and result.best_val is not None
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    out = tmp_path / "run"
    assert {"best.safetensors", "last.safetensors", "step-0000002.safetensors", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()}
    stored = json.loads((out / "config.json").read_text())
    assert stored["backbone"]["name"] == "test-tiny-cnn" and stored["backbone"]["width"] == 6
    assert stored["algorithm"]["name"] == "protonet" and stored["train"]["meta_lr"] == 0.01

    loaded = metafit.load(out / "last.safetensors")
    assert isinstance(loaded.algorithm.backbone, nn.Sequential)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.algorithm.state_dict()[k], v), k
    # the same predictions (the trained copy runs channels_last: float rounding differs in the last bits)
    torch.testing.assert_close(_predictions(loaded.algorithm, synthetic_splits, trainer.config),
                               _predictions(model, synthetic_splits, trainer.config), rtol=1e-5, atol=1e-5)
    # the same run resumes exactly like a config-built one
    again = Trainer(algorithm=build_algorithm(ProtoNetConfig(), registered(1, 16, width=6)), data=synthetic_splits,
                    optimizer={"meta_lr": 0.01}, loop={**LOOP, "meta_steps": 6}, task=TASK,
                    eval={**TASK, "val_episodes": 4}, out_dir=tmp_path / "run")
    again.fit(resume=True)
    assert again.step == 6 and again.best_step >= result.best_step


def test_train_reports_on_a_python_built_trainer(tmp_path, synthetic_splits, registered):
    model = build_algorithm(ProtoNetConfig(), TinyNet(1, width=3), n_outputs=5)
    trainer = Trainer(algorithm=model, data=synthetic_splits, loop=LOOP, task=TASK,
                      eval={**TASK, "val_episodes": 4, "test_episodes": 6, "calibrate": False},
                      out_dir=tmp_path / "cls")
    report = train(trainer)
    assert report["steps"] == 4 and report["test"]["episodes"] == 6
    loaded = metafit.load(report["best_checkpoint"])
    assert loaded.run_config.backbone.name == "test-tiny-net" and loaded.run_config.backbone.width == 3


def test_a_registered_backbone_is_a_config_backbone_too(tmp_path, synthetic_splits, registered):
    def config(**backbone):
        return {**tiny_config(tmp_path / "cfg", train={"meta_steps": 2, "eval_every": 2, "save_interval": 2}),
                "backbone": {"name": "test-tiny-cnn", **backbone}}  # (tiny_config's conv4 section replaced)

    cfg = make_config(config(width=5, pool="max"))
    assert cfg.backbone.width == 5
    trainer = Trainer(cfg, splits=synthetic_splits)
    assert isinstance(trainer.model.backbone[3], nn.AdaptiveMaxPool2d)
    result = trainer.fit()
    loaded = metafit.load(result.checkpoint)
    assert backbone_spec(loaded.algorithm.backbone).width == 5
    with pytest.raises(ConfigError, match=r"unknown key 'backbone.depth'; valid keys here: name, .*width, pool"):
        make_config(config(depth=3))
    with pytest.raises(ConfigError, match="backbone.width"):
        make_config(config(width="wide"))


def test_an_unregistered_module_is_refused_with_how_to_register_it(tmp_path, synthetic_splits):
    model = build_algorithm(ProtoNetConfig(), tiny_cnn(1, 16), n_outputs=5)  # the plain function: not registered
    with pytest.raises(ConfigError) as err:
        Trainer(algorithm=model, data=synthetic_splits, loop=LOOP, out_dir=tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and message.startswith("Checkpoint: the backbone must be rebuildable")
    assert "got an unregistered Sequential" in message and "metafit.nn.register_backbone(name, factory)" in message
    config = make_config(tiny_config(tmp_path / "run"))
    with pytest.raises(ConfigError, match="unregistered Sequential.*register_backbone"):
        save_checkpoint(tmp_path / "x.safetensors", model, config, step=0)
    assert not (tmp_path / "x.safetensors").exists()


def test_registering_is_checked():
    with pytest.raises(ConfigError, match="name must be a new backbone name; got 'conv4' \\(built in\\)"):
        register_backbone("conv4", tiny_cnn)

    def star(in_channels, *layers):
        return nn.Identity()

    with pytest.raises(ConfigError, match="settings of factory 'star' must be named parameters"):
        register_backbone("star", star)
    assert "star" not in BACKBONES
    model = build_algorithm(algorithm_config({"name": "protonet"}), tiny_cnn(1, 16), n_outputs=5)
    assert backbone_spec(model.backbone) is None
