"""Backbones and heads. ``build_backbone`` turns a validated backbone config into a module with
an ``out_features`` attribute; adding a backbone is one file plus one line in ``BACKBONES``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from ..validation import ConfigModel, parse_config
from .base import BackboneConfig, BatchNormConfig
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
    "backbone_config",
    "build_backbone",
]

# name -> (config class, module class taking (config, in_channels, image_size))
BACKBONES: dict[str, tuple[type[BackboneConfig], type[nn.Module]]] = {
    "conv4": (Conv4Config, Conv4),
    "mlp": (MLPConfig, MLP),
    "resnet12": (ResNet12Config, ResNet12),
}


def backbone_config(data: Any) -> ConfigModel:
    """Validate a backbone section (a mapping with ``name``) into its config class."""
    if isinstance(data, ConfigModel):
        return data
    data = dict(data or {})
    name = data.get("name", "conv4")
    if name not in BACKBONES:
        raise ConfigError(
            f"Config: backbone.name must be one of {sorted(BACKBONES)}; got {name!r}. "
            "Choose one of the listed backbones."
        )
    return parse_config(BACKBONES[name][0], data, "backbone")


def build_backbone(config: ConfigModel, in_channels: int, image_size: int) -> nn.Module:
    _, module_cls = BACKBONES[config.name]
    return module_cls(config, in_channels, image_size)
