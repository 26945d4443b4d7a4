"""Input normalisation carried by the model: a backbone built for natural images subtracts a
per-channel mean and divides by a standard deviation before its first layer, so the model
itself takes images in [0, 1] everywhere (training batches, ``adapt``/``predict``, the
service) and the statistics travel with its weights (two buffers, ``input_mean`` and
``input_std``). Backbones that normalise inputs themselves (pretrained adapters, which apply
their own preprocessing statistics) declare ``normalizes_input = True`` and get nothing."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["NORM_BUFFERS", "attach_input_normalization", "has_input_normalization"]

#: names of the buffers holding the statistics
NORM_BUFFERS = ("input_mean", "input_std")


def _normalize(module: nn.Module, args: tuple):
    x = args[0]
    mean = module.input_mean.to(x.dtype)
    std = module.input_std.to(x.dtype)
    shape = (-1, 1, 1) if x.dim() >= 3 else (-1,)
    return ((x - mean.view(shape)) / std.view(shape), *args[1:])


def has_input_normalization(module: nn.Module) -> bool:
    """Whether :func:`attach_input_normalization` gave ``module`` its statistics buffers."""
    return isinstance(getattr(module, "input_mean", None), torch.Tensor)


def attach_input_normalization(module: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Make ``module`` compute ``module((x - mean) / std)`` per channel (in place; returns it).
    ``functional_call`` and ``vmap`` see the same function (the buffers are the module's)."""
    if getattr(module, "normalizes_input", False) or has_input_normalization(module):
        return module
    module.register_buffer("input_mean", torch.tensor([float(m) for m in mean]))
    module.register_buffer("input_std", torch.tensor([float(s) for s in std]))
    module.register_forward_pre_hook(_normalize)
    return module
