"""Properties of integer quantization: range, error bound, idempotence, symmetric zero."""

import torch

from hypothesis import given
from hypothesis import strategies as st
from prop_strategies import int_specs, matrices

from lowbit.core import choose_qparams, dequantize, quantize, quantize_codes
from lowbit.core.groups import expand_params, to_groups


@st.composite
def spec_and_x(draw):
    spec = draw(int_specs())
    return spec, draw(matrices(spec))


@given(spec_and_x())
def test_codes_stay_in_range(sx):
    spec, x = sx
    qw = quantize(x, spec)
    assert qw.codes.dtype == (torch.int8 if spec.symmetric else torch.uint8)
    assert int(qw.codes.min()) >= spec.qmin and int(qw.codes.max()) <= spec.qmax
    assert qw.codes.shape == x.shape


@given(spec_and_x())
def test_error_at_most_half_step_inside_clip_range(sx):
    spec, x = sx
    qw = quantize(x, spec)
    s = expand_params(qw.scale, x.shape, spec)
    z = 0 if qw.zero is None else expand_params(qw.zero, x.shape, spec)
    lo, hi = (spec.qmin - z) * s, (spec.qmax - z) * s
    inside = (x >= lo) & (x <= hi)
    err = (x - qw.dequantize()).abs()
    bound = s / 2 * (1 + 1e-5) + 1e-6 * x.abs()
    assert bool((err[inside] <= bound[inside]).all())
    # min-max parameters clip nothing but (asymmetric) zero-point rounding: < one step outside
    assert bool((err <= s * (1 + 1e-5) + 1e-6 * x.abs()).all())


@given(spec_and_x())
def test_requantizing_dequantized_values_is_identity(sx):
    spec, x = sx
    qw = quantize(x, spec)
    again = quantize_codes(qw.dequantize(), qw.scale, qw.zero, spec)
    assert torch.equal(again, qw.codes)


@given(spec_and_x())
def test_symmetric_means_zero_point_none_and_zero_maps_to_zero(sx):
    spec, x = sx
    scale, zero = choose_qparams(x, spec)
    if spec.symmetric:
        assert zero is None
        z = quantize_codes(torch.zeros_like(x), scale, zero, spec)
        assert bool((z == 0).all())
    elif spec.integer_zero:
        assert zero is not None and torch.equal(zero, torch.round(zero))
        # 0.0 is exactly representable (its code is the zero point)
        z = quantize_codes(torch.zeros_like(x), scale, zero, spec)
        assert bool((dequantize(z, scale, zero, spec) == 0).all())
    else:
        # float zero point: each group's min and max are the end codes, exact up to the rounding
        # of scale and zero to their storage dtype (float16: 2**-11 relative each)
        qw = quantize(x, spec)
        g = to_groups(x, spec)
        dq = to_groups(qw.dequantize(), spec)
        span = (g.amax(-1) - g.amin(-1)).clamp_min(1e-30)
        rel = {"float32": 1e-5, "bfloat16": 2.0**-7, "float16": 2.0**-10}[spec.scale_dtype]
        tol = rel * (span + g.abs().amax(-1)) + 1e-7
        assert bool(((dq.amin(-1) - g.amin(-1)).abs() <= tol).all())
        assert bool(((dq.amax(-1) - g.amax(-1)).abs() <= tol).all())


@given(spec_and_x(), st.sampled_from([0.5, 0.8, 1.0]))
def test_shrink_never_increases_the_scale(sx, shrink):
    spec, x = sx
    s1, _ = choose_qparams(x, spec)
    s2, _ = choose_qparams(x, spec, shrink=shrink)
    assert bool((s2 <= s1 * (1 + 1e-6)).all())


@given(spec_and_x())
def test_record_holds_exactly_the_parameters_the_codes_were_chosen_against(sx):
    """Scales and zeros are rounded to the storage dtype before the codes are chosen, so the record
    stores them in that dtype without a second rounding, and re-quantizing reproduces the codes."""
    spec, x = sx
    qw = quantize(x, spec)
    assert qw.scale.dtype == spec.torch_scale_dtype
    assert qw.zero is None or qw.zero.dtype == spec.torch_scale_dtype
    assert torch.equal(quantize_codes(x, qw.scale.float(), None if qw.zero is None else qw.zero.float(), spec),
                       qw.codes)
