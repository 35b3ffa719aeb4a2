"""Choosing scale and zero point from a tensor's range (min-max, with optional range shrink)."""

from __future__ import annotations

import torch

from lowbit.core.formats import codebook_max, fp8_max
from lowbit.core.groups import as_2d, to_groups
from lowbit.spec import QuantSpec

EPS = 1e-10


def range_to_qparams(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (None when symmetric) covering [xmin, xmax]; shapes are kept."""
    if spec.dtype != "int":
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        top = codebook_max(spec.dtype) if spec.is_codebook else fp8_max(spec.dtype)
        return (absmax / top).clamp_min(EPS), None
    if spec.symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        return (absmax / spec.qmax).clamp_min(EPS), None
    if spec.integer_zero:
        xmin = xmin.clamp(max=0)
        xmax = xmax.clamp(min=0)
        scale = ((xmax - xmin) / (spec.qmax - spec.qmin)).clamp_min(EPS)
        return scale, torch.round(-xmin / scale).clamp(spec.qmin, spec.qmax)
    scale = ((xmax - xmin) / (spec.qmax - spec.qmin)).clamp_min(EPS)
    return scale, -xmin / scale


def choose_qparams(x: torch.Tensor, spec: QuantSpec, shrink: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale/zero of x [rows, cols] per the spec's granularity: shapes [rows|1, n_groups].

    `shrink` < 1 narrows the range (clipping search in AWQ/GPTQ uses it).
    """
    g = to_groups(as_2d(x).float(), spec)
    xmin = g.amin(dim=-1) * shrink
    xmax = g.amax(dim=-1) * shrink
    return range_to_qparams(xmin, xmax, spec)
