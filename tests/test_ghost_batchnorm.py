"""Ghost batch norm (``backbone.bn_group_size``): in training the backbone runs on strided groups of
the batch, each normalised with its own statistics; results come back in the batch's order, the
evaluation path is unchanged, and meta-gradients through it are exact (float64 finite differences)."""

from __future__ import annotations

import pytest
import torch

from metafit.algorithms import algorithm_config, build_algorithm
from metafit.nn import Conv4, Conv4Config, ResNet12, ResNet12Config
from metafit.nn.layers import ghost_batches
from test_gradient_meta import _assert_meta_gradient_matches_fd, _batch


def _backbones(group):
    torch.manual_seed(0)
    conv4 = Conv4(Conv4Config(hidden_channels=4, n_blocks=2, bn_group_size=group), 1, 8)
    resnet = ResNet12(ResNet12Config(channels=[4, 4, 4, 4], bn_group_size=group), 1, 16)
    return [(conv4, 8), (resnet, 16)]


@pytest.mark.parametrize("n,group,groups", [(10, 4, 3), (12, 4, 3), (7, 3, 3), (9, 8, 2)])
def test_groups_are_strided_samples_normalised_on_their_own(n, group, groups):
    for (ghost, size), (plain, _) in zip(_backbones(group), _backbones(0)):
        plain.load_state_dict(ghost.state_dict())
        x = torch.randn(n, 1, size, size, dtype=torch.float64)
        ghost.double().train()
        plain.double().train()
        out = ghost(x)
        expected = torch.empty_like(out)
        for j in range(groups):  # each group x[j::groups] through the plain network, which sees one group
            expected[j::groups] = plain(x[j::groups])
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        for key, value in plain.state_dict().items():  # running statistics: one update per group, in order
            torch.testing.assert_close(ghost.state_dict()[key], value, rtol=0, atol=1e-12)
        whole = plain(x)
        assert not torch.allclose(out, whole)  # batch statistics really are per group
        plain.load_state_dict(ghost.state_dict())
        ghost.eval()
        plain.eval()
        torch.testing.assert_close(ghost(x), plain(x), rtol=0, atol=0)  # evaluation: running statistics, unchanged


def test_a_group_as_large_as_the_batch_is_the_plain_forward():
    calls = []
    x = torch.randn(6, 3)
    assert torch.equal(ghost_batches(lambda t: calls.append(len(t)) or t * 2, x, 6), x * 2)
    assert torch.equal(ghost_batches(lambda t: calls.append(len(t)) or t * 2, x, 0), x * 2)
    assert calls == [6, 6]
    assert torch.equal(ghost_batches(lambda t: calls.append(len(t)) or t * 2, x, 4), x * 2)
    assert calls[2:] == [3, 3]


@pytest.mark.parametrize("name,extra,execution", [
    ("maml", {"inner_steps": 2, "inner_lr": 0.3}, "loop"),
    ("maml", {"inner_steps": 1, "inner_lr": 0.3}, "threads"),
    ("maml", {"inner_steps": 1, "inner_lr": 0.3}, "vmap"),
    ("protonet", {}, "loop"),
])
def test_meta_gradient_through_ghost_batchnorm_matches_finite_differences(name, extra, execution):
    torch.manual_seed(0)
    backbone = Conv4(Conv4Config(hidden_channels=3, n_blocks=2, bn_group_size=4), in_channels=1, image_size=8)
    cfg = {"name": name, **extra} if name == "protonet" else {"name": name, "execution": execution, "threads": 2,
                                                              **extra}
    model = build_algorithm(algorithm_config(cfg), backbone, n_outputs=3).to(torch.float64)
    _assert_meta_gradient_matches_fd(model, _batch(), seed=5)
