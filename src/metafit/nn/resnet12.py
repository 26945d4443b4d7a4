"""ResNet-12: the residual backbone of MetaOptNet (Lee et al., 2019) and RFS (Tian et al., 2020).

Four stages; each is one residual block of three conv3x3-BatchNorm-LeakyReLU(0.1) layers (the
last activation after the residual add) with a conv1x1-BatchNorm shortcut, followed by a 2x2
max-pool. Widths (64, 160, 320, 640) by default. Parameter names follow the reference code
(``layer1.0.conv1.weight``, ``layer1.0.downsample.0.weight``, ...), so a state dict exported by
MetaOptNet or RFS loads with ``backbone.weights`` (their extra keys are reported, not used).

Regularisation as in the reference code, with ``drop_rate`` > 0: dropout after stages 1-2 and
DropBlock (Ghiasi et al., 2018) after stages 3-4. The reference code ramps DropBlock's rate up
over training with a per-block step counter; here the rate is constant (no hidden state, so the
block runs unchanged under ``torch.func.functional_call`` and in thread replicas).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from .base import BatchNormConfig
from .layers import (StableBatchNorm2d, conv_bn_fusable, conv_then_batch_norm, ghost_batches, is_channels_last,
                     max_pool2d, to_channels_last_like)

__all__ = ["ResNet12", "ResNet12Config", "drop_block"]

N_STAGES = 4
SLOPE = 0.1  # LeakyReLU negative slope of the reference implementations


class ResNet12Config(BatchNormConfig):
    """Config of :class:`ResNet12` (``backbone: {name: resnet12}``): stage widths, pooling of the last
    feature map, dropout/DropBlock and the BatchNorm fields."""

    name: Literal["resnet12"] = "resnet12"
    channels: tuple[
        Annotated[int, Field(ge=1, le=4096)], Annotated[int, Field(ge=1, le=4096)],
        Annotated[int, Field(ge=1, le=4096)], Annotated[int, Field(ge=1, le=4096)],
    ] = Field((64, 160, 320, 640), description="output channels of the 4 residual stages (each 1..4096)")
    pool: Literal["avg", "flatten"] = Field(
        "avg",
        description=(
            "avg: average the last feature map to a channels[-1] vector (RFS); "
            "flatten: keep the spatial map, channels[-1] * side**2 features (MetaOptNet)"
        ),
    )
    drop_rate: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="drop probability: dropout after stages 1-2, DropBlock after stages 3-4 (references: 0.1)",
    )
    dropblock_size: int = Field(
        5, ge=1, le=64, description="side of DropBlock's square blocks (clamped to the feature map)"
    )


def drop_block(x: torch.Tensor, drop_rate: float, block_size: int, training: bool) -> torch.Tensor:
    """DropBlock: zero random ``block_size`` x ``block_size`` squares of every channel so that
    about ``drop_rate`` of the activations are dropped, and rescale the rest."""
    if not training or drop_rate <= 0.0:
        return x
    n, c, h, w = x.shape
    bs = max(1, min(block_size, h, w))
    # block corners are drawn where a whole block fits; gamma makes the dropped fraction drop_rate
    gamma = min(1.0, drop_rate * h * w / (bs * bs * (h - bs + 1) * (w - bs + 1)))
    seeds = (torch.rand(n, c, h - bs + 1, w - bs + 1, device=x.device) < gamma).to(x.dtype)
    if bs > 1:
        seeds = F.max_pool2d(F.pad(seeds, (bs - 1, bs - 1, bs - 1, bs - 1)), bs, stride=1)
    keep = 1.0 - seeds
    keep = keep * (keep.numel() / keep.sum().clamp_min(1.0))
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        keep = keep.contiguous(memory_format=torch.channels_last)
    return x * keep


class _Block(nn.Module):
    """conv3x3-BN-LReLU, conv3x3-BN-LReLU, conv3x3-BN, + conv1x1-BN shortcut, max-pool 2, LReLU."""

    def __init__(self, cin: int, cout: int, cfg: ResNet12Config, dropblock: bool) -> None:
        super().__init__()

        def bn(c: int) -> StableBatchNorm2d:
            return StableBatchNorm2d(c, momentum=cfg.bn_momentum, track_running_stats=cfg.bn_mode == "running")

        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = bn(cout)
        self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn3 = bn(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), bn(cout))
        self.drop_rate = cfg.drop_rate
        self.dropblock = dropblock
        self.dropblock_size = cfg.dropblock_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # with one input channel PyTorch cannot tell the input's layout: keep the conv outputs
        # channels_last when the weights are (a weight with several input channels tells)
        ref = self.conv2.weight
        out = F.leaky_relu(self._conv_bn(self.conv1, self.bn1, x, ref), SLOPE, inplace=True)
        out = F.leaky_relu(self.bn2(self.conv2(out)), SLOPE, inplace=True)
        out = self.bn3(self.conv3(out))
        shortcut = self._conv_bn(self.downsample[0], self.downsample[1], x, ref)
        # max-pool before the activation: the same function (LeakyReLU is monotone, so it commutes
        # with max) with the activation and its backward on a 4x smaller tensor
        out = F.leaky_relu(max_pool2d(out + shortcut, 2), SLOPE, inplace=True)
        if self.drop_rate > 0.0:
            if self.dropblock:
                out = drop_block(out, self.drop_rate, self.dropblock_size, self.training)
            else:
                out = F.dropout(out, self.drop_rate, self.training)
        return out

    @staticmethod
    def _conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if conv_bn_fusable(x, conv, bn):  # the first block on images: BatchNorm folded into the conv
            out = conv_then_batch_norm(x, conv, bn)
            return out if is_channels_last(ref) else out.contiguous()
        return bn(to_channels_last_like(conv(x), ref))


class ResNet12(nn.Module):
    """ResNet-12 for ``in_channels`` x ``image_size`` x ``image_size`` images; ``out_features`` is
    ``channels[-1]`` (``pool='avg'``) or ``channels[-1] * side**2`` (``pool='flatten'``, with
    ``side = image_size // 16``: 84 -> 5, Omniglot's 28 -> 1). ``config``: a :class:`ResNet12Config`;
    an ``image_size`` below 16 is a :class:`~metafit.errors.ConfigError`."""

    def __init__(self, config: ResNet12Config, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.config = config
        side = image_size
        for _ in range(N_STAGES):
            side //= 2
        if side < 1:
            raise ConfigError(
                f"ResNet12: image_size must be at least {2 ** N_STAGES} (four 2x2 max-pools); got {image_size}. "
                "Use larger images (data.image_size) or a backbone with fewer pooling stages (conv4 with n_blocks)."
            )
        cin = in_channels
        for i, cout in enumerate(config.channels):
            stage = nn.Sequential(_Block(cin, cout, config, dropblock=i >= 2))
            self.add_module(f"layer{i + 1}", stage)
            cin = cout
        self.out_features = cin if config.pool == "avg" else cin * side * side
        for m in self.modules():  # the reference initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.config.bn_group_size:
            return ghost_batches(self._forward, x, self.config.bn_group_size)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.config.pool == "avg":
            return x.mean((2, 3))
        return x.flatten(1)
