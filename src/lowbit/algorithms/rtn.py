"""Round-to-nearest: min-max scale/zero per group, no calibration data."""

from __future__ import annotations

import torch

from lowbit.core.quantize import QuantizedWeight, quantize
from lowbit.spec import QuantSpec


def quantize_weight(W: torch.Tensor, spec: QuantSpec, stats=None) -> QuantizedWeight:
    return quantize(W, spec)
