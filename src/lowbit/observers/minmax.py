"""Min-max and moving-average min-max ranges (torch.ao's MinMaxObserver / MovingAverageMinMaxObserver)."""

from __future__ import annotations

import torch


def minmax_range(x: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of x [samples, channels]: scalars, or [C] per channel."""
    x = x.float()
    if per_channel:
        return x.amin(dim=0), x.amax(dim=0)
    return x.amin(), x.amax()


def moving_average_range(prev: tuple[torch.Tensor, torch.Tensor] | None, x: torch.Tensor, momentum: float = 0.01,
                         per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The running range after batch x: the first batch's min-max, then
    lo += momentum * (batch_min - lo) (and the same for hi), as torch.ao defines it."""
    lo, hi = minmax_range(x, per_channel)
    if prev is None:
        return lo, hi
    plo, phi = prev
    return plo + momentum * (lo - plo), phi + momentum * (hi - phi)
