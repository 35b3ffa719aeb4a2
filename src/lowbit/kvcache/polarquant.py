"""PolarQuant (arXiv 2502.02617): random preconditioning, recursive polar transform, per-level angle codebooks."""

from __future__ import annotations

import math

import torch

from ..errors import LowbitError
from .base import FP16_MAX, VectorQuantizer, check_bits, check_dim
from .codebook import polar_angle_codebook
from .packed import Packed
from .packing import pack_mixed, unpack_mixed
from .rotation import random_rotation

__all__ = ["PolarQuant", "allocate_angle_bits"]


def _two_adic(n: int) -> int:
    v = 0
    while n % 2 == 0 and n > 1:
        n //= 2
        v += 1
    return v


def allocate_angle_bits(dim: int, levels: int, budget: int) -> list[int]:
    """Greedy bit allocation over recursion levels.

    An angle error δ at level ℓ moves the reconstruction by ρ·δ, where ρ is the node's radius; the radii
    of one level square-sum to ‖x‖², so level ℓ adds its angle MSE D_ℓ(b_ℓ) to D_mse once, however many
    angles it holds.  Raising level ℓ by one bit costs dim / 2^ℓ bits: spend ``budget`` where the
    distortion drop per bit is largest.
    """
    bits = [0] * levels
    counts = [dim >> (lvl + 1) for lvl in range(levels)]
    left = budget
    while True:
        best, gain = None, 0.0
        for lvl in range(levels):
            if bits[lvl] >= 8 or counts[lvl] > left:
                continue
            g = (polar_angle_codebook(lvl + 1, bits[lvl]).mse - polar_angle_codebook(lvl + 1, bits[lvl] + 1).mse)
            g /= counts[lvl]
            if g > gain:
                best, gain = lvl, g
        if best is None:
            return bits
        bits[best] += 1
        left -= counts[best]


class PolarQuant(VectorQuantizer):
    """Rotate, then turn coordinate pairs into (radius, angle) recursively for ``levels`` levels.

    Level 1 angles are uniform on [0, 2π); deeper angles live in [0, π/2] with ``sin²ψ ~ Beta(k/2, k/2)``.
    The ``bits · dim`` angle-bit budget is allocated across levels (:func:`allocate_angle_bits`), the
    remaining ``dim / 2^levels`` radii are stored in fp16.  ``levels`` defaults to the full recursion
    allowed by the largest power of two dividing ``dim`` (one radius for dim = 64 or 128).
    """

    name = "polarquant"

    def __init__(self, dim: int, bits: float, seed: int = 0, levels: int | None = None):
        self.dim = check_dim(dim, "PolarQuant", minimum=2, multiple=2)
        self.bits = check_bits(bits, "PolarQuant", 0.5, 8)
        max_levels = _two_adic(dim)
        if levels is None:
            levels = max_levels
        if not isinstance(levels, int) or not 1 <= levels <= max_levels:
            raise LowbitError(f"PolarQuant: levels must be an integer in 1..{max_levels} for dim={dim}, got {levels!r}")
        self.levels, self.seed = levels, int(seed)
        self.level_bits = allocate_angle_bits(dim, levels, int(round(self.bits * dim)))
        if self.level_bits[0] == 0:
            raise LowbitError(f"PolarQuant: bits={bits} leaves no bits for the level-1 angles; use bits >= 1")
        self.codebooks = [polar_angle_codebook(lvl + 1, b) for lvl, b in enumerate(self.level_bits)]
        self.rotation = random_rotation(dim, self.seed)

    @property
    def expected_mse(self) -> float:
        """Approximate D_mse for unit vectors: the sum of the per-level angle distortions."""
        return sum(cb.mse for cb in self.codebooks)

    def _quantize(self, x: torch.Tensor) -> Packed:
        r = x.float() @ self.rotation.to(x.device).T
        groups = []
        for lvl in range(self.levels):
            a, b = r[..., 0::2], r[..., 1::2]
            psi = torch.atan2(b, a)
            if lvl == 0:
                psi = torch.remainder(psi, 2 * math.pi)
                k = 1 << self.level_bits[0]
                codes = torch.floor(psi * (k / (2 * math.pi))).long().clamp_(0, k - 1)
            else:
                codes = self.codebooks[lvl].encode(psi)
            groups.append((codes, self.level_bits[lvl]))
            r = torch.hypot(a, b)
        fields = {"angles": pack_mixed(groups), "radius": r.clamp(max=FP16_MAX).half()}
        return Packed(fields, tuple(x.shape), x.dtype)

    def _dequantize(self, packed: Packed) -> torch.Tensor:
        r = packed.fields["radius"].float()
        layout = [(self.dim >> (lvl + 1), b) for lvl, b in enumerate(self.level_bits)]
        codes = unpack_mixed(packed.fields["angles"], layout)
        for lvl in reversed(range(self.levels)):
            n = self.dim >> (lvl + 1)
            cb = self.codebooks[lvl]
            if self.level_bits[lvl] > 0:
                psi = cb.decode(codes[lvl])
            else:
                psi = cb.levels.to(r.device).expand(*r.shape[:-1], n)
            r = torch.stack([r * torch.cos(psi), r * torch.sin(psi)], dim=-1).flatten(-2)
        return r @ self.rotation.to(r.device)
