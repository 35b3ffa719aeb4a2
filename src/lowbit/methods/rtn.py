"""RTN: round to nearest with min-max scale/zero per group; no calibration data."""

from __future__ import annotations

from lowbit.core.quantize import quantize
from lowbit.methods.base import Method


class RTN(Method):
    name = "rtn"

    def quantize_linear(self, name, W, spec, stats):
        return quantize(W, spec)
