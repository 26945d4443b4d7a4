"""What every backbone config shares: its registry ``name`` and where to find pretrained
weights. The weights are read in ``training/`` (this layer does no file I/O); a user-written
backbone config may subclass :class:`BackboneConfig` to get the same fields."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..validation import ConfigModel

__all__ = ["BackboneConfig", "BatchNormConfig"]


class BackboneConfig(ConfigModel):
    """Base of backbone configs; subclasses set ``name`` to a ``Literal`` and add their fields."""

    name: str = Field(description="the backbone's key in the BACKBONES registry")
    weights: str | None = Field(
        None, min_length=1,
        description=(
            "local weights file to initialise the backbone from before meta-training: .safetensors "
            "(a metafit checkpoint works) or a .pt/.pth/.bin state dict, read with weights_only=True "
            "(None: random initialisation)"
        ),
    )
    weights_prefix: str | None = Field(
        None, max_length=1000,
        description=(
            "key prefix to strip from the file's tensor names, e.g. 'model.backbone.' or 'module.' "
            "(None: auto-detect the prefix that matches most backbone tensors; '': none)"
        ),
    )
    weights_strict: bool = Field(
        False,
        description="refuse a weights file that misses a backbone tensor or has unused ones under the prefix",
    )


class BatchNormConfig(BackboneConfig):
    """Base of convolutional backbones with BatchNorm layers (Conv4, ResNet-12)."""

    bn_mode: Literal["running", "transductive"] = Field(
        "running",
        description=(
            "running: batch statistics while training, running averages at evaluation; "
            "transductive: always the statistics of the current task's batch"
        ),
    )
    bn_momentum: float = Field(0.1, gt=0.0, le=1.0, description="BatchNorm running-average momentum")
    bn_group_size: int = Field(
        0, ge=0, le=1_000_000,
        description=(
            "while training: run the backbone on groups of at most this many images, each a strided "
            "sample of the batch, so BatchNorm uses each group's statistics (ghost batch norm) and a CPU's "
            "caches hold a group's activations (faster per image); 0: the whole batch at once"
        ),
    )
