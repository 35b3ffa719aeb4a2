"""RangeState: one observer's accumulation over calibration batches (the only stateful piece).

Exact running min / max and the moving average are kept for every observer; percentile, MSE and
entropy need the samples themselves, kept as a deterministic random subset of at most
`max_values` numbers (all of them for the batch sizes tests and small models use).
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.observers.entropy import entropy_range
from lowbit.observers.minmax import minmax_range, moving_average_range
from lowbit.observers.mse import mse_range
from lowbit.observers.percentile import percentile_range
from lowbit.observers.qparams import range_qparams
from lowbit.spec import ActSpec

SAMPLED = ("percentile", "mse", "entropy")


class RangeState:
    def __init__(self, spec: ActSpec, name: str = "activation", max_values: int = 1 << 21, percentile: float = 99.99,
                 momentum: float = 0.01, seed: int = 0):
        self.spec, self.name = spec, name
        self.per_channel = spec.granularity == "channel"
        self.max_values, self.percentile, self.momentum = max_values, percentile, momentum
        self.minmax: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ema: tuple[torch.Tensor, torch.Tensor] | None = None
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.channels: int | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        """x: [samples, channels] (features last)."""
        if x.numel() == 0:
            return
        if not x.is_floating_point():
            raise LowbitError(f"{self.name}: calibration input has dtype {x.dtype}; observers take floating inputs")
        x = x.detach().float()
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise LowbitError(f"{self.name}: {bad} NaN/Inf activation values during calibration; check the "
                              "calibration data and the model's weights")
        if self.channels is None:
            self.channels = x.shape[1]
        elif x.shape[1] != self.channels:
            raise LowbitError(f"{self.name}: calibration input has {x.shape[1]} features, earlier batches had "
                              f"{self.channels}")
        lo, hi = minmax_range(x, self.per_channel)
        self.minmax = (lo, hi) if self.minmax is None else (torch.minimum(self.minmax[0], lo),
                                                            torch.maximum(self.minmax[1], hi))
        self.ema = moving_average_range(self.ema, x, self.momentum, self.per_channel)
        if self.spec.observer in SAMPLED:
            self._keep(x)

    def _keep(self, x: torch.Tensor) -> None:
        rows_budget = max(1, self.max_values // x.shape[1])
        self.samples.append(x)
        self.kept += x.shape[0]
        if self.kept > 2 * rows_budget:
            allx = torch.cat(self.samples)
            idx = torch.randperm(allx.shape[0], generator=self.gen)[:rows_budget].sort().values
            self.samples, self.kept = [allx[idx]], rows_budget

    @property
    def seen(self) -> bool:
        return self.minmax is not None

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.minmax is None:
            raise LowbitError(f"{self.name}: no calibration data reached this module; run calibrate() with "
                              "batches that exercise it, or leave it out of the scheme")
        obs = self.spec.observer
        if obs == "minmax":
            return self.minmax
        if obs == "moving_average":
            return self.ema
        x = torch.cat(self.samples)
        if obs == "percentile":
            return percentile_range(x, self.percentile, self.spec.symmetric, self.per_channel)
        if obs == "mse":
            return mse_range(x, self.spec, self.per_channel)
        return entropy_range(x, self.spec.bits, self.per_channel, stride=4)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        return range_qparams(lo, hi, self.spec)
