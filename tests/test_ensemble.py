"""Ensembles: the ``ensemble`` backbone and ``metafit ensemble`` (checkpoints combined into one)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import tiny_config, write_image_tree
from metafit import ConfigError
from metafit.cli import main
from metafit.nn import backbone_config, build_backbone, count_backbone_weights
from metafit.training import build_model, ensemble_checkpoints, load, make_config, save_checkpoint
from metafit.types import Task


def _members(widths=(8, 4)) -> dict:
    return {"name": "ensemble", "members": [{"name": "conv4", "hidden_channels": w} for w in widths]}


def test_features_are_the_members_scaled_so_distances_average():
    torch.manual_seed(0)
    net = build_backbone(backbone_config(_members()), 1, 16).eval()
    assert net.out_features == 12 and count_backbone_weights(backbone_config(_members()), 1, 16) == sum(
        p.numel() for p in net.parameters())
    a, b = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    fa, fb = net(a), net(b)
    assert torch.allclose(fa, torch.cat([m(a) for m in net.members], -1) / 2 ** 0.5)
    mean_of_members = sum(((m(a) - m(b)) ** 2).sum(-1) for m in net.members) / 2
    assert torch.allclose(((fa - fb) ** 2).sum(-1), mean_of_members, rtol=1e-5)


@pytest.mark.parametrize("members,message", [
    ([{"name": "conv4"}], "backbone.members list should have at least 2 items"),
    ([{"hidden_channels": 0}, {}], "member 0 is invalid (Config: backbone.hidden_channels must be greater than or "
                                   "equal to 1; got 0."),
    ([{}, {"name": "ensemble", "members": [{}, {}]}], "member 1 must be a single backbone, not another ensemble"),
    ([{}, {"name": "conv5"}], "member 1 is invalid (Config: backbone.name must be one of"),
])
def test_invalid_members_are_named(members, message):
    with pytest.raises(ConfigError) as err:
        backbone_config({"name": "ensemble", "members": members})
    assert message in str(err.value) and "backbone.members" in str(err.value)


def _checkpoint(tmp_path, name: str, seed: int, **sections):
    cfg = make_config(tiny_config(tmp_path / name, seed=seed, **sections))
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # BatchNorm statistics that differ between members, as training leaves them
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None:
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return save_checkpoint(tmp_path / f"{name}.safetensors", model, cfg, step=7, metrics={"val": 0.5})


def _task(seed: int = 1) -> Task:
    g = torch.Generator().manual_seed(seed)
    return Task(torch.rand(5, 1, 16, 16, generator=g), torch.arange(5), torch.rand(15, 1, 16, 16, generator=g),
                torch.arange(5).repeat(3), 5)


def test_protonet_ensemble_scores_the_mean_of_its_members_logits(tmp_path):
    paths = [_checkpoint(tmp_path, f"m{i}", seed=i) for i in range(3)]
    out = ensemble_checkpoints(paths, tmp_path / "ens.safetensors")
    ens, members = load(out), [load(p) for p in paths]
    task = _task()
    with torch.no_grad():
        expected = sum(m.task_logits(task) for m in members) / 3
        got = ens.task_logits(task)
        assert torch.allclose(got, expected, atol=1e-5)
        adapted = ens.adapt(task.support_x, task.support_y, 5)
        assert torch.allclose(ens.predict(adapted, task.query_x), expected, atol=1e-5)
    cfg = ens.run_config
    assert cfg.backbone.name == "ensemble" and [m["weights"] for m in cfg.backbone.members] == [
        str(p.resolve()) for p in paths]
    assert cfg.algorithm == members[0].run_config.algorithm and cfg.seed == 0
    record = ens.checkpoint_meta["metrics"]["ensemble"]
    assert [r["checkpoint"] for r in record] == [str(p) for p in paths] and record[1]["step"] == 7
    # the config alone rebuilds it: every member reads its weights from the checkpoint it names
    rebuilt = build_model(cfg)
    assert len(rebuilt.weights_report) == 3 and all(r.complete for r in rebuilt.weights_report)
    for k, v in ens.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k


def test_members_that_cannot_share_one_head_are_refused(tmp_path):
    a = _checkpoint(tmp_path, "a", seed=0)
    with pytest.raises(ConfigError, match=r"Ensemble: checkpoints must be 2 to 16 paths; got 1\."):
        ensemble_checkpoints([a], tmp_path / "e.safetensors")
    maml = _checkpoint(tmp_path, "maml", seed=1, algorithm={"name": "maml"})
    with pytest.raises(ConfigError, match="every member must have the first member's algorithm, 'protonet'; got 'maml'"):
        ensemble_checkpoints([a, maml], tmp_path / "e.safetensors")
    maml2 = _checkpoint(tmp_path, "maml2", seed=2, algorithm={"name": "maml"})
    with pytest.raises(ConfigError, match="learned tensors outside the backbone must be equal in every member; got a "
                                          "different 'head.weight'"):
        ensemble_checkpoints([maml, maml2], tmp_path / "e.safetensors")
    big = _checkpoint(tmp_path, "big", seed=3, data={"image_size": 20})
    with pytest.raises(ConfigError, match=r"the first member's input size, \(1, 16\); got \(1, 20\)"):
        ensemble_checkpoints([a, big], tmp_path / "e.safetensors")
    ens = ensemble_checkpoints([a, _checkpoint(tmp_path, "b", seed=4)], tmp_path / "e.safetensors")
    with pytest.raises(ConfigError, match="every member must have a single backbone; got an ensemble"):
        ensemble_checkpoints([ens, a], tmp_path / "e2.safetensors")
    assert not (tmp_path / "e2.safetensors").exists()


def test_cli_ensemble_then_eval(tmp_path, capsys):
    data = write_image_tree(tmp_path / "data", n_classes=12, per_class=6, size=16, groups=2)
    paths = []
    for seed in (0, 1, 2):  # the third splits the classes otherwise
        cfg = tiny_config(tmp_path / f"run{seed}", seed=seed, data={"root": str(data), "val_fraction": 0.25,
                                                                   "test_fraction": 0.25, "split_seed": seed // 2})
        cfg["eval"].update({"n_ways": 3, "val_episodes": 4, "test_episodes": 6})
        cfg["task"]["n_ways"] = 3
        (tmp_path / f"c{seed}.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train", str(tmp_path / f"c{seed}.yaml"), "--no-test", "--set", "train.meta_steps=2"]) == 0
        paths.append(str(tmp_path / f"run{seed}" / "best.safetensors"))
    capsys.readouterr()
    out = str(tmp_path / "ens.safetensors")
    assert main(["ensemble", *paths[:2], "--out", out]) == 0
    text = capsys.readouterr().out
    assert "ensemble of 2 protonet members (conv4, conv4; 16 features)" in text and f"metafit eval {out}" in text
    assert main(["eval", out, "--episodes", "5", "--json", str(tmp_path / "e.json"),
                 "--set", "algorithm.transductive_steps=2"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["episodes"] == 5
    assert main(["ensemble", paths[0], "--out", out]) == 1
    assert "Ensemble: checkpoints must be 2 to 16 paths; got 1." in capsys.readouterr().err
    assert main(["ensemble", *paths, "--out", str(tmp_path / "e3.safetensors")]) == 1
    assert "every member must have been trained on the first member's class split; got another in " \
        f"{paths[2]!r}" in capsys.readouterr().err
