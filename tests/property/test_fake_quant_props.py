"""Straight-through estimator: gradient 1 inside the clip range, 0 outside; forward = dq(q(x))."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from prop_strategies import int_specs, matrices

from lowbit.core import choose_qparams, fake_quantize, quantize
from lowbit.core.groups import expand_params


@st.composite
def spec_and_x(draw):
    spec = draw(int_specs())
    return spec, draw(matrices(spec))


@given(spec_and_x())
def test_forward_equals_dequantized_quantized(sx):
    spec, x = sx
    assert torch.equal(fake_quantize(x, spec), quantize(x, spec).dequantize())


@given(spec_and_x(), st.sampled_from([0.3, 0.6, 1.0]))
def test_ste_gradient_identity_inside_zero_outside(sx, shrink):
    spec, x = sx
    scale, zero = choose_qparams(x, spec, shrink=shrink)  # shrink < 1 pushes values outside the range
    xg = x.clone().requires_grad_(True)
    fake_quantize(xg, spec, scale, zero).backward(torch.ones_like(x))
    s = expand_params(scale, x.shape, spec)
    z = 0 if zero is None else expand_params(zero, x.shape, spec)
    t = x / s + z
    clearly_in = (t > spec.qmin - 0.49) & (t < spec.qmax + 0.49)
    clearly_out = (t < spec.qmin - 0.51) | (t > spec.qmax + 0.51)
    assert bool((xg.grad[clearly_in] == 1).all())
    assert bool((xg.grad[clearly_out] == 0).all())
    if shrink == 1.0:
        assert bool((xg.grad == 1).all())
