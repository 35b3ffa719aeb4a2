import math

import pytest
import torch

from lowbit.kvcache.codebook import polar_angle_codebook, sphere_codebook

# Lloyd-Max distortion of a unit-variance Gaussian: the d -> infinity limit of d·E[(x - q(x))²]
GAUSS_LLOYD_MAX = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_approaches_gaussian_lloyd_max(bits):
    assert sphere_codebook(1536, bits).mse == pytest.approx(GAUSS_LLOYD_MAX[bits], rel=0.01)
    # bounded coordinates at small d are easier to quantize, never harder
    assert sphere_codebook(64, bits).mse < sphere_codebook(1536, bits).mse
    assert sphere_codebook(64, bits).mse == pytest.approx(GAUSS_LLOYD_MAX[bits], rel=0.05)
    # above the Shannon lower bound 4^-b
    assert sphere_codebook(64, bits).mse > 4.0 ** -bits


def test_one_bit_levels_are_the_half_normal_mean():
    levels = sphere_codebook(1536, 1).levels_np
    assert levels == pytest.approx([-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)], rel=0.01)


def test_codebook_is_symmetric_sorted_and_cached():
    cb = sphere_codebook(128, 3)
    assert cb is sphere_codebook(128, 3)
    assert torch.all(cb.levels[1:] > cb.levels[:-1])
    assert torch.allclose(cb.levels, -cb.levels.flip(0))
    x = torch.linspace(-4, 4, 101)
    assert torch.equal(cb.decode(cb.encode(x)), cb.levels[(x[:, None] - cb.levels).abs().argmin(1)])


def test_polar_angle_codebooks():
    assert polar_angle_codebook(1, 3).mse == pytest.approx((2 * math.pi / 8) ** 2 / 12)
    # deeper levels concentrate around pi/4 and need fewer bits
    assert polar_angle_codebook(4, 2).mse < polar_angle_codebook(2, 2).mse
    assert abs(polar_angle_codebook(5, 0).levels_np[0] - math.pi / 4) < 1e-3


@pytest.mark.parametrize("dim,bits", [(1, 2), (64, 0), (64, 9), (64, 2.5)])
def test_bad_arguments_named(dim, bits):
    with pytest.raises(ValueError, match="dim|bits"):
        sphere_codebook(dim, bits)
