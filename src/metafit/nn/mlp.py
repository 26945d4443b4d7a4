"""A multi-layer perceptron backbone (the 1-40-40-1 regressor of the MAML sinusoid experiments
is ``MLP(hidden=[40, 40])`` with a 1-output head)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from .base import BackboneConfig

__all__ = ["MLP", "MLPConfig"]


class MLPConfig(BackboneConfig):
    """Config of :class:`MLP` (``backbone: {name: mlp}``): the hidden widths and the activation."""

    name: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default_factory=lambda: [40, 40], min_length=1, max_length=16,
                              description="width of each hidden layer")
    activation: Literal["relu", "tanh"] = Field("relu", description="hidden-layer nonlinearity")


class MLP(nn.Module):
    """A multi-layer perceptron: ``Linear``-activation layers of the widths in ``config.hidden``
    (``config``: an :class:`MLPConfig`), no output layer; ``out_features`` is the last width.

    Flattens its input (``in_channels * image_size**2`` features; vectors use image_size 1).

    >>> import torch
    >>> mlp = MLP(MLPConfig(hidden=[40, 40]), in_channels=1, image_size=1)
    >>> mlp(torch.zeros(5, 1)).shape, mlp.out_features
    (torch.Size([5, 40]), 40)
    """

    def __init__(self, config: MLPConfig, in_channels: int, image_size: int) -> None:
        super().__init__()
        if any(h < 1 for h in config.hidden):
            raise ValueError(f"MLP: hidden widths must be >= 1; got {config.hidden}. Use positive widths.")
        self.config = config
        act = nn.ReLU if config.activation == "relu" else nn.Tanh
        layers: list[nn.Module] = []
        width = in_channels * image_size * image_size
        for h in config.hidden:
            layers += [nn.Linear(width, h), act()]
            width = h
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))
