"""Conv4: the four-block convolutional backbone of Vinyals et al. (2016) / Snell et al. (2017)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .base import BatchNormConfig
from .layers import (MaxPool2d, StableBatchNorm2d, conv_bn_fusable, conv_then_batch_norm, ghost_batches,
                     is_channels_last, to_channels_last_like)

__all__ = ["Conv4", "Conv4Config"]


class Conv4Config(BatchNormConfig):
    """Config of :class:`Conv4` (``backbone: {name: conv4}``): the width and number of blocks and the
    BatchNorm fields."""

    name: Literal["conv4"] = "conv4"
    hidden_channels: int = Field(64, ge=1, le=4096, description="channels of every conv block")
    n_blocks: int = Field(4, ge=1, le=8, description="number of conv3x3-BN-ReLU-maxpool blocks")
    final_pool: bool = Field(True, description="max-pool in the last block too; false keeps the last block's "
                             "spatial map in the features (a 3 x 3 map at 28 pixels: 9x the features, about "
                             "the same compute)")


def _block(cin: int, cout: int, cfg: Conv4Config, pool: bool = True) -> nn.Sequential:
    # max-pool before ReLU: the same function (ReLU is monotone, so it commutes with max) and the
    # same gradient, with the ReLU and its backward on a 4x smaller tensor
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1),
        StableBatchNorm2d(
            cout, momentum=cfg.bn_momentum, track_running_stats=cfg.bn_mode == "running"
        ),
        MaxPool2d(2) if pool else nn.Identity(),
        nn.ReLU(inplace=True),
    )


class Conv4(nn.Module):
    """4 x [conv3x3-64, BatchNorm, maxpool2, ReLU]; flattens to ``out_features``.

    ``config``: a :class:`Conv4Config` (width ``hidden_channels``, ``n_blocks`` blocks, ``final_pool``);
    ``in_channels``: channels of the input images; ``image_size``: their side, which must be at least
    ``2 ** n_pools`` (a ``ValueError`` otherwise), where ``n_pools`` is ``n_blocks``, one fewer without
    ``final_pool``. ``out_features`` is ``hidden_channels * (image_size // 2**n_pools)**2``.

    With ``model.to(memory_format=torch.channels_last)`` every activation is kept channels_last
    (the fast layout for the CPU kernels here), the single-channel first layer included."""

    def __init__(self, config: Conv4Config, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_channels
        n = config.n_blocks
        pools = [True] * (n - 1) + [config.final_pool]
        blocks = [_block(in_channels if i == 0 else h, h, config, pools[i]) for i in range(n)]
        self.blocks = nn.Sequential(*blocks)
        side = image_size // 2 ** sum(pools)  # floor-halved once per pooling block
        if side < 1:
            raise ValueError(
                f"Conv4: image_size must be at least {2 ** sum(pools)} for {sum(pools)} pooling "
                f"blocks; got {image_size}. Use larger images, fewer blocks or final_pool: false."
            )
        self.out_features = h * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.config.bn_group_size:
            return ghost_batches(self._forward, x, self.config.bn_group_size)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        ref = self.blocks[-1][0].weight  # a weight whose layout is unambiguous (hidden input channels)
        for i, (conv, bn, pool, relu) in enumerate(self.blocks):
            if i == 0 and conv_bn_fusable(x, conv, bn):
                # the first block on images: BatchNorm folded into the convolution (same function,
                # no pass over the largest activation); its channels_last output is pooled there
                x = relu(pool(conv_then_batch_norm(x, conv, bn)))
                if not is_channels_last(ref):
                    x = x.contiguous()  # the contiguous kernels downstream (accurate BatchNorm)
            else:
                x = relu(pool(bn(to_channels_last_like(conv(x), ref))))
        return x.flatten(1)
