"""Shared contract of the vector quantizers: argument checks, the fractional-bit channel split."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..errors import LowbitError
from .packed import Packed

__all__ = ["VectorQuantizer", "ChannelSplit", "check_dim", "check_bits", "FP16_MAX", "encode_norm", "decode_norm",
           "NORM_BITS"]

FP16_MAX = 65504.0

#: widths a per-vector norm may be stored in: fp16, or fp16 rounded to 3 mantissa bits (sign dropped: 8 bits)
NORM_BITS = (16, 8)


def encode_norm(norm: torch.Tensor, bits: int = 16) -> torch.Tensor:
    """Non-negative norms as fp16 (``bits=16``) or as uint8 holding fp16's exponent and 3 rounded mantissa bits.

    The 8-bit form is fp16 with the mantissa rounded to 3 bits (relative error <= 1/16, about 1.8% rms) and
    the always-zero sign bit dropped; it costs 8 bits per vector instead of 16.
    """
    h = norm.float().clamp(0, FP16_MAX).half()
    if bits == 16:
        return h
    u = h.view(torch.int16).to(torch.int32)
    return ((u + (1 << 6)) >> 7).clamp(max=247).to(torch.uint8)  # a carry into the exponent is exact; 248 = inf


def decode_norm(stored: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_norm` (fp32 out); the width is read from the dtype."""
    if stored.dtype == torch.uint8:
        return (stored.to(torch.int32) << 7).to(torch.int16).view(torch.float16).float()
    return stored.float()


def check_dim(dim, name: str, minimum: int = 2, multiple: int = 1) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < minimum or dim % multiple:
        cond = f"an integer >= {minimum}" + (f" divisible by {multiple}" if multiple > 1 else "")
        raise LowbitError(f"{name}: dim must be {cond}, got dim={dim!r}")
    return dim


def check_bits(bits, name: str, lo: float, hi: float, integer: bool = False) -> float:
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
        raise LowbitError(f"{name}: bits must be a number, got bits={bits!r}")
    if not lo <= bits <= hi or (integer and bits != int(bits)):
        kind = "an integer" if integer else "a number"
        raise LowbitError(f"{name}: bits must be {kind} in [{lo:g}, {hi:g}], got bits={bits!r}")
    return float(bits)


class VectorQuantizer(ABC):
    """Quantizes tensors shaped ``[..., dim]`` into :class:`Packed` bytes and back.

    ``token_block`` is the number of consecutive vectors (along axis ``-2``) that must be quantized
    together: 1 for per-vector schemes, the group size for KIVI's per-channel keys.
    """

    name = "quantizer"
    token_block = 1

    dim: int
    bits: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize and dequantize (fake quantization)."""
        return self.dequantize(self.quantize(x))

    def quantize(self, x: torch.Tensor) -> Packed:
        self._check_input(x)
        return self._quantize(x)

    def dequantize(self, packed: Packed) -> torch.Tensor:
        if packed.shape[-1] != self.dim:
            raise LowbitError(f"{self.name}: packed tensor has dim {packed.shape[-1]}, quantizer has dim {self.dim}")
        return self._dequantize(packed)

    @abstractmethod
    def _quantize(self, x: torch.Tensor) -> Packed: ...

    @abstractmethod
    def _dequantize(self, packed: Packed) -> torch.Tensor: ...

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{self.name}: expected a floating-point tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise LowbitError(f"{self.name}: last axis of input must be dim={self.dim}, got shape {tuple(x.shape)}")
        if self.token_block > 1 and (x.dim() < 2 or x.shape[-2] % self.token_block):
            raise LowbitError(
                f"{self.name}: quantizes groups of {self.token_block} tokens along axis -2; "
                f"got shape {tuple(x.shape)}"
            )

    def bits_per_coordinate(self) -> float:
        """Stored bits per coordinate (codes plus norms / scales), measured on a dummy batch."""
        n = self.token_block * max(1, 64 // self.token_block)
        x = torch.randn(n, self.dim, generator=torch.Generator().manual_seed(0))
        return self.quantize(x).bits_per_coordinate

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, bits={self.bits:g})"


class ChannelSplit(VectorQuantizer):
    """Fractional bits by an outlier-channel split: two independent quantizers on disjoint channels.

    ``bits = lo + f`` puts ``round(f · dim)`` channels (the outliers) at ``lo + 1`` bits and the rest at
    ``lo`` bits, each part with its own rotation and norm.  ``make(dim, bits, seed)`` builds a part.
    Outlier channels default to the first ones; :meth:`with_outliers_from` picks the channels with
    the largest mean square in sample data.
    """

    def __init__(self, dim: int, bits: float, make, seed: int = 0, outlier_channels=None, name: str = "split"):
        self.dim, self.bits, self.name = dim, float(bits), name
        self._make, self.seed = make, seed
        lo = int(math.floor(bits))
        n_hi = int(round((bits - lo) * dim))
        if not 0 < n_hi < dim:
            raise LowbitError(f"{name}: bits={bits} on dim={dim} does not split into two channel groups")
        if outlier_channels is None:
            hi_idx = torch.arange(n_hi)
        else:
            hi_idx = torch.as_tensor(outlier_channels, dtype=torch.long).flatten().unique()
            if len(hi_idx) != n_hi or hi_idx.min() < 0 or hi_idx.max() >= dim:
                raise LowbitError(
                    f"{name}: outlier_channels must be {n_hi} distinct channel indices in [0, {dim}) for bits={bits}"
                )
        mask = torch.zeros(dim, dtype=torch.bool)
        mask[hi_idx] = True
        self.hi_idx = torch.nonzero(mask).flatten()
        self.lo_idx = torch.nonzero(~mask).flatten()
        self.hi = make(len(self.hi_idx), lo + 1, seed)
        self.lo = make(len(self.lo_idx), lo, seed + 1)
        self.token_block = max(self.hi.token_block, self.lo.token_block)

    def with_outliers_from(self, x: torch.Tensor) -> "ChannelSplit":
        """A copy whose high-precision channels are those with the largest mean square in ``x``."""
        energy = x.detach().float().reshape(-1, self.dim).pow(2).mean(0)
        idx = torch.topk(energy, len(self.hi_idx)).indices
        return ChannelSplit(self.dim, self.bits, self._make, self.seed, idx, self.name)

    def _quantize(self, x: torch.Tensor) -> Packed:
        ph = self.hi.quantize(x[..., self.hi_idx.to(x.device)])
        pl = self.lo.quantize(x[..., self.lo_idx.to(x.device)])
        fields = {f"hi.{k}": v for k, v in ph.fields.items()}
        fields.update({f"lo.{k}": v for k, v in pl.fields.items()})
        return Packed(fields, tuple(x.shape), x.dtype)

    def _dequantize(self, packed: Packed) -> torch.Tensor:
        lead = packed.shape[:-1]
        parts = []
        for pre, q, idx in (("hi.", self.hi, self.hi_idx), ("lo.", self.lo, self.lo_idx)):
            sub = {k[len(pre):]: v for k, v in packed.fields.items() if k.startswith(pre)}
            parts.append((idx, q.dequantize(Packed(sub, (*lead, len(idx)), packed.dtype))))
        out = torch.empty(*lead, self.dim, dtype=parts[0][1].dtype, device=parts[0][1].device)
        for idx, val in parts:
            out[..., idx.to(out.device)] = val
        return out
