"""Building blocks shared by backbones."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["StableBatchNorm2d", "to_channels_last_like"]


class StableBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that avoids catastrophic cancellation on channels_last CPU tensors.

    PyTorch's channels_last CPU kernel computes the batch variance in one pass
    (E[x^2] - E[x]^2), which cancels when a channel's mean is large against its spread: measured
    here, errors of 2e-3 against float64 where the contiguous kernel gives 1e-5. Batch
    normalisation is invariant to a per-channel shift, so we subtract a (detached) per-channel
    reference — the mean of the first example — before calling the fast kernel: the same
    function in exact arithmetic, and the cancellation is gone (1.3e-5 on that input). The
    kernel still sums in float32, so large batches stay 10-50x less accurate than the
    contiguous kernel (1e-6); where bit-level agreement with other libraries matters, use the
    contiguous layout (``train.channels_last=false``). Running statistics are corrected for
    the shift.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_stats = self.training or self.running_mean is None
        if not (batch_stats and x.dim() == 4 and x.shape[0] > 0 and x.shape[1] > 1
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            return super().forward(x)
        shift = x.detach()[0].mean((1, 2))
        update = self.training and self.track_running_stats and self.running_mean is not None
        factor = 0.0
        if update:
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        out, mean, invstd = torch.native_batch_norm(
            x - shift.view(1, -1, 1, 1), self.weight, self.bias, None, None, True, 0.0, self.eps)
        if update:
            with torch.no_grad():
                n = x.numel() // x.shape[1]
                var = invstd.double().pow(-2) - self.eps
                self.running_mean.mul_(1 - factor).add_((mean + shift).to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_((var * n / max(n - 1, 1)).to(self.running_var.dtype),
                                                       alpha=factor)
        return out


def to_channels_last_like(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Make a conv output channels_last when the model's weights are: with one input channel
    (Omniglot), PyTorch cannot tell the input's layout and falls back to the slow contiguous
    path for the first, largest activations."""
    if x.dim() == 4 and weight.dim() == 4 and weight.shape[1] > 1 and not weight.is_contiguous() \
            and weight.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    return x

