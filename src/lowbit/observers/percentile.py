"""Percentile ranges: clip the tails (numpy's default 'linear' interpolation between order statistics)."""

from __future__ import annotations

import torch


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile q in [0, 1] along dim 0 of x [n, C] with linear interpolation between the two
    neighbouring order statistics (numpy.percentile's default); O(n) selection, no size limit
    (torch.quantile refuses more than 2**24 values)."""
    n = x.shape[0]
    pos = q * (n - 1)
    i = int(pos)
    j = min(i + 1, n - 1)
    a = torch.kthvalue(x, i + 1, dim=0).values
    b = a if j == i else torch.kthvalue(x, j + 1, dim=0).values
    return a + (pos - i) * (b - a)


def percentile_range(x: torch.Tensor, percentile: float = 99.99, symmetric: bool = True,
                     per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric: hi = the `percentile` of |x|, lo = -hi. Asymmetric: lo and hi are the
    (100 - p) and p percentiles of x. x is [samples, channels]."""
    x = x.float()
    if not per_channel:
        x = x.reshape(-1, 1)
    q = percentile / 100.0
    if symmetric:
        hi = _quantile(x.abs(), q)
        lo = -hi
    else:
        hi = _quantile(x, q)
        lo = _quantile(x, 1.0 - q)
    if not per_channel:
        return lo[0], hi[0]
    return lo, hi
