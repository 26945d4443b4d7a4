"""Transfer-learning baselines: supervised pretraining, then a new head on every task.

Pretraining (Chen et al. 2019, "A Closer Look at Few-shot Classification"; Tian et al. 2020,
"Rethinking Few-Shot Image Classification"): the backbone and a classifier over *all* base
classes are trained with cross-entropy on standard mini-batches (``LabelledBatch``, not
episodes). ``classifier: linear`` is Chen's *Baseline*; ``classifier: cosine`` (a cosine
classifier with a fixed logit scale) is *Baseline++*.

Adaptation to a new task, selected by ``head`` (the backbone is frozen except for ``finetune``):

- ``linear``: multinomial logistic regression on the support features (L2-regularised, solved
  to convergence with L-BFGS; deterministic, the role sklearn's LogisticRegression plays in
  Tian et al.).
- ``cosine``: a new cosine classifier (Baseline++), fitted the same way, initialised at the
  normalised class means.
- ``centroid``: nearest class mean (squared Euclidean), no optimisation (SimpleShot).
- ``finetune``: backbone *and* a linear head trained on the support set for ``finetune_steps``
  Adam steps; the head starts as the nearest-centroid classifier written as a linear layer
  (w_k = 2 mu_k, b_k = -|mu_k|^2), so zero steps equal ``centroid``. BatchNorm keeps the
  pretraining statistics (evaluation mode) while fine-tuning on a handful of images.

``normalize`` applies to the task features of every head: ``none``, ``l2`` (Tian et al.), or
``center_l2`` (SimpleShot's CL2N: subtract the mean base-class feature, tracked during
pretraining like a BatchNorm running mean, then L2-normalise).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from ..errors import ConfigError, TaskError
from ..types import LabelledBatch
from .base import Adapted, Algorithm, AlgorithmConfig, MetaOutput, check_task
from .protonet import class_means, prototype_logits

__all__ = ["Transfer", "TransferConfig", "TaskHead"]


class TransferConfig(AlgorithmConfig):
    """Config of :class:`Transfer` (``algorithm: {name: transfer}``): the pretraining classifier and its
    batches, the task head fitted at adaptation and the feature normalisation."""

    name: Literal["transfer"] = "transfer"
    n_base_classes: int | None = Field(
        None, ge=2, description="classes of the pretraining classifier (None: every training class "
        "x rotation, filled in from the data by the trainer)"
    )
    batch_size: int = Field(128, ge=1, description="images per pretraining step")
    classifier: Literal["linear", "cosine"] = Field(
        "linear", description="pretraining classifier: linear (Baseline) or cosine (Baseline++)"
    )
    cosine_scale: float = Field(10.0, gt=0.0, description="logit scale of cosine classifiers")
    head: Literal["linear", "cosine", "centroid", "finetune"] = Field(
        "linear", description="how a new task is learned from its support set"
    )
    normalize: Literal["none", "l2", "center_l2"] = Field(
        "l2", description="feature normalisation before the task head"
    )
    head_steps: int = Field(100, ge=1, description="L-BFGS iterations fitting a linear/cosine head")
    head_weight_decay: float = Field(
        1e-3, ge=0.0, description="L2 penalty (weight_decay/2 * |W|^2) of linear/cosine heads"
    )
    finetune_steps: int = Field(10, ge=0, description="finetune: Adam steps on backbone and head")
    finetune_lr: float = Field(1e-3, gt=0.0, description="finetune: Adam learning rate")
    feature_momentum: float = Field(
        0.01, gt=0.0, le=1.0, description="center_l2: momentum of the running mean base feature"
    )


@dataclass(frozen=True)
class TaskHead(Adapted):
    """A task's classifier: ``kind`` linear (weight [K, d], bias [K]), cosine (weight, scale) or
    centroid (weight = class means); ``params`` holds fine-tuned backbone weights (finetune)."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    params: dict[str, torch.Tensor] | None = None


