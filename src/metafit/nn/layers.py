"""Building blocks shared by backbones."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaxPool2d", "StableBatchNorm2d", "conv_bn_fusable", "conv_then_batch_norm", "ghost_batches",
           "is_channels_last", "max_pool2d", "to_channels_last_like"]

# a tensor inside torch.func.vmap/grad: memory-format queries are not implemented there, and the
# layout fast paths below do not apply
_is_transformed = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


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
        if not (batch_stats and x.dim() == 4 and not _is_transformed(x) and x.shape[0] > 0 and x.shape[1] > 1
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


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-d tensor laid out channels_last (and not also contiguous, as size-1 dimensions allow)."""
    return (t.dim() == 4 and not _is_transformed(t) and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def to_channels_last_like(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Make a conv output channels_last when the model's weights are: with one input channel
    (Omniglot), PyTorch cannot tell the input's layout and falls back to the slow contiguous
    path for the first, largest activations."""
    if _is_transformed(x) or _is_transformed(weight):
        return x
    if x.dim() == 4 and weight.dim() == 4 and weight.shape[1] > 1 and not weight.is_contiguous() \
            and weight.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    return x



class _ContiguousMaxPool2x2(torch.autograd.Function):
    """2x2/stride-2 max-pooling of a contiguous (NCHW) CPU tensor through the channels_last kernel.

    Measured here (torch 2.13 CPU, 80x64x28x28, one thread): the contiguous forward kernel takes
    17 ms, the channels_last one 1.8 ms, and the layout copy there and back less than the
    difference; forward + backward 19.7 ms -> 9.2 ms. Output, indices and gradient are
    identical to ``F.max_pool2d`` (both kernels scan the window in the same order with the same
    NaN rule; tested with ties, NaN and -inf). The backward is the stock contiguous kernel on the
    saved indices, whose own derivative PyTorch defines, so second-order gradients work.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out, idx = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), [2, 2], [2, 2], [0, 0], [1, 1], False)
        ctx.save_for_backward(x, idx.contiguous())
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, idx = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)


