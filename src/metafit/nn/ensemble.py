"""An ensemble of backbones as one backbone: every member embeds the images and the features are
concatenated, each member's scaled by ``1 / sqrt(members)``.

With that scale the squared Euclidean distance between two concatenated embeddings is the mean of
the members' distances, so a Prototypical Network over the ensemble scores a query by the mean of
its members' logits (an ensemble in the usual sense), and everything that works on embeddings
(test-time views, transductive prototypes, calibration, adapt / predict, the service) works on it
unchanged. Other heads see the concatenated features.

Members are trained separately (e.g. the same config with different seeds) and combined with
``metafit ensemble CKPT CKPT ... --out FILE`` (:func:`metafit.training.ensemble_checkpoints`), or
written as a config section whose members name their weights::

    backbone:
      name: ensemble
      members:
        - {name: conv4, hidden_channels: 96, weights: runs/a/best.safetensors}
        - {name: conv4, hidden_channels: 96, weights: runs/b/best.safetensors}
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..errors import ConfigError
from .base import BackboneConfig

__all__ = ["Ensemble", "EnsembleConfig"]

#: most members an ensemble may have
MAX_MEMBERS = 16


class EnsembleConfig(BackboneConfig):
    """Config of :class:`Ensemble` (``backbone: {name: ensemble, members: [...]}``): ``members``, the
    backbone sections of its members (any backbone but another ensemble; each may name its own
    ``weights``), validated and stored with their defaults filled in."""

    name: Literal["ensemble"] = "ensemble"
    members: list[dict[str, Any]] = Field(
        min_length=2, max_length=MAX_MEMBERS,
        description=(
            "the members' backbone sections, e.g. [{name: conv4, weights: runs/a/best.safetensors}, ...]; "
            "their features are concatenated, each scaled by 1/sqrt(members)"
        ),
    )

    @field_validator("members", mode="after")
    @classmethod
    def _valid_members(cls, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [member_config(m, i).model_dump(mode="json") for i, m in enumerate(members)]

    def member_configs(self) -> list[BackboneConfig]:
        """The members' validated config objects."""
        return [member_config(m, i) for i, m in enumerate(self.members)]


def member_config(section: Any, index: int) -> BackboneConfig:
    """Member ``index``'s backbone section validated into its config class (a ``ValueError`` naming
    the member when it is invalid or is itself an ensemble)."""
    from . import backbone_config

    try:
        config = backbone_config(section)
    except ConfigError as err:
        raise ValueError(f"member {index} is invalid ({err})") from err
    if config.name == "ensemble":
        raise ValueError(f"member {index} must be a single backbone, not another ensemble; list its members instead")
    return config


class Ensemble(nn.Module):
    """The members of an :class:`EnsembleConfig` side by side: ``forward(x)`` is the concatenation of
    every member's features of ``x``, each scaled by ``1 / sqrt(len(members))`` (the squared
    Euclidean distance of two outputs is the mean of the members' distances); ``out_features`` is
    the sum of the members'. Built from ``config`` (an :class:`EnsembleConfig`) for inputs of
    ``in_channels`` x ``image_size`` x ``image_size``; ``members`` is an ``nn.ModuleList``, a member's
    weights are ``members.<i>.<name>`` in the state dict. ``pretrained=False`` builds members that adapt
    a pretrained model without reading its files (a checkpoint supplies the weights)."""

    #: build_backbone passes ``pretrained`` through (members may adapt pretrained models)
    loads_weights = True

    def __init__(self, config: EnsembleConfig, in_channels: int, image_size: int, pretrained: bool = True) -> None:
        super().__init__()
        from . import build_backbone

        self.config = config
        self.members = nn.ModuleList(build_backbone(m, in_channels, image_size, pretrained=pretrained)
                                     for m in config.member_configs())
        self.out_features = sum(int(m.out_features) for m in self.members)
        self.scale = 1.0 / math.sqrt(len(self.members))
        # members that normalise their own input (transformers adapters): none is added in front
        self.normalizes_input = all(getattr(m, "normalizes_input", False) for m in self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x).flatten(1) * self.scale for m in self.members], -1)
