"""Pure tensor functions: formats, scale/zero choice, quantize/dequantize, fake quant, packing."""

from lowbit.core.fake_quant import fake_quantize
from lowbit.core.packing import pack_bits, unpack_bits
from lowbit.core.qparams import choose_qparams
from lowbit.core.quantize import QuantizedWeight, dequantize, quantize, quantize_codes

__all__ = [
    "QuantizedWeight",
    "choose_qparams",
    "quantize",
    "quantize_codes",
    "dequantize",
    "fake_quantize",
    "pack_bits",
    "unpack_bits",
]
