"""Prototypical Networks (Snell, Swersky & Zemel, 2017).

A class is represented by the mean embedding of its support examples (its prototype); a query
is classified by a softmax over negative distances to the prototypes. Squared Euclidean distance
is the paper's choice (a linear model in embedding space); cosine similarity with a learned
scale is offered as an option.

Fine-tuning at adaptation (``finetune_steps`` > 0; the last stage of P>M>F, Hu et al. 2022): a
copy of the backbone is trained on the task's support set before the prototypes are taken —
every step augments the support images (``finetune_augmentation``: random resized crop, flip
and colour jitter for photographs, or small affine warps for handwriting) into pseudo-queries
and minimises their ProtoNet loss against the prototypes of the un-augmented support set, with
SGD and momentum 0.9. BatchNorm keeps its running statistics. The augmentation is seeded, so
the same support set always gives the same adapted model. Choose
``finetune_lr`` (and steps) on validation episodes (``metafit eval --split val --set
algorithm.finetune_lr=...``); the fine-tuned weights travel in the adapted task.

Test-time augmentation (``test_views`` > 0): outside training every image is embedded as the mean
embedding of itself and ``test_views`` fixed small affine warps of it (the ``strokes`` ranges,
the same warps for every image, so an embedding never depends on its batch).

Transductive prototypes (``transductive_steps`` > 0): outside training (and, with
``transductive_training``, in training episodes too, gradients flowing through) the prototypes are refined
with the unlabelled query images of the same call by soft k-means (Ren et al. 2018, "Meta-Learning
for Semi-Supervised Few-Shot Classification"): each step weighs every query by its softmax
probability for each class and moves each prototype to the weighted mean of its support
examples and the queries. Predictions then depend on the whole batch of queries scored
together (pass one task's unlabelled images in one call). A lone query, with squared Euclidean
distance and equal shots, keeps its class: each step scales its distance to every prototype by
shots / (shots + probability), least for the nearest; only its probabilities sharpen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from torch.func import functional_call

from ..data.augment import ImageAugment, affine_views
from ..types import Task, TaskBatch
from .base import Adapted, Algorithm, AlgorithmConfig, MetaOutput, check_task
from .heads import episode_embeddings, query_output, widen

__all__ = ["ProtoNet", "ProtoNetConfig", "Prototypes", "class_means", "prototype_logits", "refine_prototypes"]


class ProtoNetConfig(AlgorithmConfig):
    """Config of :class:`ProtoNet` (``algorithm: {name: protonet}``): the distance and the optional
    fine-tuning of the backbone at adaptation."""

    name: Literal["protonet"] = "protonet"
    distance: Literal["squared_euclidean", "cosine"] = Field(
        "squared_euclidean", description="distance between query embeddings and prototypes"
    )
    cosine_scale: float = Field(
        10.0, gt=0.0, description="initial (learned) logit scale for the cosine distance"
    )
    finetune_steps: int = Field(
        0, ge=0, le=10_000, description="adaptation: SGD steps fine-tuning the backbone on the augmented support "
        "set before taking prototypes (P>M>F; 0: off)")
    finetune_lr: float = Field(0.01, gt=0.0, le=10.0, description="adaptation fine-tuning: learning rate")
    finetune_augment: bool = Field(
        True, description="adaptation fine-tuning: pseudo-queries are augmented support images (false: the "
        "support images themselves)")
    finetune_augmentation: Literal["photo", "strokes"] = Field(
        "photo", description="adaptation fine-tuning: how support images are augmented into pseudo-queries: photo "
        "(random resized crop, flip, colour jitter: natural images) or strokes (small random affine warps, no "
        "flip: handwriting such as Omniglot)")
    test_views: int = Field(
        0, ge=0, le=64, description="evaluation: each image's embedding is the mean of the embeddings of the "
        "image and of this many fixed small affine warps of it (test-time augmentation for handwriting; "
        "0: off; never while training)")
    transductive_steps: int = Field(
        0, ge=0, le=100, description="evaluation and prediction: soft k-means steps refining the prototypes "
        "with the query images scored together (Ren et al. 2018; a prediction then depends on its batch; "
        "0: off; not while training unless transductive_training)")
    transductive_training: bool = Field(
        False, description="training: refine the prototypes of training episodes with their queries too "
        "(transductive_steps steps, gradients through the refinement), so the meta-loss sees the prototypes "
        "evaluation uses")


#: the ranges of ``test_views``' fixed warps: those of the ``strokes`` fine-tuning augmentation
TEST_VIEW_WARP = {"degrees": 10.0, "translate": 0.1, "scale": (0.85, 1.15), "shear": 10.0}

#: the augmentations that turn support images into pseudo-queries while fine-tuning, by
#: ``finetune_augmentation``: natural images (P>M>F's), and handwriting (warps that keep a character
#: the same character: a few degrees of rotation and shear, a small shift and zoom; a mirror image
#: may be another character)
FINETUNE_AUGMENTS = {
    "photo": ImageAugment(crop="resized", crop_scale_min=0.35, flip=True, color_jitter=0.4),
    "strokes": ImageAugment(affine=dict(TEST_VIEW_WARP)),
}


@dataclass(frozen=True)
class Prototypes(Adapted):
    """ProtoNet's adapted task: ``prototypes`` ``[n_ways, d]``, the class means of the support
    embeddings, ``params``, the fine-tuned backbone weights (``None`` unless ``finetune_steps`` > 0),
    and ``shots`` ``[n_ways]``, the support examples per class, which weigh the prototypes against
    the queries of ``transductive_steps`` (``None``, as in tasks saved before it: one each)."""

    prototypes: torch.Tensor  # [n_ways, d]
    params: dict[str, torch.Tensor] | None = None  # fine-tuned backbone weights (finetune_steps > 0)
    shots: torch.Tensor | None = None  # [n_ways] support examples per class (None: one each)


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, n_ways: int) -> torch.Tensor:
    """Mean embedding per class; ``embeddings`` [..., n, d], ``labels`` [..., n] -> [..., n_ways, d]."""
    onehot = F.one_hot(labels, n_ways).to(embeddings.dtype)  # [..., n, n_ways]
    sums = onehot.transpose(-1, -2) @ embeddings
    return sums / onehot.sum(-2).unsqueeze(-1)


def prototype_logits(
    queries: torch.Tensor, prototypes: torch.Tensor, distance: str, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [..., q, n_ways] of queries [..., q, d] against prototypes [..., n_ways, d].

    Computed in at least float32 even under autocast: the expanded squared distance cancels
    catastrophically in bfloat16."""
    if queries.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(queries.device.type):
        with torch.autocast(queries.device.type, enabled=False):
            return prototype_logits(queries.float(), prototypes.float(), distance,
                                    None if scale is None else scale.float())
    if distance == "cosine":
        cos = F.normalize(queries, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(-1, -2)
        return cos * scale
    # ||q - p||^2 = ||q||^2 - 2 q.p + ||p||^2, one matmul instead of a [q, n, d] difference tensor
    qq = queries.pow(2).sum(-1, keepdim=True)
    pp = prototypes.pow(2).sum(-1).unsqueeze(-2)
    sq = (qq - 2.0 * queries @ prototypes.transpose(-1, -2) + pp).clamp_min(0.0)
    return -sq


def _shots(labels: torch.Tensor, n_ways: int) -> torch.Tensor:
    """Examples per class [..., n_ways] of ``labels`` [..., n]."""
    return F.one_hot(labels, n_ways).sum(-2)


def refine_prototypes(prototypes: torch.Tensor, queries: torch.Tensor, steps: int, distance: str,
                      scale: torch.Tensor | None = None, shots: torch.Tensor | None = None) -> torch.Tensor:
    """Prototypes [..., n_ways, d] after ``steps`` soft k-means steps over unlabelled ``queries``
    [..., q, d] (Ren et al. 2018): each step every prototype becomes the mean of its ``shots``
    [..., n_ways] support examples (None: one each) and of every query, each query weighted by its
    softmax probability (``prototype_logits`` with ``distance`` and ``scale``) for that class."""
    if steps == 0 or queries.shape[-2] == 0:
        return prototypes
    if queries.dtype in (torch.float16, torch.bfloat16) or prototypes.dtype in (torch.float16, torch.bfloat16):
        queries, prototypes = queries.float(), prototypes.float()
    weight = (torch.ones(prototypes.shape[:-1], dtype=prototypes.dtype, device=prototypes.device)
              if shots is None else shots.to(prototypes.dtype))
    support_sum = prototypes * weight.unsqueeze(-1)
    refined = prototypes
    for _ in range(steps):
        w = torch.softmax(prototype_logits(queries, refined, distance, scale), -1)  # [..., q, n_ways]
        refined = (support_sum + w.transpose(-1, -2) @ queries) / (weight + w.sum(-2)).unsqueeze(-1)
    return refined


class ProtoNet(Algorithm):
    """Prototypical Networks: queries are classified by their distance to the class means of the
    support embeddings (see the module docstring).

    Built as ``ProtoNet(config, backbone, n_outputs, task_kind)`` (see :class:`Algorithm`): ``config`` a
    :class:`ProtoNetConfig`; ``n_outputs`` is not used (any number of classes per task);
    classification only (``task_kind``). ``adapt`` returns :class:`Prototypes`.
    """

    name = "protonet"
    Config = ProtoNetConfig

    def __init__(self, config: ProtoNetConfig, backbone: nn.Module, n_outputs: int = 5,
                 task_kind: str = "classification") -> None:
        super().__init__(config, backbone, n_outputs, task_kind)
        self.log_scale = nn.Parameter(
            torch.tensor(float(config.cosine_scale)).log(), requires_grad=config.distance == "cosine"
        )

    def _scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def embed(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The backbone's embeddings ``[n, d]`` of ``x``, with the backbone weights ``params`` (by
        parameter name) instead of its own when given. Outside training, with ``test_views`` > 0,
        the mean over ``x`` and its fixed warps (:func:`~metafit.data.affine_views`)."""
        views = self.config.test_views if not self.training and x.dim() == 4 else 0
        if views:
            x = torch.cat([x[None], affine_views(x, views, **TEST_VIEW_WARP)]).flatten(0, 1)
        emb = self.backbone(x) if params is None else functional_call(self.backbone, params, (x,))
        return emb.unflatten(0, (views + 1, -1)).mean(0) if views else emb

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int) -> Prototypes:
        check_task(support_x, support_y, n_ways, "ProtoNet.adapt")
        if self.config.finetune_steps > 0:
            return self._finetune(support_x, support_y, n_ways)
        protos = class_means(self.embed(support_x), support_y, n_ways)
        return Prototypes(protos, shots=_shots(support_y, n_ways).to(protos.dtype))

    def _finetune(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int) -> Prototypes:
        """Fine-tune a copy of the backbone on the support set (see the module docstring)."""
        cfg = self.config
        was_training = self.backbone.training
        self.backbone.eval()  # BatchNorm keeps the meta-trained running statistics
        generator = torch.Generator().manual_seed(0)
        try:
            with torch.enable_grad():
                params = {n: p.detach().clone().requires_grad_(p.requires_grad)
                          for n, p in self.backbone.named_parameters()}
                trainable = [p for p in params.values() if p.requires_grad]
                opt = torch.optim.SGD(trainable, lr=cfg.finetune_lr, momentum=0.9)
                augment = FINETUNE_AUGMENTS[cfg.finetune_augmentation]
                for _ in range(cfg.finetune_steps):
                    queries = augment(support_x, generator) if cfg.finetune_augment else support_x
                    support, pseudo = episode_embeddings(lambda x: self.embed(x, params), support_x[None],
                                                         queries[None])
                    logits = prototype_logits(pseudo[0], class_means(support[0], support_y, n_ways),
                                              cfg.distance, self._scale())
                    opt.zero_grad()
                    F.cross_entropy(logits, support_y).backward()
                    opt.step()
            tuned = {n: p.detach() for n, p in params.items()}
            with torch.no_grad():
                protos = class_means(self.embed(support_x, tuned), support_y, n_ways)
        finally:
            self.backbone.train(was_training)
        return Prototypes(protos, tuned, _shots(support_y, n_ways).to(protos.dtype))

    def predict(self, adapted: Prototypes, x: torch.Tensor) -> torch.Tensor:
        if adapted.params is None:
            emb = self.embed(x)
        else:
            was_training = self.backbone.training
            self.backbone.eval()
            try:
                emb = self.embed(x, adapted.params)
            finally:
                self.backbone.train(was_training)
        protos = self._refined(adapted.prototypes, emb, adapted.shots)
        return prototype_logits(emb, protos, self.config.distance, self._scale())

    def embeds_per_image(self) -> bool:
        """True unless adaptation fine-tunes the backbone (``finetune_steps`` > 0)."""
        return self.config.finetune_steps == 0

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone embeddings of ``x``, in at least float32 (as :meth:`task_logits` uses them)."""
        return widen(self.embed(x))

    def head_logits(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                    n_ways: int) -> torch.Tensor:
        """Distances of ``query`` embeddings to the prototypes of ``support`` (labels ``support_y``,
        ``n_ways`` classes), per episode (see :meth:`Algorithm.head_logits`)."""
        protos = self._refined(class_means(support, support_y, n_ways), query, labels=support_y)
        return prototype_logits(query, protos, self.config.distance, self._scale())

    def _logits(self, sx, sy, qx, n_ways: int) -> torch.Tensor:
        support, queries = episode_embeddings(self.embed, sx, qx)
        protos = self._refined(class_means(support, sy, n_ways), queries, labels=sy)
        return prototype_logits(queries, protos, self.config.distance, self._scale())

    def _refined(self, prototypes: torch.Tensor, queries: torch.Tensor, shots: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        """``prototypes`` refined with ``queries`` (``transductive_steps``; while training only with
        ``transductive_training``), the support counted by ``shots`` or, when given, its ``labels``
        (counted only where the refinement runs: never on a plain training step)."""
        cfg = self.config
        steps = cfg.transductive_steps if not self.training or cfg.transductive_training else 0
        if steps == 0:
            return prototypes
        if labels is not None:
            shots = _shots(labels, prototypes.shape[-2])
        return refine_prototypes(prototypes, queries, steps, cfg.distance, self._scale(), shots)

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        return query_output(self._logits(batch.support_x, batch.support_y, batch.query_x, batch.n_ways),
                            batch.query_y)

    def task_logits(self, task: Task) -> torch.Tensor:
        if self.config.finetune_steps > 0:
            return self.predict(self.adapt(task.support_x, task.support_y, task.n_ways), task.query_x)
        return self._logits(
            task.support_x[None], task.support_y[None], task.query_x[None], task.n_ways
        )[0]
