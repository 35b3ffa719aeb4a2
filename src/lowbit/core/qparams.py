"""Choosing scale and zero point from a tensor's range (min-max, with optional range shrink)."""

from __future__ import annotations

import torch

from lowbit.core.formats import codebook_max, fp8_max
from lowbit.core.groups import as_2d, to_groups
from lowbit.errors import LowbitError
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
    `scale_dtype` (integer zero points are exact in every scale dtype); superblock specs onto their
    double-quantized grid (`superblock_round`, whole rows [rows, n_groups] at a time). Idempotent."""
    scale = round_scale(scale, spec)
    if spec.superblock is not None:
        return superblock_round(scale, zero, spec)
    if zero is not None and spec.torch_scale_dtype != torch.float32:
        fi = torch.finfo(spec.torch_scale_dtype)
        zero = zero.float().clamp(-fi.max, fi.max).to(spec.torch_scale_dtype).float()
    return scale, zero


SUPER_DTYPE = torch.float16  # the per-superblock factors d and dmin, as llama.cpp stores them


def _double_quantize(v: torch.Tensor, levels: int, floor: int) -> torch.Tensor:
    """v [rows, n_super, per] >= 0 -> d·m with d = float16(max v / levels) per superblock and
    m = round(v / d) in [floor, levels] (llama.cpp's K-quant reference rounding of scales/mins)."""
    vmax = v.amax(dim=-1, keepdim=True)
    d = (vmax / levels).to(SUPER_DTYPE).float()
    tiny = torch.finfo(SUPER_DTYPE).smallest_normal * torch.finfo(SUPER_DTYPE).eps
    d = torch.where((d == 0) & ((vmax > 0) | (floor > 0)), torch.full_like(d, tiny), d)
    m = torch.where(d > 0, torch.round(v / d.clamp_min(tiny)), torch.zeros_like(v)).clamp(floor, levels)
    return d * m


def superblock_round(scale: torch.Tensor, zero: torch.Tensor | None,
                     spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and scaled zero offsets) [rows, n_groups] of a superblock spec onto its grid: each
    superblock's values become float16 factor x integer multiplier, exact as float32 products."""
    rows, groups = scale.shape
    per = spec.superblock // spec.group_size
    if groups % per:
        raise LowbitError(f"superblock parameters are rounded whole rows at a time: {groups} groups of "
                          f"{spec.group_size} do not fill superblocks of {spec.superblock}")
    levels = spec.scale_levels
    scale = _double_quantize(scale.float().abs().reshape(rows, groups // per, per), levels, 1).reshape(rows, groups)
    if zero is not None:
        zero = _double_quantize(zero.float().clamp_min(0).reshape(rows, groups // per, per), 2**spec.scale_bits - 1,
                                0).reshape(rows, groups)
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
        return round_params(absmax / spec.qmax, None, spec)
    if spec.scaled_zero:  # w = q·s − zero: zero = −min (llama.cpp's min; K-quants keep min <= 0)
        if spec.superblock is not None:
            xmin = xmin.clamp(max=0)
        scale = round_scale((xmax - xmin) / (spec.qmax - spec.qmin), spec)
        return round_params(scale, -xmin, spec)
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
