"""Backbones and heads. ``build_backbone`` turns a validated backbone config into a module with
an ``out_features`` attribute; adding a backbone is one file plus one line in ``BACKBONES``, or,
for your own backbone, one :func:`register_backbone` call (see :mod:`metafit.nn.registry`)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError, short_repr
from ..validation import ConfigModel, named_section, parse_config
from . import adapters
from .adapters import (HFBackbone, HFBackboneConfig, TimmBackbone, TimmBackboneConfig, TorchvisionBackbone,
                       TorchvisionBackboneConfig, resolve_hf)
from .base import BackboneConfig, BatchNormConfig
from .normalize import attach_input_normalization, has_input_normalization
from .conv4 import Conv4, Conv4Config
from .ensemble import Ensemble, EnsembleConfig
from .mlp import MLP, MLPConfig
from .resnet12 import ResNet12, ResNet12Config
from .registry import backbone_spec, check_rebuildable, register_backbone, unregister_backbone

__all__ = [
    "BACKBONES",
    "BackboneConfig",
    "BatchNormConfig",
    "MLP",
    "MLPConfig",
    "Conv4",
    "Conv4Config",
    "Ensemble",
    "EnsembleConfig",
    "ResNet12",
    "ResNet12Config",
    "attach_input_normalization",
    *adapters.__all__,
    "backbone_config",
    "build_backbone",
    "count_backbone_weights",
    "MAX_PARAMETERS",
    "resolve_backbone_config",
    "has_input_normalization",
    "backbone_spec",
    "register_backbone",
    "unregister_backbone",
]

# name -> (config class, module class or factory taking (config, in_channels, image_size[, pretrained]));
# register_backbone adds your own
BACKBONES: dict[str, tuple[type[BackboneConfig], type[nn.Module] | Callable[..., nn.Module]]] = {
    "conv4": (Conv4Config, Conv4),
    "mlp": (MLPConfig, MLP),
    "resnet12": (ResNet12Config, ResNet12),
    "hf": (HFBackboneConfig, HFBackbone),
    "timm": (TimmBackboneConfig, TimmBackbone),
    "torchvision": (TorchvisionBackboneConfig, TorchvisionBackbone),
    "ensemble": (EnsembleConfig, Ensemble),
}


def backbone_config(data: Any) -> ConfigModel:
    """Validate a backbone section ``data`` (a mapping with ``name``, a bare name, or ``None`` for the
    default ``conv4``) into its config class and return it; a config instance is returned as is."""
    if isinstance(data, ConfigModel):
        return data
    name, data = named_section(data, "backbone", BACKBONES, "conv4")
    return parse_config(BACKBONES[name][0], data, "backbone")


#: most weights a built-in backbone may have (4 GiB of float32): larger configs are refused before
#: any memory is allocated
MAX_PARAMETERS = 2**30


def count_backbone_weights(config: ConfigModel, in_channels: int, image_size: int) -> int | None:
    """Learnable weights of the backbone ``config`` describes, counted without allocating them
    (None for backbones whose architecture comes from files: transformers, timm, torchvision; an
    ensemble's is the sum of its members'), for inputs of ``in_channels`` x ``image_size`` x ``image_size``."""
    if isinstance(config, EnsembleConfig):
        counts = [count_backbone_weights(m, in_channels, image_size) for m in config.member_configs()]
        return None if None in counts else sum(counts)
    _, module_cls = BACKBONES[config.name]
    if getattr(module_cls, "loads_weights", False):
        return None
    with torch.device("meta"):
        return sum(p.numel() for p in module_cls(config, in_channels, image_size).parameters())


def build_backbone(config: ConfigModel, in_channels: int, image_size: int, pretrained: bool = True) -> nn.Module:
    """The backbone module ``config`` describes, for ``in_channels`` x ``image_size`` x ``image_size``
    inputs, with an ``out_features`` attribute; ``pretrained=False`` builds an adapter of a pretrained
    model without reading its weights (a checkpoint supplies them). More than :data:`MAX_PARAMETERS`
    weights is a :class:`~metafit.errors.ConfigError`, raised before any memory is allocated.

    >>> import torch
    >>> conv4 = build_backbone(backbone_config({"name": "conv4", "hidden_channels": 8}), 1, 28)
    >>> conv4.out_features, conv4(torch.zeros(2, 1, 28, 28)).shape
    (8, torch.Size([2, 8]))
    """
    _, module_cls = BACKBONES[config.name]
    n = count_backbone_weights(config, in_channels, image_size)
    if n is not None and n > MAX_PARAMETERS:
        raise ConfigError(
            f"Config: the backbone must have at most {MAX_PARAMETERS:,} weights; got {n:,} from "
            f"{short_repr(config.model_dump(mode='json'), 200)} on {in_channels}x{image_size}x{image_size} inputs. "
            "Make the backbone narrower or the images smaller."
        )
    if getattr(module_cls, "loads_weights", False):
        return module_cls(config, in_channels, image_size, pretrained=pretrained)
    return module_cls(config, in_channels, image_size)


def resolve_backbone_config(config: ConfigModel) -> ConfigModel:
    """``config`` with what is learnt from the model's files filled in (a transformers model's
    architecture and input statistics), so that a checkpoint rebuilds the same module offline."""
    if isinstance(config, EnsembleConfig):
        given = config.member_configs()
        members = [resolve_backbone_config(m) for m in given]
        if all(a is b for a, b in zip(members, given)):
            return config
        return config.model_copy(update={"members": [m.model_dump(mode="json") for m in members]})
    return resolve_hf(config) if isinstance(config, HFBackboneConfig) else config
