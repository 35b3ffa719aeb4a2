"""Calibration observers: pure functions from activation samples to a quantization range.

Every function takes `x` as [samples, channels] (features last, the layout of a Linear's input;
a conv's input is moved to channels-last first) and returns (lo, hi): 0-d tensors per tensor, [C]
per channel. `range_qparams` turns a range into scale / zero with the spec's arithmetic. The
stateful accumulation over calibration batches is `observers.state.RangeState`.
"""

from lowbit.observers.entropy import entropy_range, kl_threshold
from lowbit.observers.minmax import minmax_range, moving_average_range
from lowbit.observers.mse import mse_range
from lowbit.observers.percentile import percentile_range
from lowbit.observers.qparams import fake_quant, range_qparams

__all__ = ["entropy_range", "fake_quant", "kl_threshold", "minmax_range", "moving_average_range", "mse_range",
           "percentile_range", "range_qparams"]
