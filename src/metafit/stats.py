"""Summary statistics shared by every report: one definition of the mean and its 95% interval."""

from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ["mean_ci"]


def mean_ci(values: torch.Tensor | Iterable[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width of ``values`` (normal approximation:
    ``1.96 * sd / sqrt(n)`` with the unbiased standard deviation, in float64); the half-width is
    NaN for fewer than two values (and the mean NaN too for none). ``values``: a tensor of any shape
    (flattened) or an iterable of numbers. Returns ``(mean, half_width)`` as Python floats.

    >>> mean_ci([1.0, 2.0, 3.0, 4.0])
    (2.5, 1.2651745597610895)
    >>> mean_ci([7.0])
    (7.0, nan)
    """
    v = torch.as_tensor(values if isinstance(values, torch.Tensor) else list(values), dtype=torch.float64).flatten()
    n = v.numel()
    if n < 2:
        return float(v.mean()) if n else float("nan"), float("nan")
    return float(v.mean()), float(1.96 * v.std(unbiased=True) / math.sqrt(n))
