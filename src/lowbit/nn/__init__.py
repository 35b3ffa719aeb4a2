"""Modules that run quantized weights: QuantLinear (int4/int8 CPU kernels, packed dequant fallback)."""

from lowbit.nn.quant_linear import QuantLinear, choose_path
from lowbit.nn.replace import replace_linear

__all__ = ["QuantLinear", "choose_path", "replace_linear"]
