"""NF4 / FP4 / FP8 round trips and the group-size error."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from prop_strategies import float_specs, matrices

from lowbit import QuantSpec
from lowbit.core import quantize, quantize_codes
from lowbit.core.formats import codebook
from lowbit.core.groups import expand_params
from lowbit.errors import LowbitError


@st.composite
def spec_and_x(draw):
    spec = draw(float_specs())
    return spec, draw(matrices(spec))


def _half_gap(dtype: str) -> float:
    v = torch.sort(codebook(dtype)).values
    return float((v[1:] - v[:-1]).max()) / 2


@given(spec_and_x())
def test_codes_range_and_error_bound(sx):
    spec, x = sx
    qw = quantize(x, spec)
    assert qw.codes.dtype == torch.uint8 and qw.zero is None
    s = expand_params(qw.scale, x.shape, spec)
    err = (x - qw.dequantize()).abs()
    if spec.is_codebook:
        assert int(qw.codes.max()) < 16
        assert bool((err <= _half_gap(spec.dtype) * s * (1 + 1e-5) + 1e-7).all())
    else:  # fp8: relative error of a float with m mantissa bits, plus the subnormal step
        m = 3 if spec.dtype == "fp8_e4m3" else 2
        sub = 2.0 ** (-9 if m == 3 else -16)
        assert bool((err <= x.abs() * 2.0 ** -(m + 1) * (1 + 1e-5) + sub * s).all())


@given(spec_and_x())
def test_dequantized_values_round_trip(sx):
    spec, x = sx
    qw = quantize(x, spec)
    d = qw.dequantize()
    again = quantize_codes(d, qw.scale, None, spec)
    # FP4 has +0 and -0, so compare values rather than codes
    from lowbit.core import dequantize
    assert torch.equal(dequantize(again, qw.scale, None, spec), d)


@pytest.mark.parametrize("dtype", ["nf4", "fp4"])
def test_codebook_values_are_exact(dtype):
    spec = QuantSpec(bits=4, dtype=dtype, granularity="tensor")
    table = codebook(dtype)
    x = (table * 0.25).reshape(1, 16)
    qw = quantize(x, spec)
    assert torch.equal(qw.dequantize(), x)


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_matches_torch_cast(dtype):
    spec = QuantSpec(bits=8, dtype=dtype, granularity="tensor")
    x = torch.randn(4, 32)
    qw = quantize(x, spec)
    ref_dtype = torch.float8_e4m3fn if dtype == "fp8_e4m3" else torch.float8_e5m2
    ref = (x / qw.scale).to(ref_dtype).float() * qw.scale
    assert torch.equal(qw.dequantize(), ref)


@given(st.integers(2, 300), st.sampled_from([32, 64, 128, 256]))
def test_group_size_that_does_not_divide_raises_naming_it(cols, gs):
    spec = QuantSpec(bits=4, granularity="group", group_size=gs)
    x = torch.randn(2, cols)
    if cols % gs == 0:
        quantize(x, spec)
        return
    with pytest.raises(LowbitError, match=f"group_size={gs}.*{cols}"):
        quantize(x, spec)
