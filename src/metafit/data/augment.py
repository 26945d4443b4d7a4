"""Training-time augmentation on whole episode batches (vectorised, seeded)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["random_affine"]


def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 10.0,
                  translate: float = 0.1, scale: tuple[float, float] = (0.9, 1.1),
                  shear: float = 0.0, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Apply an independent random affine transform to every image of ``x`` [N, C, H, W].

    ``shard=(rank, world_size)``: ``x`` is rank's slice of a batch ``world_size`` times larger;
    the random draws of the whole batch are made and rank's share is used, so the union over
    ranks is exactly the single-process result and every rank's generator stays in step."""
    n = x.shape[0]
    rank, world = shard
    u = torch.rand(n * world, 5, generator=generator)[rank * n:(rank + 1) * n]
    angle = (u[:, 0] * 2 - 1) * math.radians(degrees)
    sh = (u[:, 1] * 2 - 1) * math.radians(shear)
    s = scale[0] + u[:, 2] * (scale[1] - scale[0])
    tx = (u[:, 3] * 2 - 1) * translate * 2  # grid coordinates span [-1, 1]
    ty = (u[:, 4] * 2 - 1) * translate * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    # inverse mapping used by affine_grid: output pixel -> input location
    theta = torch.stack(
        [
            torch.stack([cos / s, (-sin + torch.tan(sh) * cos) / s, tx], dim=1),
            torch.stack([sin / s, cos / s, ty], dim=1),
        ],
        dim=1,
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
