"""Hypothesis strategies shared by the core property tests."""

import torch
from hypothesis import strategies as st

from lowbit import QuantSpec


@st.composite
def int_specs(draw, bits=st.integers(2, 8)):
    b = draw(bits)
    sym = draw(st.booleans())
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    gs = draw(st.sampled_from([4, 8, 16, 32])) if gran == "group" else None
    izero = draw(st.booleans())
    sdt = draw(st.sampled_from(["float16", "float16", "bfloat16", "float32"]))
    return QuantSpec(bits=b, dtype="int", symmetric=sym, granularity=gran, group_size=gs, integer_zero=izero,
                     scale_dtype=sdt)


@st.composite
def float_specs(draw):
    dtype = draw(st.sampled_from(["nf4", "fp4", "fp8_e4m3", "fp8_e5m2"]))
    bits = 8 if dtype.startswith("fp8") else 4
    gran = draw(st.sampled_from(["channel", "group"]))
    return QuantSpec(bits=bits, dtype=dtype, granularity=gran, group_size=16 if gran == "group" else None)


@st.composite
def matrices(draw, spec: QuantSpec):
    rows = draw(st.integers(1, 6))
    n_groups = draw(st.integers(1, 4))
    cols = n_groups * (spec.group_size or 8)
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 0.05, 1.0, 300.0]))
    shift = draw(st.sampled_from([0.0, 0.5]))  # off-centre data exercises the asymmetric zero point
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) + shift) * scale
