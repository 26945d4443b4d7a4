"""Transfer baselines: the pretraining mini-batch sampler, the trainer wiring, and every head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic_classes, tiny_config
from metafit import ConfigError, TaskError
from metafit.algorithms import TaskHead
from metafit.algorithms.transfer import fit_head, head_logits
from metafit.data import ClassBatchSampler, EpisodeSampler
from metafit.training import Trainer, build_model, make_config


def _model(tmp_path, **alg):
    cfg = make_config(tiny_config(tmp_path, algorithm={"name": "transfer", "n_base_classes": 10, **alg}))
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_batch_labels_name_class_and_rotation():
    data = synthetic_classes(n_classes=6, per_class=4, size=16)
    sampler = ClassBatchSampler(data, rotations=True, seed=3)
    assert sampler.n_classes == 24
    batch = sampler.sample(64)
    assert batch.x.shape == (64, 1, 16, 16) and batch.y.shape == (64,)
    assert int(batch.y.min()) >= 0 and int(batch.y.max()) < 24
    for x, y in zip(batch.x, batch.y.tolist()):
        c, r = divmod(y, 4)
        start, count = int(data.class_start[c]), int(data.class_count[c])
        originals = data.images[start:start + count].float() / 255.0
        rotated = torch.rot90(originals, r, dims=(-2, -1))
        assert any(torch.equal(x, o) for o in rotated), (y, c, r)


def test_batch_labels_name_class_rotation_and_mirror_image():
    data = synthetic_classes(n_classes=6, per_class=4, size=16)
    sampler = ClassBatchSampler(data, rotations=True, reflections=True, seed=3)
    assert sampler.n_classes == 48
    batch = sampler.sample(64)
    assert int(batch.y.max()) < 48 and int(batch.y.remainder(8).max()) >= 4  # mirrored copies drawn
    for x, y in zip(batch.x, batch.y.tolist()):
        c, r = divmod(y, 8)
        start, count = int(data.class_start[c]), int(data.class_count[c])
        originals = data.images[start:start + count].float() / 255.0
        copies = torch.rot90(originals.flip(-1) if r >= 4 else originals, r % 4, dims=(-2, -1))
        assert any(torch.equal(x, o) for o in copies), (y, c, r)


def test_batch_sampler_state_resumes_exactly():
    sampler = ClassBatchSampler(synthetic_classes(), rotations=True, seed=0)
    sampler.sample(5)
    state = sampler.get_state()
    a = sampler.sample(7)
    sampler.set_state(state)
    b = sampler.sample(7)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_trainer_records_base_classes_and_refuses_a_wrong_count(tmp_path, synthetic_splits):
    cfg = make_config(tiny_config(tmp_path, algorithm={"name": "transfer"}, data={"rotations": True}))
    trainer = Trainer(cfg, splits=synthetic_splits)
    assert trainer.config.algorithm.n_base_classes == 18 * 4
    assert trainer.model.classifier.out_features == 72
    bad = make_config(tiny_config(tmp_path, algorithm={"name": "transfer", "n_base_classes": 5}))
    with pytest.raises(ConfigError, match="algorithm.n_base_classes must equal"):
        Trainer(bad, splits=synthetic_splits)


def test_reflections_double_the_base_classes_in_training_only(tmp_path, synthetic_splits):
    from metafit.training.splits import split_lines
    cfg = make_config(tiny_config(tmp_path, algorithm={"name": "transfer"},
                                  data={"rotations": True, "reflections": True}))
    trainer = Trainer(cfg, splits=synthetic_splits)
    assert trainer.config.algorithm.n_base_classes == 18 * 8
    assert trainer.model.classifier.out_features == 144
    line = split_lines(trainer.split)[0]
    assert "train 18 classes (x8 with rotations and mirror images)" in line
    assert "val 6 classes (x4 with rotations), test 6 classes (x4 with rotations)" in line  # never mirrored there


def test_meta_loss_refuses_episodes_and_out_of_range_labels(tmp_path):
    model = _model(tmp_path)
    episodes = EpisodeSampler(synthetic_classes(n_classes=10), 5, 1, 2, seed=0).sample(2)
    with pytest.raises(TaskError, match="LabelledBatch"):
        model.meta_loss(episodes)
    batch = ClassBatchSampler(synthetic_classes(n_classes=12), seed=0).sample(64)
    with pytest.raises(TaskError, match="n_base_classes"):
        model.meta_loss(batch)


def test_center_l2_tracks_the_base_feature_mean(tmp_path):
    model = _model(tmp_path, normalize="center_l2", feature_momentum=1.0)
    batch = ClassBatchSampler(synthetic_classes(n_classes=10), seed=0).sample(16)
    model.train()
    model.meta_loss(batch)
    with torch.no_grad():
        model.eval()
        expected = model.backbone.train()(batch.x).mean(0)
    torch.testing.assert_close(model.feature_mean, expected)
    model.eval()
    feats = model.features(batch.x)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(16))


def test_linear_head_matches_scikit_learn_logistic_regression():
    sk = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    n_ways, per, d = 4, 3, 6
    feats = torch.randn(n_ways * per, d, generator=g, dtype=torch.float64)
    labels = torch.arange(n_ways).repeat_interleave(per)
    wd = 0.1
    head = fit_head(feats.float(), labels, n_ways, "linear", 500, wd, 10.0)
    # our objective: mean CE + wd/2 |W|^2 (bias free) == sklearn's 1/2|W|^2 + C * sum CE with C = 1/(wd n)
    ref = sk.LogisticRegression(C=1.0 / (wd * len(labels)), tol=1e-10, max_iter=10_000)
    ref.fit(feats.numpy(), labels.numpy())
    ours = torch.softmax(feats.float() @ head.weight.T + head.bias, -1)
    theirs = torch.as_tensor(ref.predict_proba(feats.numpy()), dtype=torch.float32)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_heads_fit_the_support_set(tmp_path):
    for head in ("linear", "cosine", "centroid", "finetune"):
        model = _model(tmp_path, head=head, finetune_steps=5)
        task = EpisodeSampler(synthetic_classes(n_classes=10), 5, 3, 2, seed=1).sample_task()
        adapted = model.adapt(task.support_x, task.support_y, 5)
        assert isinstance(adapted, TaskHead)
        logits = model.predict(adapted, task.support_x)
        assert logits.shape == (15, 5) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_fitted_heads_separate_separable_features(kind):
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(5).repeat_interleave(3)
    centers = torch.randn(5, 16, generator=g)
    feats = F.normalize(centers[labels] + 0.3 * torch.randn(15, 16, generator=g), dim=-1)
    head = fit_head(feats, labels, 5, kind, 100, 1e-3, 10.0)
    logits = head_logits(feats, head, 10.0)
    assert bool((logits.argmax(-1) == labels).all())
    # the optimum of a convex objective: its gradient vanishes (linear head)
    if kind == "linear":
        w, b = head.weight.clone().requires_grad_(), head.bias.clone().requires_grad_()
        loss = F.cross_entropy(feats @ w.T + b, labels) + 0.5e-3 * w.pow(2).sum()
        gw, gb = torch.autograd.grad(loss, (w, b))
        assert float(gw.abs().max()) < 1e-4 and float(gb.abs().max()) < 1e-4


def test_finetune_with_zero_steps_is_the_centroid_classifier(tmp_path):
    task = EpisodeSampler(synthetic_classes(n_classes=10), 5, 2, 4, seed=2).sample_task()
    tuned = _model(tmp_path, head="finetune", finetune_steps=0)
    centroid = _model(tmp_path, head="centroid")
    a = tuned.predict(tuned.adapt(task.support_x, task.support_y, 5), task.query_x)
    b = centroid.predict(centroid.adapt(task.support_x, task.support_y, 5), task.query_x)
    torch.testing.assert_close(F.log_softmax(a, -1), F.log_softmax(b, -1), atol=1e-5, rtol=0)


def test_finetune_leaves_the_model_and_its_statistics_untouched(tmp_path):
    model = _model(tmp_path, head="finetune", finetune_steps=3, finetune_lr=0.1)
    model.train()  # even when called in training mode, BatchNorm statistics must not move
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = EpisodeSampler(synthetic_classes(n_classes=10), 5, 1, 2, seed=0).sample_task()
    adapted = model.adapt(task.support_x, task.support_y, 5)
    model.predict(adapted, task.query_x)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = [k for k, v in adapted.params.items() if not torch.equal(v, before["backbone." + k])]
    assert changed, "fine-tuning must change backbone weights of the task copy"


def test_one_checkpoint_is_evaluated_with_every_head(tmp_path, synthetic_splits):
    from metafit.cli.main import main
    from metafit.training import evaluate_checkpoint, train

    cfg = make_config(tiny_config(tmp_path, algorithm={"name": "transfer", "batch_size": 32},
                                  train={"meta_steps": 20, "eval_every": 20, "save_interval": 20}))
    report = train(cfg, splits=synthetic_splits, test=False)
    ckpt = report["best_checkpoint"]
    results = {head: evaluate_checkpoint(ckpt, splits=synthetic_splits, episodes=8,
                                         algorithm_overrides={"head": head})
               for head in ("linear", "cosine", "centroid", "finetune")}
    for head, r in results.items():
        assert r["algorithm_overrides"] == {"head": head} and 0.0 <= r["mean"] <= 1.0
    with pytest.raises(ConfigError, match="must keep the trained parameters"):
        evaluate_checkpoint(ckpt, splits=synthetic_splits, episodes=2, algorithm_overrides={"n_base_classes": 7})
    with pytest.raises(ConfigError, match="algorithm.name must stay"):
        evaluate_checkpoint(ckpt, splits=synthetic_splits, episodes=2, algorithm_overrides={"name": "protonet"})
    assert main(["eval", ckpt, "--set", "head=centroid"]) == 1
