"""Config validation: unknown keys and invalid values are rejected with the valid choices."""

from __future__ import annotations

import pytest

from metafit import ConfigError
from metafit.training import builtin_configs, load_config, make_config


@pytest.mark.parametrize("data, match", [
    ({"trian": {}}, "unknown key 'trian'; valid keys here: seed, out_dir, data, task, eval"),
    ({"task": {"n_way": 5}}, "unknown key 'task.n_way'; valid keys here: n_ways, k_shots"),
    ({"train": {"optimizer": "adamw"}}, "train.optimizer must be one of 'adam' or 'sgd'; got 'adamw'"),
    ({"train": {"meta_lr": 0}}, "train.meta_lr must be greater than 0; got 0"),
    ({"task": {"n_ways": 1}}, "task.n_ways must be greater than or equal to 2; got 1"),
    ({"data": {"protocol": "lakes"}}, "data.protocol must be one of 'vinyals', 'lake'"),
    ({"backbone": {"bn_mode": "frozen"}}, "backbone.bn_mode must be one of 'running' or 'transductive'"),
    ({"backbone": {"name": "resnet99"}}, "backbone.name must be one of \\['conv4', 'ensemble', 'hf', 'mlp', 'resnet12', 'timm', 'torchvision'\\]"),
    ({"algorithm": {"name": "mamll"}}, "algorithm.name must be one of \\[.*'maml'.*'protonet'"),
    ({"train": {"meta_steps": "many"}}, "train.meta_steps must be a valid integer"),
    ({"train": "fast"}, "train must be a valid dictionary"),
])
def test_invalid_configs_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        make_config(data)


def test_every_builtin_config_is_valid():
    names = builtin_configs()
    assert {"omniglot_protonet_5w1s", "omniglot_protonet_5w5s", "omniglot_protonet_20w1s",
            "omniglot_protonet_20w5s"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.algorithm.name in name and cfg.data.name in name  # e.g. omniglot_maml_5w1s


# the training warps of the within-alphabet recipes: the ranges of ProtoNet's test-time views
_STROKES = ["augment.affine=true", "augment.scale_min=0.85", "augment.scale_max=1.15", "augment.shear=10"]


def test_stroke_warps_of_the_lake_recipes_match_the_test_time_views():
    from metafit.algorithms.protonet import TEST_VIEW_WARP
    aug = load_config("omniglot_protonet_lake_within").augment
    assert aug.affine and (aug.degrees, aug.translate, (aug.scale_min, aug.scale_max), aug.shear) == (
        TEST_VIEW_WARP["degrees"], TEST_VIEW_WARP["translate"], TEST_VIEW_WARP["scale"], TEST_VIEW_WARP["shear"])


@pytest.mark.parametrize("name, parent, overrides", [
    ("omniglot_maml_5w1s_hour", "omniglot_maml_5w1s", ["train.meta_steps=12500", "train.lr_schedule=cosine"]),
    ("omniglot_protonet_lake_within", "omniglot_protonet_lake",
     ["task.within_group=true", "train.meta_steps=36000", "train.lr_step_size=7200", "train.eval_every=4000",
      "train.save_interval=4000", "train.max_minutes=60", "algorithm.test_views=16", *_STROKES,
      "backbone.hidden_channels=96", "task.n_queries=3", "backbone.bn_group_size=64"]),
    ("omniglot_protonet_small_within", "omniglot_protonet_small",
     ["data.reflections=true", "task.within_group=true", "train.meta_steps=20000", "train.lr_step_size=4000", "train.eval_every=2000",
      "train.save_interval=4000", "train.max_minutes=60", "algorithm.test_views=16", *_STROKES,
      "backbone.hidden_channels=96", "task.n_queries=3", "backbone.bn_group_size=64"]),
])
def test_derived_configs_are_their_parent_with_the_documented_overrides(name, parent, overrides):
    # docs/benchmarks.md reports these recipes as the parent config plus these overrides
    derived = load_config(name).model_dump()
    expected = load_config(parent, [*overrides, f"out_dir={derived['out_dir']}"]).model_dump()
    assert derived == expected


def test_overrides_are_typed_and_validated(tmp_path):
    cfg = load_config("omniglot_protonet_5w1s", ["train.meta_lr=0.01", "task.within_group=true", "train.grad_clip=null"])
    assert cfg.train.meta_lr == 0.01 and cfg.task.within_group is True and cfg.train.grad_clip is None
    with pytest.raises(ConfigError, match="unknown key 'train.metalr'"):
        load_config("omniglot_protonet_5w1s", ["train.metalr=0.01"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config("omniglot_protonet_5w1s", ["train.meta_lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="must be valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="Built-in configs: .*omniglot_protonet_20w1s"):
        load_config(tmp_path / "missing.yaml")


def test_config_round_trips_through_dict():
    cfg = load_config("omniglot_protonet_20w5s")
    assert make_config(cfg.to_dict()) == cfg


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="the config must be a mapping of keys to values"):
        make_config(["not", "a", "mapping"])
    assert make_config(None) == make_config({})