def head_logits(feats: torch.Tensor, head: TaskHead, cosine_scale: float) -> torch.Tensor:
    if head.kind == "centroid":
        return prototype_logits(feats, head.weight, "squared_euclidean")
    if head.kind == "cosine":
        return cosine_scale * F.normalize(feats, dim=-1) @ F.normalize(head.weight, dim=-1).T
    return feats @ head.weight.T + head.bias


def fit_head(feats: torch.Tensor, labels: torch.Tensor, n_ways: int, kind: str, steps: int,
             weight_decay: float, cosine_scale: float) -> TaskHead:
    """Fit a linear or cosine classifier on fixed features with L-BFGS (strong Wolfe line search)."""
    feats = feats.detach().float()
    means = class_means(feats, labels, n_ways)
    with torch.enable_grad():
        if kind == "cosine":
            weight = F.normalize(means, dim=-1).clone().requires_grad_()
            bias = None
            params = [weight]
        else:
            weight = torch.zeros(n_ways, feats.shape[-1], requires_grad=True)
            bias = torch.zeros(n_ways, requires_grad=True)
            params = [weight, bias]
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

        def closure():
            opt.zero_grad()
            logits = head_logits(feats, TaskHead(kind, weight, bias), cosine_scale)
            loss = F.cross_entropy(logits, labels) + 0.5 * weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return TaskHead(kind, weight.detach(), None if bias is None else bias.detach())


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """``module`` in evaluation mode inside the block (BatchNorm keeps the pretraining statistics
    and never updates them), its previous mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class Transfer(Algorithm):
    """Transfer-learning baseline: supervised pretraining on the base classes, then a new head per task
    (see the module docstring).

    Built as ``Transfer(config, backbone, n_outputs, task_kind)`` (see :class:`Algorithm`): ``config`` a
    :class:`TransferConfig` whose ``n_base_classes`` is set (the Trainer fills it in; else a
    :class:`ConfigError`); ``n_outputs`` is not used (any number of classes per task); classification
    only (``task_kind``). It trains on ``LabelledBatch`` mini-batches (``training_data = "batches"``), and
    ``adapt`` returns a :class:`TaskHead`.
    """

    name = "transfer"
    Config = TransferConfig
    training_data = "batches"

    def __init__(self, config: TransferConfig, backbone: nn.Module, n_outputs: int = 5,
                 task_kind: str = "classification") -> None:
        super().__init__(config, backbone, n_outputs, task_kind)
        if config.n_base_classes is None:
            raise ConfigError(
                "Config: algorithm.n_base_classes must be set to build a transfer model; got None. "
                "Train through the Trainer (it fills in the number of training classes) or set it."
            )
        d = int(backbone.out_features)
        self.classifier = nn.Linear(d, config.n_base_classes, bias=config.classifier == "linear")
        self.register_buffer("feature_mean", torch.zeros(d))

    # -- features -----------------------------------------------------------------------------
    def features(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Normalised task features of ``x`` (with fine-tuned backbone ``params`` if given)."""
        emb = self.backbone(x) if params is None else functional_call(self.backbone, params, (x,))
        emb = emb.float()
        norm = self.config.normalize
        if norm == "center_l2":
            emb = emb - self.feature_mean
        return F.normalize(emb, dim=-1) if norm != "none" else emb

    # -- pretraining --------------------------------------------------------------------------
    def base_logits(self, emb: torch.Tensor) -> torch.Tensor:
        """The pretraining classifier's logits ``[n, n_base_classes]`` for backbone embeddings ``emb``."""
        if self.config.classifier == "cosine":
            w = F.normalize(self.classifier.weight.float(), dim=-1)
            return self.config.cosine_scale * F.normalize(emb, dim=-1) @ w.T
        return self.classifier(emb)

    def meta_loss(self, batch: LabelledBatch) -> MetaOutput:
        """The pretraining loss: cross-entropy of the base classifier on ``batch``, a
        :class:`~metafit.types.LabelledBatch` of base-class images (anything else is a
        :class:`TaskError`), and its accuracy. In training mode it also updates the running mean
        feature used by ``normalize: center_l2``."""
        if not isinstance(batch, LabelledBatch):
            raise TaskError(
                f"Transfer.meta_loss: batch must be a LabelledBatch of base-class images (supervised "
                f"pretraining); got {type(batch).__name__}. Train with the Trainer, which samples "
                "mini-batches for this algorithm, or pass LabelledBatch(x, y)."
            )
        n = self.config.n_base_classes
        if batch.y.numel() and int(batch.y.max()) >= n:
            raise TaskError(
                f"Transfer.meta_loss: labels must lie in 0..{n - 1} (algorithm.n_base_classes); got "
                f"{int(batch.y.max())}. Set n_base_classes to the number of training classes."
            )
        emb = self.backbone(batch.x).float()
        if self.training:
            with torch.no_grad():
                self.feature_mean.lerp_(emb.mean(0), self.config.feature_momentum)
        logits = self.base_logits(emb)
        loss = F.cross_entropy(logits, batch.y)
        acc = (logits.argmax(-1) == batch.y).float().mean()
        return MetaOutput(loss, acc.detach())

    # -- adaptation ---------------------------------------------------------------------------
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int) -> TaskHead:
        """Fit the ``head`` of the config on the support set (``support_x``, ``support_y``, ``n_ways`` as
        in :meth:`Algorithm.adapt`): a linear or cosine classifier on the frozen features, the class
        means, or, for ``finetune``, the backbone and a linear head together; returns the :class:`TaskHead`."""
        check_task(support_x, support_y, n_ways, "Transfer.adapt")
        cfg = self.config
        if cfg.head == "finetune":
            return self._finetune(support_x, support_y, n_ways)
        with torch.no_grad():
            feats = self.features(support_x)
        if cfg.head == "centroid":
            return TaskHead("centroid", class_means(feats, support_y, n_ways))
        return fit_head(feats, support_y, n_ways, cfg.head, cfg.head_steps, cfg.head_weight_decay,
                        cfg.cosine_scale)

    def _finetune(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int) -> TaskHead:
        cfg = self.config
        with _eval_mode(self.backbone), torch.enable_grad():
            params = {n: p.detach().clone().requires_grad_() for n, p in self.backbone.named_parameters()}
            params.update({n: b for n, b in self.backbone.named_buffers()})
            with torch.no_grad():
                mu = class_means(self.features(support_x), support_y, n_ways)
            weight = (2.0 * mu).requires_grad_()
            bias = (-mu.pow(2).sum(-1)).requires_grad_()
            trainable = [p for p in params.values() if p.requires_grad] + [weight, bias]
            opt = torch.optim.Adam(trainable, lr=cfg.finetune_lr)
            for _ in range(cfg.finetune_steps):
                opt.zero_grad()
                logits = self.features(support_x, params) @ weight.T + bias
                F.cross_entropy(logits, support_y).backward()
                opt.step()
        tuned = {n: p.detach() for n, p in params.items()}
        return TaskHead("linear", weight.detach(), bias.detach(), tuned)

    def embeds_per_image(self) -> bool:
        """True unless the ``finetune`` head adapts the backbone."""
        return self.config.head != "finetune"

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised task features of ``x`` (:meth:`features`)."""
        return self.features(x)

    def head_logits(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                    n_ways: int) -> torch.Tensor:
        """Per episode, the ``head`` fitted on the ``support`` features (labels ``support_y``,
        ``n_ways`` classes) scoring the ``query`` features (see :meth:`Algorithm.head_logits`)."""
        cfg = self.config
        out = []
        for s, y, q in zip(support, support_y, query):
            head = (TaskHead("centroid", class_means(s, y, n_ways)) if cfg.head == "centroid" else
                    fit_head(s, y, n_ways, cfg.head, cfg.head_steps, cfg.head_weight_decay, cfg.cosine_scale))
            out.append(head_logits(q, head, cfg.cosine_scale))
        return torch.stack(out)

    def predict(self, adapted: TaskHead, x: torch.Tensor) -> torch.Tensor:
        if adapted.params is not None:
            with _eval_mode(self.backbone):
                feats = self.features(x, adapted.params)
        else:
            feats = self.features(x)
        return head_logits(feats, adapted, self.config.cosine_scale)
