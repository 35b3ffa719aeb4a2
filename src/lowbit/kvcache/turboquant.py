"""TurboQuant (arXiv 2504.19874): random rotation + Lloyd-Max codebook, and its unbiased 1-bit-QJL variant."""

from __future__ import annotations

import math

import torch

from ..errors import LowbitError
from .base import FP16_MAX, NORM_BITS, ChannelSplit, VectorQuantizer, check_bits, check_dim, decode_norm, encode_norm
from .codebook import sphere_codebook
from .packed import Packed
from lowbit.core.packing import pack_bits, unpack_bits
from .qjl import QJL
from .rotation import random_rotation

__all__ = ["TurboQuantMSE", "TurboQuantProd"]


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x.norm(dim=-1, keepdim=True).clamp(max=FP16_MAX)


class TurboQuantMSE(VectorQuantizer):
    """MSE-optimal TurboQuant: ``x̂ = ‖x‖ · Πᵀ c[codes] / √d`` with a Haar rotation Π.

    Integer ``bits`` in 1..8 use one codebook for all coordinates; fractional bits (e.g. 2.5) split
    the channels into an outlier group one bit higher and the rest (see :class:`ChannelSplit`).
    Storage per vector: ``dim · bits`` code bits plus one norm (two for a split), fp16 or, with
    ``norm_bits=8``, fp16 rounded to 3 mantissa bits (:func:`encode_norm`).
    """

    name = "turboquant"

    def __init__(self, dim: int, bits: float, seed: int = 0, outlier_channels=None, norm_bits: int = 16):
        self.dim = check_dim(dim, "TurboQuantMSE")
        self.bits = check_bits(bits, "TurboQuantMSE", 1, 8)
        if norm_bits not in NORM_BITS:
            raise LowbitError(f"TurboQuantMSE: norm_bits must be one of {NORM_BITS}, got norm_bits={norm_bits!r}")
        self.seed, self.norm_bits = int(seed), norm_bits
        self._split = None
        if self.bits != int(self.bits):
            self._split = ChannelSplit(
                dim, self.bits, lambda d, b, s: TurboQuantMSE(d, b, s, norm_bits=norm_bits), self.seed,
                outlier_channels, self.name
            )
            return
        self.int_bits = int(self.bits)
        self.codebook = sphere_codebook(dim, self.int_bits)
        self.rotation = random_rotation(dim, self.seed)

    @property
    def expected_mse(self) -> float:
        """Theoretical D_mse for unit vectors (the codebook's Lloyd-Max distortion)."""
        if self._split is not None:
            raise LowbitError("expected_mse is defined for integer bits only")
        return self.codebook.mse

    def with_outliers_from(self, x: torch.Tensor) -> "TurboQuantMSE":
        if self._split is None:
            return self
        q = TurboQuantMSE.__new__(TurboQuantMSE)
        q.dim, q.bits, q.seed, q.norm_bits = self.dim, self.bits, self.seed, self.norm_bits
        q._split = self._split.with_outliers_from(x)
        return q

    def _quantize(self, x: torch.Tensor) -> Packed:
        if self._split is not None:
            return self._split.quantize(x)
        xf = x.float()
        norm = _norm(xf)
        rot = self.rotation.to(xf.device)
        y = (xf / norm.clamp_min(1e-30)) @ rot.T * math.sqrt(self.dim)
        codes = self.codebook.encode(y)
        return Packed({"codes": pack_bits(codes, self.int_bits, torch.uint8), "norm": encode_norm(norm, self.norm_bits)},
                      tuple(x.shape), x.dtype)

    def _dequantize(self, packed: Packed) -> torch.Tensor:
        if self._split is not None:
            return self._split.dequantize(packed)
        codes = unpack_bits(packed.fields["codes"], self.int_bits, self.dim).long()
        y = self.codebook.decode(codes) * (1.0 / math.sqrt(self.dim))
        return (y @ self.rotation.to(y.device)) * decode_norm(packed.fields["norm"])


class TurboQuantProd(VectorQuantizer):
    """Inner-product TurboQuant: TurboQuantMSE at ``bits - 1`` plus a 1-bit QJL sketch of the residual.

    ``E[<y, x̂>] = <y, x>`` for every fixed ``y``.  ``bits = 1`` is QJL alone; otherwise ``bits - 1``
    must be >= 1 (fractional allowed: the MSE stage splits channels).
    """

    name = "turboquant-prod"

    def __init__(self, dim: int, bits: float, seed: int = 0, outlier_channels=None):
        self.dim = check_dim(dim, "TurboQuantProd")
        self.bits = check_bits(bits, "TurboQuantProd", 1, 9)
        if 1 < self.bits < 2:
            raise LowbitError(f"TurboQuantProd: bits must be 1 or >= 2 (MSE stage gets bits-1), got bits={bits!r}")
        self.seed = int(seed)
        self.mse = None if self.bits == 1 else TurboQuantMSE(dim, self.bits - 1, seed, outlier_channels)
        self.qjl = QJL(dim, 1, seed + 7919)

    def with_outliers_from(self, x: torch.Tensor) -> "TurboQuantProd":
        if self.mse is None:
            return self
        q = TurboQuantProd.__new__(TurboQuantProd)
        q.dim, q.bits, q.seed, q.qjl = self.dim, self.bits, self.seed, self.qjl
        q.mse = self.mse.with_outliers_from(x)
        return q

    def _quantize(self, x: torch.Tensor) -> Packed:
        xf = x.float()
        fields = {}
        resid = xf
        if self.mse is not None:
            pm = self.mse.quantize(xf)
            resid = xf - self.mse.dequantize(pm)
            fields.update({f"mse.{k}": v for k, v in pm.fields.items()})
        pq = self.qjl.quantize(resid)
        fields.update({f"qjl.{k}": v for k, v in pq.fields.items()})
        return Packed(fields, tuple(x.shape), x.dtype)

    def _dequantize(self, packed: Packed) -> torch.Tensor:
        def sub(pre):
            return Packed({k[len(pre):]: v for k, v in packed.fields.items() if k.startswith(pre)}, packed.shape)

        out = self.qjl.dequantize(sub("qjl."))
        if self.mse is not None:
            out = out + self.mse.dequantize(sub("mse."))
        return out
