"""Backbones and heads. ``build_backbone`` turns a validated backbone config into a module with
an ``out_features`` attribute; adding a backbone is one file plus one line in ``BACKBONES``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, short_repr
from ..validation import ConfigModel, named_section, parse_config
from .adapters import (HFBackbone, HFBackboneConfig, TimmBackbone, TimmBackboneConfig, TorchvisionBackbone,
                       TorchvisionBackboneConfig, resolve_hf)
from .base import BackboneConfig, BatchNormConfig
from .normalize import attach_input_normalization, has_input_normalization
from .conv4 import Conv4, Conv4Config
from .mlp import MLP, MLPConfig
from .resnet12 import ResNet12, ResNet12Config

__all__ = [
    "BACKBONES",
    "BackboneConfig",
    "BatchNormConfig",
    "MLP",
    "MLPConfig",
    "Conv4",
    "Conv4Config",
    "ResNet12",
    "ResNet12Config",
    "attach_input_normalization",
    "HFBackbone",
    "HFBackboneConfig",
    "TimmBackbone",
    "TimmBackboneConfig",
    "TorchvisionBackbone",
    "TorchvisionBackboneConfig",
    "backbone_config",
    "build_backbone",
    "count_backbone_weights",
    "MAX_PARAMETERS",
    "resolve_backbone_config",
    "has_input_normalization",
]

# name -> (config class, module class taking (config, in_channels, image_size[, pretrained]))
BACKBONES: dict[str, tuple[type[BackboneConfig], type[nn.Module]]] = {
    "conv4": (Conv4Config, Conv4),
    "mlp": (MLPConfig, MLP),
    "resnet12": (ResNet12Config, ResNet12),
    "hf": (HFBackboneConfig, HFBackbone),
    "timm": (TimmBackboneConfig, TimmBackbone),
    "torchvision": (TorchvisionBackboneConfig, TorchvisionBackbone),
}


def backbone_config(data: Any) -> ConfigModel:
    """Validate a backbone section (a mapping with ``name``) into its config class."""
    if isinstance(data, ConfigModel):
        return data
    name, data = named_section(data, "backbone", BACKBONES, "conv4")
    return parse_config(BACKBONES[name][0], data, "backbone")


#: most weights a built-in backbone may have (4 GiB of float32): larger configs are refused before
#: any memory is allocated
MAX_PARAMETERS = 2**30


def count_backbone_weights(config: ConfigModel, in_channels: int, image_size: int) -> int | None:
    """Learnable weights of the backbone ``config`` describes, counted without allocating them
    (None for backbones whose architecture comes from files: transformers, timm, torchvision)."""
    _, module_cls = BACKBONES[config.name]
    if getattr(module_cls, "loads_weights", False):
        return None
    with torch.device("meta"):
        return sum(p.numel() for p in module_cls(config, in_channels, image_size).parameters())


def build_backbone(config: ConfigModel, in_channels: int, image_size: int, pretrained: bool = True) -> nn.Module:
    """The backbone module; ``pretrained=False`` builds an adapter of a pretrained model without
    reading its weights (a checkpoint supplies them)."""
    _, module_cls = BACKBONES[config.name]
    if getattr(module_cls, "loads_weights", False):
        return module_cls(config, in_channels, image_size, pretrained=pretrained)
    n = count_backbone_weights(config, in_channels, image_size)
    if n is not None and n > MAX_PARAMETERS:
        raise ConfigError(
            f"Config: the backbone must have at most {MAX_PARAMETERS:,} weights; got {n:,} from "
            f"{short_repr(config.model_dump(mode='json'), 200)} on {in_channels}x{image_size}x{image_size} inputs. "
            "Make the backbone narrower or the images smaller."
        )
    return module_cls(config, in_channels, image_size)


def resolve_backbone_config(config: ConfigModel) -> ConfigModel:
    """``config`` with what is learnt from the model's files filled in (a transformers model's
    architecture and input statistics), so that a checkpoint rebuilds the same module offline."""
    return resolve_hf(config) if isinstance(config, HFBackboneConfig) else config
