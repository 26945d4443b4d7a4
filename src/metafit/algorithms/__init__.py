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
    if not isinstance(name, str) or name not in ALGORITHMS:
        named_section({"name": name}, "algorithm", ALGORITHMS, "protonet")  # the one-line error
    return ALGORITHMS[name]


def algorithm_config(data: Any) -> AlgorithmConfig:
    """Validate an algorithm section (a mapping with ``name``) into that algorithm's config."""
    if isinstance(data, AlgorithmConfig):
        return data
    name, data = named_section(data, "algorithm", ALGORITHMS, "protonet")
    return parse_config(ALGORITHMS[name].Config, data, "algorithm")


def build_algorithm(config: AlgorithmConfig, backbone: nn.Module, n_outputs: int = 5,
                    task_kind: str = "classification") -> Algorithm:
    """The algorithm around ``backbone``; ``n_outputs`` sizes a learned head (classes per task,
    or target dimensions for regression)."""
    return get_algorithm(config.name)(config, backbone, n_outputs, task_kind)
