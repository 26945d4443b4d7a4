"""Elastic distortion (Simard et al. 2003) of training images: units, statistics, seeding, sharding,
and its composition with the affine warp as one resampling."""

import pytest
import torch

from metafit.data import ImageAugment, random_affine, random_elastic
from metafit.data.augment import _elastic_field, _gaussian_kernel
from metafit.errors import ConfigError
from metafit.training import make_config


def _ramps(h, w):
    """Two channels: the x and the y pixel coordinate (bilinear resampling reproduces them exactly)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.stack([xs, ys])[None]


def test_elastic_moves_every_pixel_by_its_displacement_in_pixels_along_the_right_axis():
    h, w, alpha, sigma = 24, 40, 3.0, 2.0
    x = _ramps(h, w).repeat(5, 1, 1, 1)
    out = random_elastic(x, torch.Generator().manual_seed(3), alpha=alpha, sigma=sigma)
    field = _elastic_field(5, (h, w), alpha, sigma, torch.Generator().manual_seed(3), (0, 1)).double()
    px = torch.stack([field[..., 0] * w / 2, field[..., 1] * h / 2], dim=1)  # [n, 2, h, w] in pixels
    # where the displaced point stays inside the image, the ramps read back its coordinates
    inside = ((x[:, :1] + px[:, :1]).clamp(0, w - 1) == x[:, :1] + px[:, :1]) & (
        (x[:, 1:] + px[:, 1:]).clamp(0, h - 1) == x[:, 1:] + px[:, 1:])
    assert inside.float().mean() > 0.8
    torch.testing.assert_close((out - x)[inside.expand_as(x)], px[inside.expand_as(x)], rtol=0, atol=1e-9)


def test_elastic_field_has_the_smoothed_noise_statistics_everywhere():
    alpha, sigma, size = 10.0, 3.0, 20
    field = _elastic_field(4000, (size, size), alpha, sigma, torch.Generator().manual_seed(0), (0, 1))
    px = field * size / 2
    k = _gaussian_kernel(sigma).double()
    expected = alpha / 3 ** 0.5 * float((k ** 2).sum())  # std of U(-1, 1) times the 2-D kernel's norm
    for where in [(0, 0), (size // 2, size // 2), (size - 1, 0)]:  # corners as in the middle
        std = px[:, where[0], where[1]].std(dim=0)
        assert torch.allclose(std.double(), torch.tensor([expected] * 2, dtype=torch.float64), rtol=0.06)
    assert abs(float(px.mean())) < 0.02 * expected


def test_elastic_is_seeded_and_zero_alpha_is_the_identity():
    x = torch.rand(6, 1, 16, 16)
    a = random_elastic(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, random_elastic(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, random_elastic(x, torch.Generator().manual_seed(2)))
    assert a.shape == x.shape and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    torch.testing.assert_close(random_elastic(x, torch.Generator(), alpha=0.0), x, rtol=0, atol=1e-5)


def test_affine_plus_elastic_draws_the_affine_warp_first_and_resamples_once():
    x = torch.rand(6, 1, 16, 16)
    affine = {"degrees": 10.0, "translate": 0.1, "scale": (0.85, 1.15), "shear": 10.0}
    # without a displacement the pipeline is exactly random_affine: same draws, same images
    flat = ImageAugment(affine=affine, elastic={"alpha": 0.0, "sigma": 4.0})(x, torch.Generator().manual_seed(5))
    assert torch.equal(flat, random_affine(x, torch.Generator().manual_seed(5), **affine))
    bent = ImageAugment(affine=affine, elastic={"alpha": 2.0, "sigma": 2.0})(x, torch.Generator().manual_seed(5))
    assert not torch.allclose(bent, flat)
    # one resampling through affine map plus displacement: on coordinate ramps the output is the
    # affine map's source point shifted by the field drawn after the affine draws
    h, w = 20, 28
    ramps = _ramps(h, w).repeat(6, 1, 1, 1)
    out = ImageAugment(affine=affine, elastic={"alpha": 1.0, "sigma": 2.0})(ramps, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    torch.rand(6, 5, generator=g)
    field = _elastic_field(6, (h, w), 1.0, 2.0, g, (0, 1)).double()
    px = torch.stack([field[..., 0] * w / 2, field[..., 1] * h / 2], dim=1)
    src = random_affine(ramps, torch.Generator().manual_seed(9), **affine)
    core = (slice(None), slice(None), slice(6, h - 6), slice(8, w - 8))  # away from the zero padding
    torch.testing.assert_close((out - src)[core], px[core], rtol=0, atol=1e-9)


def test_elastic_shards_union_to_the_single_process_batch():
    x = torch.rand(8, 1, 12, 12)
    aug = ImageAugment(affine={"degrees": 10.0}, elastic={"alpha": 4.0, "sigma": 2.0})
    whole = aug(x, torch.Generator().manual_seed(7))
    parts = [aug(x[r * 4:(r + 1) * 4], torch.Generator().manual_seed(7), shard=(r, 2)) for r in range(2)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-6)


def test_augment_config_turns_elastic_on_by_its_alpha():
    assert make_config({"augment": {"elastic_sigma": 3.0}}).augment.augmenter() is None
    aug = make_config({"augment": {"elastic_alpha": 34, "elastic_sigma": 4}}).augment.augmenter()
    assert aug is not None and aug.affine is None and aug.elastic == {"alpha": 34.0, "sigma": 4.0}
    with pytest.raises(Exception, match="elastic_sigma"):
        make_config({"augment": {"elastic_alpha": 1.0, "elastic_sigma": 0.0}})


def test_unknown_affine_setting_is_named():
    with pytest.raises(ConfigError, match="degree.*use"):
        ImageAugment(affine={"degree": 10.0})(torch.rand(2, 1, 8, 8), torch.Generator())
