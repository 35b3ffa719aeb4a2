"""Modules that run quantized weights: QuantLinear (lowbit's compiled CPU kernels, pure-torch fallback)."""

from lowbit.nn.quant_linear import QuantLinear
from lowbit.nn.replace import replace_linear

__all__ = ["QuantLinear", "replace_linear"]
