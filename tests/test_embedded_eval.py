"""Evaluating many episodes through cached per-image embeddings gives the numbers of the
one-episode-at-a-time path (ProtoNet, SVM, ridge and transfer heads), and falls back to it where
a backbone uses batch statistics."""

from __future__ import annotations

import pytest
import torch

from conftest import synthetic_classes, tiny_config
from metafit.algorithms import ALGORITHMS
from metafit.data import EpisodeSampler
from metafit.training import build_model, evaluate_episodes, evaluate_tasks, make_config
from metafit.training.embedded_eval import supports_embedding

CASES = [("protonet", {}), ("protonet", {"distance": "cosine"}), ("svm", {}), ("ridge", {}),
         ("transfer", {"head": "centroid", "n_base_classes": 10}), ("transfer", {"head": "linear", "n_base_classes": 10,
                                                                                 "head_steps": 20})]


def _model(name, extra, tmp_path):
    torch.manual_seed(0)
    model = build_model(make_config(tiny_config(tmp_path, algorithm={"name": name, **extra})))
    model.train()
    with torch.no_grad():  # a few training-mode passes: BatchNorm running statistics that are not the defaults
        for _ in range(3):
            model.backbone(torch.rand(16, 1, 16, 16))
    return model


def _sampler(rotations=False, n_ways=5, k=2, q=3):
    return EpisodeSampler(synthetic_classes(n_classes=12, per_class=8, size=16), n_ways, k, q, seed=0,
                          rotations=rotations)


@pytest.mark.parametrize("name,extra", CASES, ids=[f"{n}-{'-'.join(map(str, e.values()))}" for n, e in CASES])
@pytest.mark.parametrize("rotations", [False, True])
def test_embedded_path_equals_one_episode_at_a_time(name, extra, rotations, tmp_path):
    model = _model(name, extra, tmp_path)
    sampler = _sampler(rotations)
    assert supports_embedding(model, sampler, None)
    episodes = sampler.fixed_episodes(70, seed=3)  # more than one chunk of heads
    fast = evaluate_episodes(model, sampler, episodes, temperature=2.0)
    slow = evaluate_tasks(model, sampler.tasks(episodes), temperature=2.0)
    assert fast.per_episode == slow.per_episode
    assert abs(fast.mean - slow.mean) <= 1e-6 and fast.ci95 == pytest.approx(slow.ci95, abs=1e-9)
    assert fast.loss == pytest.approx(slow.loss, rel=1e-5, abs=1e-6)
    assert fast.ece == pytest.approx(slow.ece, abs=1e-6) and fast.ece_calibrated == pytest.approx(slow.ece_calibrated,
                                                                                                    abs=1e-6)
    assert model.training  # the mode is restored


def test_kept_predictions_are_those_of_the_one_at_a_time_path(tmp_path):
    model = _model("protonet", {}, tmp_path)
    sampler = _sampler(rotations=True)
    episodes = sampler.fixed_episodes(12, seed=1)
    fast = evaluate_episodes(model, sampler, episodes, keep_predictions=2).predictions
    model.embeds_per_image = lambda: False  # force the one-at-a-time path
    slow = evaluate_episodes(model, sampler, episodes, keep_predictions=2).predictions
    assert fast.classes == slow.classes and torch.equal(fast.true, slow.true)
    assert torch.equal(fast.predicted, slow.predicted) and fast.n_episodes == slow.n_episodes == 12
    for a, b in zip(fast.episodes, slow.episodes):
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
        assert torch.equal(a.predicted, b.predicted) and a.class_names == b.class_names


def test_a_backbone_with_batch_statistics_is_evaluated_one_episode_at_a_time(tmp_path, monkeypatch):
    model = _model("protonet", {}, tmp_path)
    for m in model.modules():  # BatchNorm that normalises with the statistics of the batch, even in eval mode
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    sampler = _sampler()
    episodes = sampler.fixed_episodes(8, seed=2)
    import metafit.training.evaluate as evaluate_module

    calls = []
    original = evaluate_module.evaluate_tasks
    monkeypatch.setattr(evaluate_module, "evaluate_tasks", lambda *a, **k: calls.append(1) or original(*a, **k))
    res = evaluate_episodes(model, sampler, episodes)
    assert calls and res.per_episode == original(model, sampler.tasks(episodes)).per_episode


def test_learners_that_adapt_the_backbone_take_the_one_at_a_time_path(tmp_path):
    sampler = _sampler()
    for name, extra in [("maml", {}), ("protonet", {"finetune_steps": 1}), ("transfer", {"head": "finetune",
                                                                                        "n_base_classes": 10})]:
        assert not supports_embedding(_model(name, extra, tmp_path), sampler, None), name
    assert not supports_embedding(_model("protonet", {}, tmp_path), sampler, inner_steps=3)
    assert {n for n, cls in ALGORITHMS.items() if cls.embeds_per_image is not ALGORITHMS["maml"].embeds_per_image} \
        >= {"protonet", "svm", "ridge", "transfer"}