def max_pool2d(x: torch.Tensor, kernel_size: int = 2) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size)`` with a faster path for the 2x2 pooling of contiguous CPU
    tensors (see :class:`_ContiguousMaxPool2x2`); every other case goes to ``F.max_pool2d``."""
    if (kernel_size == 2 and x.dim() == 4 and x.device.type == "cpu" and x.is_floating_point()
            and x.is_contiguous() and x.shape[1] > 1 and x.shape[2] >= 2 and x.shape[3] >= 2
            and not _is_transformed(x)):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return torch.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2).contiguous()
        return _ContiguousMaxPool2x2.apply(x)
    return torch.nn.functional.max_pool2d(x, kernel_size)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose 2x2 case uses :func:`max_pool2d` (same results, faster on CPU)."""

    def __init__(self, kernel_size: int = 2) -> None:
        super().__init__(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2d(x, self.kernel_size)


#: patch sizes (in_channels x kernel area) up to which :func:`conv_then_batch_norm` is used
FUSE_MAX_PATCH = 32


def conv_bn_fusable(x: torch.Tensor, conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn(conv(x))`` can go through :func:`conv_then_batch_norm`: a CPU input that
    needs no gradient (images, not activations), a plain stride-1 zero-padded convolution
    with few input channels (one, or several outside bf16 autocast), and a BatchNorm that
    normalises with the batch's statistics."""
    if not (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and x.dim() == 4
            and x.device.type == "cpu" and x.is_floating_point() and not x.requires_grad):
        return False
    if _is_transformed(x) or _is_transformed(conv.weight) or (bn.weight is not None and _is_transformed(bn.weight)):
        return False
    if conv.in_channels > 1 and torch.is_autocast_enabled(x.device.type):
        # colour images under bf16 autocast: oneDNN's bf16 convolution + BatchNorm is faster than this
        # product (measured here, Conv4 training on 64x64 RGB, channels_last: 635 vs 459 images/s; the
        # one-channel case stays fused, 1850 vs 1502 images/s on Omniglot)
        return False
    kh, kw = conv.kernel_size
    return (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and conv.in_channels * kh * kw <= FUSE_MAX_PATCH
            and (bn.training or bn.running_mean is None)
            and x.shape[0] * (x.shape[2] + 2 * conv.padding[0] - kh + 1) * (x.shape[3] + 2 * conv.padding[1] - kw + 1) > 1)


def conv_then_batch_norm(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))`` with batch statistics, computed as one matrix product on ``x``'s patches.

    With batch statistics BatchNorm of a convolution is again a convolution: channel ``c`` has
    mean ``w_c . m + b_c`` and variance ``w_c^T S w_c``, where ``m`` and ``S`` are the mean and
    covariance of the input patches (in_channels x kernel area numbers each, 9 for one-channel
    3x3), so the layer is ``patches @ (w_c * s_c) + (beta_c - (w_c . m) s_c)`` with
    ``s_c = gamma_c / sqrt(var_c + eps)`` (the conv bias cancels, as in BatchNorm). The patch
    statistics do not depend on the weights and are computed without autograd, in float64: the
    meta-gradient of MAML is sensitive to them (float32 patch covariances, 1e-6 off on Omniglot,
    moved it 3.5e-5 away from the unfused computation; float64 ones: 4e-6, and the layer's
    output is then closer to a float64 BatchNorm than float32 BatchNorm is, 1e-7). Gradients
    and second-order gradients flow through the small per-channel formulas and one matrix product
    per image. It skips BatchNorm's passes over the layer's output, the largest activation of a
    Conv4 on Omniglot: measured here (80 x 1 x 28 x 28 images, one thread, the whole Conv4
    forward + backward) 72 -> 60 ms. Returns a channels_last tensor. Running statistics are
    updated as ``nn.BatchNorm2d`` updates them.
    """
    n, cin, h, w_in = x.shape
    cout = conv.out_channels
    kh, kw = conv.kernel_size
    ph, pw = conv.padding
    k = cin * kh * kw
    ho, wo = h + 2 * ph - kh + 1, w_in + 2 * pw - kw + 1
    with torch.no_grad():
        patches = F.unfold(x, (kh, kw), padding=(ph, pw))  # [n, k, ho*wo]
        count = n * ho * wo
        p64 = patches.double()
        mean64 = p64.mean((0, 2))
        centred = p64 - mean64[None, :, None]
        cov = (torch.bmm(centred, centred.transpose(1, 2)).sum(0) / count).to(x.dtype)
        mean = mean64.to(x.dtype)
        # [n, ho*wo, k + 1]: each position's patch and a 1 that picks up the per-channel shift
        rows = torch.cat([patches.transpose(1, 2), patches.new_ones(n, ho * wo, 1)], 2)
    weight = conv.weight.reshape(cout, k)
    with torch.autocast(x.device.type, enabled=False):  # statistics at full precision, as BatchNorm's under autocast
        var = ((weight @ cov) * weight).sum(1)
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -(weight @ mean) * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        if conv.bias is not None:  # cancelled by the normalisation: its gradient is exactly zero, but defined
            shift = shift + 0.0 * conv.bias
        # [k + 1, cout]: the scaled weights, and the shift as the weight of the constant column
        mixed = torch.cat([(weight * scale[:, None]).t(), shift[None]], 0)
    # one product per image: the weight gradient sums per image, then over the batch (one long
    # float32 sum over all n*ho*wo rows was 15x less accurate, and slower); the shift rides in the
    # product (baddbmm's broadcast bias cost 3.7x the product itself)
    out = torch.bmm(rows, mixed.expand(n, k + 1, cout))  # [n, ho*wo, cout]: NHWC
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            batch_mean = weight @ mean + (conv.bias if conv.bias is not None else 0.0)
            bn.running_mean.mul_(1 - factor).add_(batch_mean.to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1 - factor).add_((var * count / max(count - 1, 1)).to(bn.running_var.dtype),
                                                 alpha=factor)
    return out.view(n, ho, wo, cout).permute(0, 3, 1, 2)


def ghost_batches(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``forward`` applied to groups of at most ``group_size`` rows of ``x``, results in ``x``'s order.

    Group ``j`` of ``g = ceil(n / group_size)`` is ``x[j::g]``, a strided sample of the batch, so every
    group holds a like share of an episode's support and query images. Training-mode BatchNorm then
    normalises with each group's statistics ("ghost batch norm", Hoffer et al. 2017), and every layer
    works on a small group whose activations stay in a CPU's caches. ``group_size`` 0 or at least the
    batch: ``forward(x)`` itself."""
    n = x.shape[0]
    groups = -(-n // group_size) if group_size > 0 else 1
    if groups <= 1:
        return forward(x)
    out = torch.cat([forward(x[j::groups]) for j in range(groups)])
    order = torch.cat([torch.arange(j, n, groups) for j in range(groups)])
    return out.index_select(0, torch.argsort(order).to(out.device))
