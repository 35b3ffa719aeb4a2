"""KIVI-style baseline (arXiv 2402.02750): asymmetric integer quantization, keys per channel, values per token."""

from __future__ import annotations

import math

import torch

from ..errors import LowbitError
from .base import ChannelSplit, VectorQuantizer, check_bits, check_dim
from .packed import Packed
from lowbit.core.packing import pack_bits, unpack_bits

__all__ = ["KIVI"]


def _sub_group(dim: int, group_size: int, mode: str) -> int:
    """Per-token groups must tile a split part's channels: shrink the group to fit it."""
    return group_size if mode == "key" else math.gcd(dim, group_size)


class KIVI(VectorQuantizer):
    """Asymmetric min/max integer quantization with fp16 scale and zero point.

    ``mode="key"``: each channel gets its own scale/zero over a group of ``group_size`` consecutive
    tokens (axis -2 must be a multiple of ``group_size``: the cache keeps the remainder in full
    precision).  ``mode="value"``: each token gets its own scale/zero per ``group_size`` channels.
    Fractional bits split channels like TurboQuant.  The recent full-precision window is the cache's job.
    """

    name = "kivi"

    def __init__(self, dim: int, bits: float, seed: int = 0, mode: str = "value", group_size: int = 32,
                 outlier_channels=None):
        self.dim = check_dim(dim, "KIVI", minimum=1)
        self.bits = check_bits(bits, "KIVI", 1, 8)
        if mode not in ("key", "value"):
            raise LowbitError(f"KIVI: mode must be 'key' or 'value', got mode={mode!r}")
        if not isinstance(group_size, int) or group_size < 1:
            raise LowbitError(f"KIVI: group_size must be a positive integer, got group_size={group_size!r}")
        self.mode, self.group_size, self.seed = mode, group_size, int(seed)
        self._split = None
        if self.bits != int(self.bits):
            self._split = ChannelSplit(
                dim, self.bits, lambda d, b, s: KIVI(d, b, s, mode, _sub_group(d, group_size, mode)), self.seed, outlier_channels, "kivi"
            )
            self.token_block = self._split.token_block
            return
        if mode == "value" and dim % group_size:
            raise LowbitError(f"KIVI: dim={dim} must be divisible by group_size={group_size} for per-token values")
        self.int_bits = int(self.bits)
        self.token_block = group_size if mode == "key" else 1

    def with_outliers_from(self, x: torch.Tensor) -> "KIVI":
        if self._split is None:
            return self
        q = KIVI.__new__(KIVI)
        q.__dict__.update(self.__dict__)
        q._split = self._split.with_outliers_from(x)
        return q

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """View with the reduction axis last: key [..., T/G, d, G], value [..., T, d/G, G]."""
        if self.mode == "key":
            t = x.shape[-2]
            return x.reshape(*x.shape[:-2], t // self.group_size, self.group_size, self.dim).transpose(-1, -2)
        return x.reshape(*x.shape[:-1], self.dim // self.group_size, self.group_size)

    def _ungrouped(self, g: torch.Tensor, shape) -> torch.Tensor:
        if self.mode == "key":
            return g.transpose(-1, -2).reshape(shape)
        return g.reshape(shape)

    def _quantize(self, x: torch.Tensor) -> Packed:
        if self._split is not None:
            return self._split.quantize(x)
        g = self._grouped(x.float())
        lo = g.amin(-1, keepdim=True).half()
        hi = g.amax(-1, keepdim=True).half()
        qmax = (1 << self.int_bits) - 1
        scale = ((hi.float() - lo.float()) / qmax).clamp_min(1e-6).half()  # 1e-8 was 0 in fp16: 0/0 on constant groups
        codes = torch.round((g - lo.float()) / scale.float()).clamp_(0, qmax)
        codes = self._ungrouped(codes, x.shape)
        return Packed(
            {"codes": pack_bits(codes, self.int_bits, torch.uint8), "scale": scale.squeeze(-1), "zero": lo.squeeze(-1)},
            tuple(x.shape), x.dtype,
        )

    def _dequantize(self, packed: Packed) -> torch.Tensor:
        if self._split is not None:
            return self._split.dequantize(packed)
        codes = unpack_bits(packed.fields["codes"], self.int_bits, self.dim).float()
        g = self._grouped(codes)
        out = g * packed.fields["scale"].float().unsqueeze(-1) + packed.fields["zero"].float().unsqueeze(-1)
        return self._ungrouped(out, packed.shape)
