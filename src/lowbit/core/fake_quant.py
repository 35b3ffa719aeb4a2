"""Fake quantization (quantize then dequantize) with a straight-through-estimator gradient."""

from __future__ import annotations

import torch

from lowbit.core.qparams import choose_qparams
from lowbit.core.quantize import dequantize, quantize_codes
from lowbit.spec import QuantSpec


def fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                  zero: torch.Tensor | None = None) -> torch.Tensor:
    """dq(q(x)) in the forward pass; gradient 1 inside the clip range and 0 outside (STE).

    Without scale/zero they are chosen by min-max from x (detached).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if scale is None:
        scale, zero = choose_qparams(x2.detach(), spec)
    with torch.no_grad():
        codes = quantize_codes(x2, scale, zero, spec)
        xq = dequantize(codes, scale, zero, spec, dtype=x.dtype)
        if spec.dtype == "int":
            lo = dequantize(torch.full_like(codes, spec.qmin), scale, zero, spec, dtype=x.dtype)
            hi = dequantize(torch.full_like(codes, spec.qmax), scale, zero, spec, dtype=x.dtype)
            s = (hi - lo) / (spec.qmax - spec.qmin)
            inside = (x2 >= lo - s / 2) & (x2 <= hi + s / 2)
        else:
            inside = torch.ones_like(x2, dtype=torch.bool)
    out = xq + (x2 - x2.detach())  # forward: exactly xq; backward: gradient 1
    out = torch.where(inside, out, xq)
    return out.reshape(shape)
