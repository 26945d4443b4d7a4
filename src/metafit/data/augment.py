"""Training-time augmentation on whole episode batches (vectorised, seeded).

Three kinds, applied to float images in [0, 1]:

- :class:`ImageAugment`: the natural-image augmentations of kornia (random crop with padding,
  random resized crop, horizontal flip, colour jitter, RandAugment), each drawing independent
  parameters per image for a whole batch at once. kornia draws from torch's global random
  stream; here every call forks that stream and seeds it from the sampler's own generator, so
  augmentation is reproducible, resumable and leaves the caller's random state untouched.
- :func:`random_affine`: a small random affine warp (rotation, translation, scale, shear), the
  augmentation of the Omniglot recipes; :func:`affine_views`, a fixed set of such warps applied
  alike to every image (test-time augmentation).
- :func:`random_elastic`: an elastic distortion (Simard et al. 2003), a random displacement field
  smoothed by a Gaussian, which bends strokes the way different hands draw them. With both
  ``affine`` and ``elastic`` an :class:`ImageAugment` resamples each image once, through the
  affine map and the displacement together, so the image is interpolated once, not twice.

Distributed training: ``shard=(rank, world_size)`` means the batch is rank's slice of a batch
``world_size`` times larger; parameters are drawn for the whole batch and rank's share is used,
so the union over ranks is exactly the single-process result.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["ImageAugment", "affine_views", "random_affine", "random_elastic"]


def _affine_theta(u: torch.Tensor, degrees: float, translate: float, scale: tuple[float, float],
                  shear: float) -> torch.Tensor:
    """Inverse affine maps ``[n, 2, 3]`` (output pixel -> input location, as ``affine_grid`` takes
    them) from uniform draws ``u`` ``[n, 5]``: rotation, shear, zoom and the two shifts."""
    angle = (u[:, 0] * 2 - 1) * math.radians(degrees)
    sh = (u[:, 1] * 2 - 1) * math.radians(shear)
    s = scale[0] + u[:, 2] * (scale[1] - scale[0])
    tx = (u[:, 3] * 2 - 1) * translate * 2  # grid coordinates span [-1, 1]
    ty = (u[:, 4] * 2 - 1) * translate * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack(
        [
            torch.stack([cos / s, (-sin + torch.tan(sh) * cos) / s, tx], dim=1),
            torch.stack([sin / s, cos / s, ty], dim=1),
        ],
        dim=1,
    )


def _warp(x: torch.Tensor, theta: torch.Tensor, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Resample ``x`` once through the affine maps ``theta`` plus an optional ``displacement``
    ``[N, H, W, 2]`` in grid units (bilinear, zeros outside)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    if displacement is not None:
        grid = grid + displacement.to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@functools.lru_cache(maxsize=16)
def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


@functools.lru_cache(maxsize=16)
def _band(sigma: float, size: int) -> torch.Tensor:
    """``[size, size + len(k) - 1]`` for the Gaussian kernel ``k`` of ``sigma``: row ``i`` holds ``k`` at
    columns ``i .. i + len(k) - 1``, so ``band @ v`` is the valid (unpadded) correlation of ``v`` with
    ``k``. Cached: every training step of a run asks for the same bands (callers never modify them)."""
    k = _gaussian_kernel(sigma)
    band = torch.zeros(size, size + k.numel() - 1)
    for i in range(size):
        band[i, i:i + k.numel()] = k
    return band


def _elastic_field(n: int, size: tuple[int, int], alpha: float, sigma: float, generator: torch.Generator,
                   shard: tuple[int, int]) -> torch.Tensor:
    """Displacements ``[n, H, W, 2]`` in ``grid_sample`` units: uniform noise in [-1, 1] per pixel and
    axis, smoothed by a Gaussian of ``sigma`` pixels, times ``alpha`` pixels. The noise is drawn on a
    canvas larger by the kernel's radius on every side and smoothed without padding, so the field's
    statistics are the same at the border as in the middle."""
    h, w = size
    rank, world = shard
    r = _gaussian_kernel(sigma).numel() // 2
    noise = torch.rand(n * world, 2, h + 2 * r, w + 2 * r, generator=generator)[rank * n:(rank + 1) * n] * 2 - 1
    field = _band(sigma, h) @ noise @ _band(sigma, w).T  # the separable blur as two matrix products (fast on CPUs)
    # one pixel is 2 / size in grid coordinates (align_corners=False); grid's last axis is (x, y)
    scale = torch.tensor([2.0 * alpha / w, 2.0 * alpha / h]).view(1, 2, 1, 1)
    return (field * scale).permute(0, 2, 3, 1)


#: random_affine's ranges when a dict of its arguments leaves one out
_AFFINE_DEFAULTS = {"degrees": 10.0, "translate": 0.1, "scale": (0.9, 1.1), "shear": 0.0}


def _random_warp(x: torch.Tensor, generator: torch.Generator, affine: dict | None, elastic: dict | None,
                 shard: tuple[int, int]) -> torch.Tensor:
    """Resample every image of ``x`` once through a random affine map (``affine``: random_affine's
    arguments) plus an elastic displacement (``elastic``: ``alpha``, ``sigma``). The affine draws come
    first, so a run without ``elastic`` draws exactly what :func:`random_affine` always drew."""
    n = x.shape[0]
    rank, world = shard
    if affine is not None:
        unknown = set(affine) - set(_AFFINE_DEFAULTS)
        if unknown:
            raise ConfigError(f"Augment: unknown affine settings {sorted(unknown)}; use {sorted(_AFFINE_DEFAULTS)}.")
        a = {**_AFFINE_DEFAULTS, **affine}
        u = torch.rand(n * world, 5, generator=generator)[rank * n:(rank + 1) * n]
        theta = _affine_theta(u, a["degrees"], a["translate"], tuple(a["scale"]), a["shear"])
    else:
        theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(n, 2, 3)
    field = None
    if elastic is not None:
        field = _elastic_field(n, (int(x.shape[-2]), int(x.shape[-1])), float(elastic["alpha"]),
                               float(elastic["sigma"]), generator, shard)
    return _warp(x, theta, field)


def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 10.0,
                  translate: float = 0.1, scale: tuple[float, float] = (0.9, 1.1),
                  shear: float = 0.0, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Apply an independent random affine transform to every image of ``x`` [N, C, H, W] and return
    the warped images (bilinear, zeros outside).

    The parameters are drawn from ``generator``, uniformly per image: a rotation within
    ``+-degrees``, a translation within ``+-translate`` of the image size, a zoom in ``scale``
    ``(min, max)`` and a shear within ``+-shear`` degrees. ``shard``: ``(rank, world_size)``, see
    the module docstring."""
    affine = dict(degrees=degrees, translate=translate, scale=scale, shear=shear)
    return _random_warp(x, generator, affine, None, shard)


