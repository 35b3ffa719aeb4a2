"""Fast finiteness checks for large weight tensors."""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """True when `t` holds no NaN/Inf. One reduction (a sum is finite iff every term is, unless the
    sum itself overflows, and then the exact elementwise test decides)."""
    if not t.is_floating_point():
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float64) if t.dtype != torch.float64 else t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def count_nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
