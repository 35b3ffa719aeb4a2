import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.kv import QJL, TurboQuantMSE, TurboQuantProd

GAUSS_LLOYD_MAX = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}
PAPER_DPROD = {1: 1.57, 2: 0.56, 3: 0.18, 4: 0.047}  # d·D_prod quoted in the TurboQuant paper


def unit(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_distortion_matches_lloyd_max(dim, bits):
    x = unit(3000, dim, 1)
    q = TurboQuantMSE(dim, bits, seed=3)
    d_mse = ((q(x) - x) ** 2).sum(-1).mean().item()
    assert d_mse == pytest.approx(q.expected_mse, rel=0.04)
    assert d_mse == pytest.approx(GAUSS_LLOYD_MAX[bits], rel=0.06)
    assert d_mse > 4.0 ** -bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_real_packed_bytes(bits):
    p = TurboQuantMSE(128, bits).quantize(torch.randn(2, 5, 128))
    assert p.fields["codes"].dtype == torch.uint8
    assert p.fields["codes"].shape == (2, 5, 16 * bits)
    assert p.bits_per_coordinate == pytest.approx(bits + 16 / 128)


def test_prod_is_unbiased_and_mse_is_biased():
    d, n = 128, 4000
    x, z = unit(n, d, 2), unit(n, d, 3)
    y = 0.7 * x + 0.3 * z  # strongly correlated pairs make the bias visible
    ip = (x * y).sum(-1)
    for bits in (1, 2, 3):
        xh = TurboQuantProd(d, bits, seed=5)(x)
        err = (xh * y).sum(-1) - ip
        assert abs(err.mean().item()) < 4 * err.std().item() / math.sqrt(n)
        # for independent unit y: d·D_prod = pi/2 · D_mse(b-1) (the paper's figures, up to their rounding)
        d_prod = d * (((xh - x) * z).sum(-1) ** 2).mean().item()
        expected = (math.pi / 2) * (GAUSS_LLOYD_MAX[bits - 1] if bits > 1 else 1.0)
        assert d_prod == pytest.approx(expected, rel=0.15)
        assert d_prod < 1.1 * max(PAPER_DPROD[bits], expected)
    # the MSE variant shrinks inner products: slope 2/pi at one bit
    est = (TurboQuantMSE(d, 1, seed=5)(x) * y).sum(-1)
    slope = (est * ip).sum() / (ip * ip).sum()
    assert slope.item() == pytest.approx(2 / math.pi, abs=0.03)


def test_qjl_alone_unbiased_over_sketches():
    # unbiased over the random sketch: average over many seeds (one fixed sketch has its own small bias)
    d, n = 64, 100
    x, y = unit(n, d, 4), unit(n, d, 5)
    y = 0.8 * x + 0.2 * y
    errs = torch.stack([(QJL(d, 1, seed=s)(x) * y).sum(-1) - (x * y).sum(-1) for s in range(60)]).flatten()
    assert abs(errs.mean().item()) < 4 * errs.std().item() / math.sqrt(errs.numel())
    assert QJL(d, 2).quantize(x).bits_per_coordinate == pytest.approx(2 + 16 / d)


def test_fractional_bits_split_channels():
    d = 64
    x = unit(2000, d, 6)
    q = TurboQuantMSE(d, 2.5)
    assert q.quantize(x).bits_per_coordinate == pytest.approx(2.5 + 32 / d)
    e = ((q(x) - x) ** 2).sum(-1).mean().item()
    assert GAUSS_LLOYD_MAX[3] < e < GAUSS_LLOYD_MAX[2]
    # outlier channels are found from data and get the extra bit
    xo = torch.randn(500, d)
    xo[:, [5, 40]] *= 20
    qo = TurboQuantMSE(d, 2 + 2 / 64).with_outliers_from(xo)
    assert sorted(qo._split.hi_idx.tolist()) == [5, 40]


@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 10_000), bits=st.sampled_from([1, 2, 3, 4, 2.5, 3.5]))
def test_scale_equivariant_and_shape_preserving(scale, seed, bits):
    x = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(seed))
    q = TurboQuantMSE(64, bits, seed=seed)
    a, b = q(x), q(x * scale) / scale
    assert a.shape == x.shape
    assert torch.allclose(a, b, rtol=2e-3, atol=1e-4 * a.abs().max().item())


def test_zero_vector_is_exact():
    for q in (TurboQuantMSE(32, 3), TurboQuantProd(32, 3), QJL(32)):
        out = q(torch.zeros(2, 32))
        assert torch.isfinite(out).all() and out.abs().max() == 0


@pytest.mark.parametrize("factory,match", [
    (lambda: TurboQuantMSE(1, 3), "dim"),
    (lambda: TurboQuantMSE(64, 0), "bits"),
    (lambda: TurboQuantMSE(64, 9), "bits"),
    (lambda: TurboQuantMSE(64, "3"), "bits"),
    (lambda: TurboQuantProd(64, 1.5), "bits"),
    (lambda: TurboQuantMSE(64, 3).quantize(torch.randn(4, 32)), "dim=64"),
])
def test_bad_input_named(factory, match):
    with pytest.raises((ValueError, TypeError), match=match):
        factory()


@given(v=st.floats(0.0, 65504.0))
def test_8bit_norm_relative_error(v):
    from lowbit.kvcache.base import decode_norm, encode_norm

    t = torch.tensor([v])
    back = decode_norm(encode_norm(t, 8))
    assert encode_norm(t, 8).dtype == torch.uint8 and torch.isfinite(back).all()
    tol = 1 / 16 * v + 1e-7  # 3 mantissa bits, rounded (fp16 subnormals: absolute 2^-24 steps)
    assert abs(back.item() - v) <= tol + 2 ** -17


def test_8bit_norms_cost_8_bits_and_little_error():
    d = 64
    x = unit(4000, d, 8) * torch.rand(4000, 1) * 30
    for bits, n_norms in ((3, 1), (2.5, 2)):
        q16, q8 = TurboQuantMSE(d, bits, seed=1), TurboQuantMSE(d, bits, seed=1, norm_bits=8)
        assert q8.quantize(x).bits_per_coordinate == pytest.approx(bits + 8 * n_norms / d)
        e16 = ((q16(x) - x) ** 2).sum() / (x ** 2).sum()
        e8 = ((q8(x) - x) ** 2).sum() / (x ** 2).sum()
        assert e16 < e8 < 1.1 * e16  # +1.8% rms norm error: < 10% more distortion at 3 bits
    with pytest.raises(LowbitError, match="norm_bits"):
        TurboQuantMSE(d, 3, norm_bits=4)
