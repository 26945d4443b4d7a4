"""Reference tests of Prototypical Networks against direct computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metafit import TaskError
from metafit.algorithms import ProtoNet, ProtoNetConfig
from metafit.algorithms.protonet import class_means, prototype_logits
from metafit.nn import Conv4, Conv4Config
from metafit.types import TaskBatch


class Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def test_logits_are_negative_squared_distances_to_class_means():
    torch.manual_seed(0)
    model = ProtoNet(ProtoNetConfig(), Flatten()).double()
    sx = torch.randn(12, 7, dtype=torch.float64)
    sy = torch.tensor([0, 1, 2] * 4)
    qx = torch.randn(9, 7, dtype=torch.float64)
    logits = model.predict(model.adapt(sx, sy, 3), qx)
    means = torch.stack([sx[sy == c].mean(0) for c in range(3)])
    expected = -torch.cdist(qx, means) ** 2
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)


def test_prediction_is_nearest_centroid():
    torch.manual_seed(1)
    emb = torch.randn(20, 5)
    labels = torch.arange(4).repeat(5)
    means = class_means(emb, labels, 4)
    q = torch.randn(50, 5)
    pred = prototype_logits(q, means, "squared_euclidean").argmax(-1)
    nearest = torch.stack([((q - m) ** 2).sum(-1) for m in means], -1).argmin(-1)
    assert torch.equal(pred, nearest)


def test_cosine_distance_option():
    model = ProtoNet(ProtoNetConfig(distance="cosine", cosine_scale=5.0), Flatten()).double()
    sx, sy = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    qx = torch.randn(3, 4, dtype=torch.float64)
    logits = model.predict(model.adapt(sx, sy, 3), qx)
    means = torch.stack([sx[sy == c].mean(0) for c in range(3)])
    expected = 5.0 * torch.nn.functional.cosine_similarity(qx[:, None], means[None], dim=-1)
    torch.testing.assert_close(logits, expected)
    assert model.log_scale.requires_grad


def test_batched_meta_loss_equals_per_task_loss_without_batchnorm():
    torch.manual_seed(2)
    model = ProtoNet(ProtoNetConfig(), nn.Sequential(Flatten(), nn.Linear(16, 6))).double()
    sx = torch.randn(3, 8, 16, dtype=torch.float64)
    sy = torch.tensor([0, 1, 2, 3] * 2).expand(3, -1)
    qx = torch.randn(3, 12, 16, dtype=torch.float64)
    qy = torch.tensor([0, 1, 2, 3] * 3).expand(3, -1)
    batch = TaskBatch(sx, sy, qx, qy, 4)
    per_task = torch.stack([
        nn.functional.cross_entropy(model.predict(model.adapt(sx[i], sy[i], 4), qx[i]), qy[i]) for i in range(3)
    ]).mean()
    torch.testing.assert_close(model.meta_loss(batch).loss, per_task)


@pytest.mark.parametrize("transductive", [False, True], ids=["plain", "transductive"])
@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
def test_meta_gradient_gradcheck_float64_with_batchnorm(distance, transductive):
    """The meta-gradient through a BatchNorm backbone (and through the soft k-means refinement of
    ``transductive_training``), checked against finite differences."""
    torch.manual_seed(3)
    backbone = Conv4(Conv4Config(hidden_channels=3, n_blocks=2), in_channels=1, image_size=8)
    cfg = ProtoNetConfig(distance=distance, transductive_steps=2 * transductive, transductive_training=transductive)
    model = ProtoNet(cfg, backbone).double().train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = tuple(p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad)
    buffers = {n: b for n, b in model.named_buffers()}
    sx = torch.rand(1, 6, 1, 8, 8, dtype=torch.float64)
    sy = torch.tensor([[0, 1, 2, 0, 1, 2]])
    qx = torch.rand(1, 6, 1, 8, 8, dtype=torch.float64)
    qy = torch.tensor([[2, 1, 0, 0, 1, 2]])
    batch = TaskBatch(sx, sy, qx, qy, 3)

    class MetaLoss(nn.Module):  # functional_call needs forward(); route it to meta_loss
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, b):
            return self.m.meta_loss(b).loss

    wrap = MetaLoss(model)

    def loss(*ps):
        # fresh copies of the BatchNorm buffers each call: every evaluation sees the same state
        state = {**{f"m.{k}": v.clone() for k, v in buffers.items()}, **{f"m.{k}": p for k, p in zip(names, ps)}}
        return functional_call(wrap, state, (batch,))

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_adapt_rejects_bad_support_sets():
    model = ProtoNet(ProtoNetConfig(), Flatten())
    sx = torch.randn(4, 3)
    with pytest.raises(TaskError, match="no.*support|none for labels"):
        model.adapt(sx, torch.tensor([0, 0, 1, 1]), 3)
    with pytest.raises(TaskError, match="0..2"):
        model.adapt(sx, torch.tensor([0, 1, 2, 5]), 3)
    with pytest.raises(TaskError, match="one label per support"):
        model.adapt(sx, torch.tensor([0, 1, 2]), 3)


def test_fine_tuning_with_stroke_augmentation_is_seeded_and_leaves_the_model_untouched():
    from metafit.algorithms.protonet import FINETUNE_AUGMENTS

    assert not FINETUNE_AUGMENTS["strokes"].flip  # a mirrored character may be another character
    torch.manual_seed(0)
    backbone = Conv4(Conv4Config(hidden_channels=4, n_blocks=2), 1, 12)
    sx, sy = torch.rand(6, 1, 12, 12), torch.tensor([0, 1, 2, 0, 1, 2])
    adapted = {}
    for kind in ("photo", "strokes"):
        model = ProtoNet(ProtoNetConfig(finetune_steps=3, finetune_lr=0.1, finetune_augmentation=kind), backbone)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        first, second = model.adapt(sx, sy, 3), model.adapt(sx, sy, 3)
        torch.testing.assert_close(first.prototypes, second.prototypes, rtol=0, atol=0)  # seeded
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        adapted[kind] = first.prototypes
        plain = ProtoNet(ProtoNetConfig(), backbone).eval().adapt(sx, sy, 3).prototypes
        assert not torch.allclose(first.prototypes, plain)  # the backbone was tuned
    assert not torch.allclose(adapted["photo"], adapted["strokes"])


def test_affine_views_warp_every_image_alike_whatever_its_batch():
    from metafit.data import affine_views, random_affine

    torch.manual_seed(0)
    x = torch.rand(5, 1, 16, 16, dtype=torch.float64)
    views = affine_views(x, 3, seed=4)
    assert views.shape == (3, 5, 1, 16, 16)
    torch.testing.assert_close(affine_views(x[2:3], 3, seed=4), views[:, 2:3], rtol=0, atol=0)
    assert not torch.allclose(views[0], views[1]) and not torch.allclose(views[0], x)
    # view k is random_affine's warp for the k-th draw of the seed, applied to every image
    draws = torch.Generator().manual_seed(4)
    for k in range(3):
        one = random_affine(x[:1], draws)  # consumes one draw: the k-th
        torch.testing.assert_close(views[k, :1], one, rtol=1e-12, atol=1e-12)
    # zero ranges are the identity
    same = affine_views(x, 2, degrees=0.0, translate=0.0, scale=(1.0, 1.0), shear=0.0)
    torch.testing.assert_close(same, x.expand(2, *x.shape), rtol=1e-12, atol=1e-12)


def test_test_views_average_embeddings_over_fixed_warps_at_evaluation_only():
    from metafit.algorithms.protonet import TEST_VIEW_WARP
    from metafit.data import affine_views

    torch.manual_seed(0)
    backbone = Conv4(Conv4Config(hidden_channels=4, n_blocks=2), 1, 12).double()
    x = torch.rand(6, 1, 12, 12, dtype=torch.float64)
    plain, tta = ProtoNet(ProtoNetConfig(), backbone), ProtoNet(ProtoNetConfig(test_views=4), backbone)
    torch.testing.assert_close(tta.train().embed(x), plain.train().embed(x), rtol=0, atol=0)  # training: off
    tta.eval(), plain.eval()
    views = torch.cat([x[None], affine_views(x, 4, **TEST_VIEW_WARP)])
    expected = torch.stack([plain.embed(v) for v in views]).mean(0)
    torch.testing.assert_close(tta.embed(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tta.embed(x[3:4]), tta.embed(x)[3:4], rtol=1e-12, atol=1e-12)
    sy = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = tta.predict(tta.adapt(x, sy, 3), x)
    torch.testing.assert_close(logits, prototype_logits(expected, class_means(expected, sy, 3), "squared_euclidean"))


def _soft_kmeans_by_hand(protos, shots, queries, steps):
    """Ren et al.'s refinement written out query by query and class by class."""
    p = protos.clone()
    for _ in range(steps):
        w = torch.softmax(-torch.cdist(queries, p) ** 2, -1)
        p = torch.stack([(shots[c] * protos[c] + sum(w[i, c] * queries[i] for i in range(len(queries))))
                         / (shots[c] + w[:, c].sum()) for c in range(len(protos))])
    return p


