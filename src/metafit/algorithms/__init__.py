"""Algorithm registry. Adding an algorithm is one file plus one line in ``ALGORITHMS``; the CLI,
configs, checkpoints, evaluation and the contract test-suite pick it up from here."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..validation import named_section, parse_config
from .base import Adapted, Algorithm, AlgorithmConfig, MetaOutput, check_task
from .anil import ANIL, ANILConfig
from .common import FastWeights, InnerLoopConfig
from .maml import MAML, MAMLConfig
from .metasgd import MetaSGD, MetaSGDConfig
from .metaoptnet import MetaOptNetSVM, SVMConfig, SVMWeights
from .protonet import ProtoNet, ProtoNetConfig, Prototypes
from .r2d2 import R2D2, RidgeConfig, RidgeWeights
from .reptile import Reptile, ReptileConfig
from .transfer import TaskHead, Transfer, TransferConfig

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "ANILConfig",
    "FastWeights",
    "InnerLoopConfig",
    "MAML",
    "MAMLConfig",
    "MetaSGD",
    "MetaSGDConfig",
    "MetaOptNetSVM",
    "SVMConfig",
    "SVMWeights",
    "R2D2",
    "RidgeConfig",
    "RidgeWeights",
    "Reptile",
    "ReptileConfig",
    "TaskHead",
    "Transfer",
    "TransferConfig",
    "Adapted",
    "Algorithm",
    "AlgorithmConfig",
    "MetaOutput",
    "ProtoNet",
    "ProtoNetConfig",
    "Prototypes",
    "algorithm_config",
    "build_algorithm",
    "check_task",
    "get_algorithm",
]

ALGORITHMS: dict[str, type[Algorithm]] = {
    ProtoNet.name: ProtoNet,
    MAML.name: MAML,
    ANIL.name: ANIL,
    MetaSGD.name: MetaSGD,
    Reptile.name: Reptile,
    MetaOptNetSVM.name: MetaOptNetSVM,
    R2D2.name: R2D2,
    Transfer.name: Transfer,
}


def get_algorithm(name: str) -> type[Algorithm]:
    """The algorithm class registered under ``name`` in :data:`ALGORITHMS` (e.g. ``"maml"``); an
    unknown name is a one-line :class:`~metafit.errors.ConfigError` listing the valid ones.

    >>> get_algorithm("protonet").__name__
    'ProtoNet'
    """
    if not isinstance(name, str) or name not in ALGORITHMS:
        named_section({"name": name}, "algorithm", ALGORITHMS, "protonet")  # the one-line error
    return ALGORITHMS[name]


def algorithm_config(data: Any) -> AlgorithmConfig:
    """Validate an algorithm section ``data`` (a mapping with ``name``, a bare name, or ``None`` for
    the default ``protonet``) into that algorithm's config and return it; a config instance is
    returned as is. Invalid sections raise a one-line :class:`~metafit.errors.ConfigError`.

    >>> algorithm_config({"name": "maml", "inner_steps": 2, "first_order": True}).inner_steps
    2
    >>> type(algorithm_config("anil")).__name__
    'ANILConfig'
    """
    if isinstance(data, AlgorithmConfig):
        return data
    name, data = named_section(data, "algorithm", ALGORITHMS, "protonet")
    return parse_config(ALGORITHMS[name].Config, data, "algorithm")


def build_algorithm(config: AlgorithmConfig, backbone: nn.Module, n_outputs: int = 5,
                    task_kind: str = "classification") -> Algorithm:
    """The algorithm ``config`` names (``config.name``), built around ``backbone``; ``n_outputs``
    sizes a learned head (classes per task, or target dimensions for regression); ``task_kind`` is
    ``"classification"`` or ``"regression"`` (an algorithm that does not support it raises a
    :class:`~metafit.errors.ConfigError`). Returns the :class:`Algorithm`, a fresh ``nn.Module``.

    A ProtoNet on a small Conv4, adapted to a random 5-way 2-shot task:

    >>> import torch
    >>> from metafit.nn import Conv4Config, MLPConfig, build_backbone
    >>> _ = torch.manual_seed(0)
    >>> backbone = build_backbone(Conv4Config(hidden_channels=8), in_channels=1, image_size=28)
    >>> model = build_algorithm(ProtoNetConfig(), backbone)
    >>> adapted = model.adapt(torch.rand(10, 1, 28, 28), torch.arange(5).repeat(2), n_ways=5)
    >>> model.predict(adapted, torch.rand(3, 1, 28, 28)).shape
    torch.Size([3, 5])

    MAML on a tiny MLP regressor, one meta-training step's loss on a batch of 4 synthetic tasks:

    >>> from metafit.types import TaskBatch
    >>> mlp = build_backbone(MLPConfig(hidden=[16, 16]), in_channels=1, image_size=1)
    >>> maml = build_algorithm(MAMLConfig(inner_steps=1), mlp, n_outputs=1, task_kind="regression")
    >>> x = torch.rand(4, 10, 1)
    >>> batch = TaskBatch(x[:, :5], torch.sin(x[:, :5]), x[:, 5:], torch.sin(x[:, 5:]), n_ways=1)
    >>> out = maml.meta_loss(batch)
    >>> out.loss.ndim, out.loss.requires_grad
    (0, True)
    """
    return get_algorithm(config.name)(config, backbone, n_outputs, task_kind)
