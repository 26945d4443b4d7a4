"""Backbones and heads. ``build_backbone`` turns a validated backbone config into a module with
an ``out_features`` attribute; adding a backbone is one file plus one line in ``BACKBONES``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from ..validation import ConfigModel, parse_config
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
    data = dict(data or {})
    name = data.get("name", "conv4")
    if name not in BACKBONES:
        raise ConfigError(
            f"Config: backbone.name must be one of {sorted(BACKBONES)}; got {name!r}. "
            "Choose one of the listed backbones."
        )
    return parse_config(BACKBONES[name][0], data, "backbone")


def build_backbone(config: ConfigModel, in_channels: int, image_size: int, pretrained: bool = True) -> nn.Module:
    """The backbone module; ``pretrained=False`` builds an adapter of a pretrained model without
    reading its weights (a checkpoint supplies them)."""
    _, module_cls = BACKBONES[config.name]
    if getattr(module_cls, "loads_weights", False):
        return module_cls(config, in_channels, image_size, pretrained=pretrained)
    return module_cls(config, in_channels, image_size)


def resolve_backbone_config(config: ConfigModel) -> ConfigModel:
    """``config`` with what is learnt from the model's files filled in (a transformers model's
    architecture and input statistics), so that a checkpoint rebuilds the same module offline."""
    return resolve_hf(config) if isinstance(config, HFBackboneConfig) else config