def random_elastic(x: torch.Tensor, generator: torch.Generator, alpha: float = 34.0, sigma: float = 4.0,
                   shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Apply an independent elastic distortion (Simard, Steinkraus & Platt 2003) to every image of
    ``x`` [N, C, H, W] and return the distorted images (bilinear, zeros outside).

    Each image gets its own displacement field, drawn from ``generator``: uniform noise in [-1, 1]
    for every pixel and axis, smoothed by a Gaussian of standard deviation ``sigma`` pixels and
    scaled by ``alpha`` pixels. Small ``sigma`` gives jitter, large ``sigma`` gentle bends; Simard et
    al. used ``alpha=34, sigma=4`` on 28 x 28 digits (displacements of about 1.4 pixels). The
    units are pixels of ``x``, so scale both with the image size. ``shard``: ``(rank, world_size)``,
    see the module docstring."""
    return _random_warp(x, generator, None, dict(alpha=alpha, sigma=sigma), shard)


def affine_views(x: torch.Tensor, n_views: int, degrees: float = 10.0, translate: float = 0.1,
                 scale: tuple[float, float] = (0.9, 1.1), shear: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``n_views`` warped copies of the images ``x`` [N, C, H, W], as ``[n_views, N, C, H, W]``
    (test-time augmentation). View ``k`` applies the ``k``-th of ``n_views`` affine warps drawn once
    from ``seed``, the same warp for every image, so an image's views never depend on which other
    images share its batch. The ranges are :func:`random_affine`'s: a rotation within ``+-degrees``,
    a shift within ``+-translate`` of the image size, a zoom in ``scale`` ``(min, max)`` and a shear
    within ``+-shear`` degrees."""
    u = torch.rand(n_views, 5, generator=torch.Generator().manual_seed(seed))
    theta = _affine_theta(u, degrees, translate, scale, shear)  # [n_views, 2, 3]
    n = x.shape[0]
    views = _warp(x.repeat(n_views, 1, 1, 1), theta.repeat_interleave(n, dim=0))
    return views.reshape(n_views, *x.shape)


# parameter entries kornia shares across the batch (not one row per image)
_SHARED_KEYS = ("order", "forward_input_shape")


def _shard_params(params, rank: int, n: int, total: int):
    """Rank's rows of kornia parameters drawn for a batch of ``total`` images (nested ParamItems
    included); shared entries are kept, the input shape is the local one."""
    if isinstance(params, list):
        return [_shard_params(p, rank, n, total) for p in params]
    if hasattr(params, "name") and hasattr(params, "data"):  # kornia's ParamItem (a container's entry)
        return type(params)(params.name, _shard_params(params.data, rank, n, total))
    if isinstance(params, dict):
        out = {}
        for key, value in params.items():
            if key == "forward_input_shape" and torch.is_tensor(value) and value.numel():
                value = value.clone()
                value[0] = n
            elif key not in _SHARED_KEYS and torch.is_tensor(value) and value.dim() and value.shape[0] == total:
                value = value[rank * n:(rank + 1) * n]
            out[key] = value
        return out
    return params


@dataclass(frozen=True)
class ImageAugment:
    """A seeded, batched natural-image augmentation pipeline (see the module docstring).

    ``crop``: ``"random"`` (a random ``size`` crop of the image zero-padded by ``crop_padding``
    pixels, the few-shot recipe of Tian et al. 2020), ``"resized"`` (a random area fraction in
    ``[crop_scale_min, 1]`` and aspect ratio in [3/4, 4/3], resized back to the image size) or
    ``"none"``; then a horizontal ``flip``; ``rand_augment`` (``n`` operations of magnitude
    ``m``, Cubuk et al. 2020); ``color_jitter`` (brightness, contrast and saturation factors
    drawn from [1 - s, 1 + s]) with ``hue`` (a shift in [-hue, hue] of a full turn); and the
    small ``affine`` warp (a dict of :func:`random_affine` arguments) and the ``elastic``
    distortion (a dict of :func:`random_elastic`'s ``alpha`` and ``sigma``) last, as one
    resampling. ``rand_augment_n`` and ``rand_augment_m`` are RandAugment's ``n`` and ``m``. An
    unknown ``crop`` is a :class:`~metafit.errors.ConfigError`. Frozen; call it as ``augment(x, generator, shard)``."""

    crop: str = "none"
    crop_padding: int = 8
    crop_scale_min: float = 0.08
    flip: bool = False
    color_jitter: float = 0.0
    hue: float = 0.0
    rand_augment: bool = False
    rand_augment_n: int = 2
    rand_augment_m: int = 9
    affine: dict | None = None
    elastic: dict | None = None

    def __post_init__(self) -> None:
        if self.crop not in ("none", "random", "resized"):
            raise ConfigError(
                f"Augment: crop must be one of 'none', 'random', 'resized'; got {self.crop!r}. Choose one of those."
            )

    @property
    def uses_kornia(self) -> bool:
        return (self.crop != "none" or self.flip or self.color_jitter > 0 or self.hue > 0 or self.rand_augment)

    def _ops(self, size: tuple[int, int]) -> list:
        cache = self.__dict__.setdefault("_op_cache", {})
        if size in cache:
            return cache[size]
        try:
            import kornia.augmentation as K  # noqa: PLC0415
            from kornia.augmentation.auto import RandAugment  # noqa: PLC0415
        except ImportError as err:  # pragma: no cover - kornia is a dependency
            raise ConfigError(
                "Augment: natural-image augmentation needs the kornia package; got an import error "
                f"({err}). Install it with pip install kornia."
            ) from err
        ops = []
        if self.crop == "random":
            ops.append(K.RandomCrop(size, padding=self.crop_padding))
        elif self.crop == "resized":
            ops.append(K.RandomResizedCrop(size, scale=(self.crop_scale_min, 1.0)))
        if self.flip:
            ops.append(K.RandomHorizontalFlip())
        if self.rand_augment:
            ops.append(RandAugment(n=self.rand_augment_n, m=self.rand_augment_m))
        if self.color_jitter > 0 or self.hue > 0:
            s = self.color_jitter
            ops.append(K.ColorJitter(s, s, s, self.hue, p=1.0))
        cache[size] = ops
        return ops

    def __call__(self, x: torch.Tensor, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Augment images ``x`` [N, C, H, W] (floats in [0, 1]) with draws from ``generator`` and return
        them (in [0, 1]); ``shard``: ``(rank, world_size)``, see the module docstring."""
        rank, world = shard
        n = x.shape[0]
        if self.uses_kornia and n:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            ops = self._ops((int(x.shape[-2]), int(x.shape[-1])))
            gray = x.shape[1] == 1 and (self.color_jitter > 0 or self.hue > 0 or self.rand_augment)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                y = x.expand(-1, 3, -1, -1) if gray else x  # colour operations need three channels
                for op in ops:
                    params = op.forward_parameters(torch.Size((n * world, *y.shape[1:])))
                    y = op(y, params=_shard_params(params, rank, n, n * world) if world > 1 else params)
                x = y.mean(1, keepdim=True) if gray else y.contiguous()
            x = x.clamp_(0.0, 1.0)
        if self.affine is not None or self.elastic is not None:
            x = _random_warp(x, generator, self.affine, self.elastic, shard)
        return x
