"""Choosing scale and zero point from a tensor's range (min-max, with optional range shrink)."""

from __future__ import annotations

import torch

from lowbit.core.formats import codebook_max, fp8_max
from lowbit.core.groups import as_2d, to_groups
from lowbit.spec import QuantSpec

EPS = 1e-10


def round_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """float32 scale whose values the spec's `scale_dtype` holds exactly (kept positive, finite)."""
    dt = spec.torch_scale_dtype
    if dt == torch.float32:
        return scale.float().clamp_min(EPS)
    fi = torch.finfo(dt)
    return scale.float().clamp(min=fi.smallest_normal * fi.eps, max=fi.max).to(dt).float()


def round_params(scale: torch.Tensor, zero: torch.Tensor | None,
                 spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point as stored: `round_scale`, and a float zero point rounded to
    `scale_dtype` (integer zero points are exact in every scale dtype). Idempotent."""
    scale = round_scale(scale, spec)
    if zero is not None and spec.torch_scale_dtype != torch.float32:
        fi = torch.finfo(spec.torch_scale_dtype)
        zero = zero.float().clamp(-fi.max, fi.max).to(spec.torch_scale_dtype).float()
    return scale, zero


def range_to_qparams(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (None when symmetric) covering [xmin, xmax], rounded to the spec's
    storage dtype (`round_params`); shapes are kept."""
    if spec.dtype != "int":
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        top = codebook_max(spec.dtype) if spec.is_codebook else fp8_max(spec.dtype)
        return round_scale(absmax / top, spec), None
    if spec.symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        return round_scale(absmax / spec.qmax, spec), None
    if spec.integer_zero:
        xmin = xmin.clamp(max=0)
        xmax = xmax.clamp(min=0)
        scale = round_scale((xmax - xmin) / (spec.qmax - spec.qmin), spec)
        return scale, torch.round(-xmin / scale).clamp(spec.qmin, spec.qmax)
    scale = round_scale((xmax - xmin) / (spec.qmax - spec.qmin), spec)
    return round_params(scale, -xmin / scale, spec)


def choose_qparams(x: torch.Tensor, spec: QuantSpec, shrink: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale/zero of x [rows, cols] per the spec's granularity: shapes [rows|1, n_groups].

    `shrink` < 1 narrows the range (clipping search in AWQ/GPTQ uses it).
    """
    g = to_groups(as_2d(x).float(), spec)
    xmin = g.amin(dim=-1) * shrink
    xmax = g.amax(dim=-1) * shrink
    return range_to_qparams(xmin, xmax, spec)