def test_refine_prototypes_is_soft_k_means_weighting_support_by_its_shots():
    from metafit.algorithms.protonet import refine_prototypes

    torch.manual_seed(0)
    protos, queries = torch.randn(3, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    shots = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    for steps in (1, 3):
        torch.testing.assert_close(refine_prototypes(protos, queries, steps, "squared_euclidean", shots=shots),
                                   _soft_kmeans_by_hand(protos, shots, queries, steps), rtol=1e-12, atol=1e-12)
    assert refine_prototypes(protos, queries, 0, "squared_euclidean") is protos
    assert refine_prototypes(protos, queries[:0], 3, "squared_euclidean") is protos
    batched = refine_prototypes(torch.stack([protos, -protos]), torch.stack([queries, queries]), 2, "squared_euclidean")
    torch.testing.assert_close(batched[1], refine_prototypes(-protos, queries, 2, "squared_euclidean"))


def test_transductive_steps_move_prototypes_onto_shifted_query_clusters_outside_training_only():
    """Support examples drawn away from their class's query cluster: nearest-prototype errs, the refined
    prototypes follow the queries and classify them all; training, task_logits, predict and the
    embedded head agree."""
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    support = centres + torch.tensor([[1.6, 0.0], [-1.2, 1.0], [0.9, -1.6]], dtype=torch.float64)
    sy = torch.arange(3)
    queries = centres.repeat_interleave(5, 0) + 0.2 * torch.randn(15, 2, dtype=torch.float64)
    qy = sy.repeat_interleave(5)
    plain = ProtoNet(ProtoNetConfig(), Flatten()).double().eval()
    trans = ProtoNet(ProtoNetConfig(transductive_steps=10), Flatten()).double().eval()
    assert (plain.predict(plain.adapt(support, sy, 3), queries).argmax(-1) == qy).float().mean() < 0.6
    logits = trans.predict(trans.adapt(support, sy, 3), queries)
    assert bool((logits.argmax(-1) == qy).all())
    from metafit.types import Task
    torch.testing.assert_close(trans.task_logits(Task(support, sy, queries, qy, 3)), logits)
    torch.testing.assert_close(trans.head_logits(support[None], sy[None], queries[None], 3)[0], logits)
    trans.train()  # training: the plain prototypes
    torch.testing.assert_close(trans.predict(trans.adapt(support, sy, 3), queries),
                               plain.predict(plain.adapt(support, sy, 3), queries))


def test_transductive_training_refines_training_episodes_and_a_lone_query_keeps_its_class():
    from metafit.algorithms.protonet import refine_prototypes

    torch.manual_seed(2)
    sx, qx = torch.randn(1, 6, 5, dtype=torch.float64), torch.randn(1, 9, 5, dtype=torch.float64)
    sy, qy = torch.tensor([[0, 1, 2] * 2]), torch.tensor([[0, 1, 2] * 3])
    batch = TaskBatch(sx, sy, qx, qy, 3)
    cfg = dict(transductive_steps=3)
    off = ProtoNet(ProtoNetConfig(**cfg), Flatten()).double().train()
    on = ProtoNet(ProtoNetConfig(**cfg, transductive_training=True), Flatten()).double().train()
    protos = refine_prototypes(class_means(sx[0], sy[0], 3), qx[0], 3, "squared_euclidean", shots=torch.full((3,), 2.0))
    expected = torch.nn.functional.cross_entropy(prototype_logits(qx[0], protos, "squared_euclidean"), qy[0])
    torch.testing.assert_close(on.meta_loss(batch).loss, expected)
    plain = torch.nn.functional.cross_entropy(prototype_logits(qx[0], class_means(sx[0], sy[0], 3),
                                                                "squared_euclidean"), qy[0])
    torch.testing.assert_close(off.meta_loss(batch).loss, plain)
    assert not torch.isclose(expected, plain)
    for i in range(9):  # one query alone: the same class, sharper probabilities
        q = qx[0, i:i + 1]
        before = prototype_logits(q, class_means(sx[0], sy[0], 3), "squared_euclidean")
        after = prototype_logits(q, refine_prototypes(class_means(sx[0], sy[0], 3), q, 5, "squared_euclidean"),
                                 "squared_euclidean")
        assert after.argmax() == before.argmax() and after.softmax(-1).max() >= before.softmax(-1).max()
