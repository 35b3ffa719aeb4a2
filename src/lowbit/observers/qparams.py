"""From a range (lo, hi) to scale and zero point, and the fake quantization observers score with."""

from __future__ import annotations

import torch

from lowbit.spec import ActSpec

EPS = 1e-12


def range_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) float32 covering [lo, hi] (widened to include 0). Symmetric: zero = 0 and
    scale = max(|lo|, |hi|) / qmax; asymmetric: an integer zero point in [qmin, qmax]."""
    lo = torch.as_tensor(lo, dtype=torch.float32).clamp(max=0)
    hi = torch.as_tensor(hi, dtype=torch.float32).clamp(min=0)
    if spec.symmetric:
        scale = (torch.maximum(-lo, hi) / spec.qmax).clamp_min(EPS)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(EPS)
    zero = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zero


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """x rounded onto the grid and back (scale / zero broadcast against x's last dimension)."""
    q = torch.clamp(torch.round(x / scale) + zero, spec.qmin, spec.qmax)
    return (q - zero) * scale
