"""MSE search: the clipping range whose fake quantization of the samples has the least squared error."""

from __future__ import annotations

import torch

from lowbit.observers.minmax import minmax_range
from lowbit.observers.qparams import fake_quant, range_qparams
from lowbit.spec import ActSpec


def mse_range(x: torch.Tensor, spec: ActSpec, per_channel: bool = False, grid: int = 100,
              min_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) = f * (min, max) for the f in linspace(min_fraction, 1, grid) with the least mean
    squared error of x rounded onto the grid of (f*min, f*max) (chosen per channel when
    per_channel; the first such f on ties)."""
    x = x.float()
    if not per_channel:
        x = x.reshape(-1, 1)
    lo, hi = minmax_range(x, per_channel=True)
    best = torch.full_like(lo, float("inf"))
    best_f = torch.ones_like(lo)
    for f in torch.linspace(min_fraction, 1.0, grid).tolist():
        scale, zero = range_qparams(lo * f, hi * f, spec)
        err = (fake_quant(x, scale, zero, spec) - x).pow(2).mean(dim=0)
        better = err < best
        best = torch.where(better, err, best)
        best_f = torch.where(better, torch.full_like(best_f, f), best_f)
    lo, hi = lo * best_f, hi * best_f
    return (lo, hi) if per_channel else (lo[0], hi[0])
