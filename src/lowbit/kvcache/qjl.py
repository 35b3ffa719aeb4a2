"""QJL (arXiv 2406.03482): sign bits of a Gaussian projection plus the norm — unbiased inner products."""

from __future__ import annotations

import math

import torch

from .base import FP16_MAX, VectorQuantizer, check_bits, check_dim
from .packed import Packed
from lowbit.core.packing import pack_bits, unpack_bits
from .rotation import gaussian_matrix

__all__ = ["QJL"]


class QJL(VectorQuantizer):
    """``x̂ = √(π/2) / m · ‖x‖ · Sᵀ sign(S x)`` with ``S ∈ R^{m×d}`` i.i.d. N(0, 1), ``m = round(bits · d)``.

    ``E[<y, x̂>] = <y, x>``; storage is ``m`` sign bits plus one fp16 norm per vector.
    """

    name = "qjl"

    def __init__(self, dim: int, bits: float = 1.0, seed: int = 0):
        self.dim = check_dim(dim, "QJL", minimum=1)
        self.bits = check_bits(bits, "QJL", 1.0 / dim, 64)
        self.seed = int(seed)
        self.m = max(1, int(round(self.bits * dim)))
        self.sketch = gaussian_matrix(self.m, dim, self.seed)

    def _quantize(self, x: torch.Tensor) -> Packed:
        xf = x.float()
        norm = xf.norm(dim=-1, keepdim=True).clamp(max=FP16_MAX)
        signs = (xf @ self.sketch.to(xf.device).T) >= 0
        return Packed({"signs": pack_bits(signs, 1, torch.uint8), "norm": norm.half()}, tuple(x.shape), x.dtype)

    def _dequantize(self, packed: Packed) -> torch.Tensor:
        s = unpack_bits(packed.fields["signs"], 1, self.m).float() * 2 - 1
        scale = math.sqrt(math.pi / 2) / self.m
        return (s @ self.sketch.to(s.device)) * (packed.fields["norm"].float() * scale)
