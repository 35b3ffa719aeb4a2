"""Lloyd-Max scalar codebooks for the coordinates of a randomly rotated unit vector.

After a uniformly random rotation, each coordinate ``x`` of a unit vector in R^d has density
``f(x) ∝ (1 - x²)^((d-3)/2)`` on [-1, 1], i.e. ``(x + 1) / 2 ~ Beta((d-1)/2, (d-1)/2)``.  The optimal
scalar quantizer for that density is found by Lloyd's algorithm run on a fine grid of equal-probability
quantile points of the exact distribution (so heavy concentration at large d and the integrable
singularities at d = 2 are handled alike).  Results are cached per (dim, bits).

The same routine serves PolarQuant's angle distributions: ``sin²ψ ~ Beta(k/2, k/2)``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy import stats
from ..errors import LowbitError

__all__ = ["lloyd_max", "sphere_codebook", "polar_angle_codebook", "Codebook"]

_GRID = 1 << 16


class Codebook:
    """Sorted reconstruction levels, decision boundaries and the codebook's own MSE."""

    def __init__(self, levels: np.ndarray, mse: float):
        self.levels_np = np.asarray(levels, dtype=np.float64)
        self.mse = float(mse)
        self.levels = torch.from_numpy(self.levels_np.astype(np.float32))
        self.boundaries = (self.levels[1:] + self.levels[:-1]) / 2

    @property
    def bits(self) -> int:
        return int(round(math.log2(len(self.levels_np))))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest level for every element of ``x`` (int64)."""
        return torch.bucketize(x.contiguous(), self.boundaries.to(x.device, x.dtype))

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.levels.to(codes.device, dtype)[codes]


def lloyd_max(samples: np.ndarray, bits: int, iters: int = 300, tol: float = 1e-12) -> tuple[np.ndarray, float]:
    """Lloyd-Max levels for the empirical distribution of equally weighted, sorted ``samples``.

    Uses prefix sums so each iteration costs O(levels · log n).  Returns (levels, mse).
    """
    if not 1 <= bits <= 8:
        raise LowbitError(f"bits must be in 1..8 for a Lloyd-Max codebook, got bits={bits}")
    s = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(s)
    k = 1 << bits
    c1 = np.concatenate([[0.0], np.cumsum(s)])
    c2 = np.concatenate([[0.0], np.cumsum(s * s)])
    # initialise at the centroids of equal-probability cells
    edges = np.linspace(0, n, k + 1).round().astype(np.int64)
    levels = (c1[edges[1:]] - c1[edges[:-1]]) / np.maximum(edges[1:] - edges[:-1], 1)
    prev = math.inf
    mse = math.inf
    for _ in range(iters):
        bounds = (levels[1:] + levels[:-1]) / 2
        idx = np.concatenate([[0], np.searchsorted(s, bounds), [n]])
        cnt = idx[1:] - idx[:-1]
        sums = c1[idx[1:]] - c1[idx[:-1]]
        sq = c2[idx[1:]] - c2[idx[:-1]]
        new = np.where(cnt > 0, sums / np.maximum(cnt, 1), levels)
        # within-cell squared error around the new centroid
        mse = float(np.sum(sq - 2 * new * sums + cnt * new * new) / n)
        levels = new
        if prev - mse < tol * max(mse, 1e-30):
            break
        prev = mse
    return levels, max(mse, 0.0)


def _beta_quantiles(a: float, n: int = _GRID) -> np.ndarray:
    u = (np.arange(n) + 0.5) / n
    return stats.beta.ppf(u, a, a)


@functools.cache
def sphere_codebook(dim: int, bits: int) -> Codebook:
    """Codebook for one coordinate of a uniformly random unit vector in R^dim, scaled by sqrt(dim).

    Working in the scaled coordinate ``z = sqrt(dim) · x`` keeps levels O(1) for every dim; the
    returned ``mse`` is then exactly D_mse = E‖x - x̂‖² for unit vectors.
    """
    if not isinstance(dim, int) or dim < 2:
        raise LowbitError(f"dim must be an integer >= 2 for the rotated-sphere codebook, got dim={dim!r}")
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise LowbitError(f"bits must be an integer in 1..8 for a codebook, got bits={bits!r}")
    x = 2.0 * _beta_quantiles((dim - 1) / 2.0) - 1.0
    z = x * math.sqrt(dim)
    levels, mse = lloyd_max(z, bits)
    levels = (levels - levels[::-1]) / 2  # the density is symmetric: enforce it exactly
    return Codebook(levels, mse)


@functools.cache
def polar_angle_codebook(level: int, bits: int) -> Codebook:
    """Codebook for PolarQuant's angle at recursion ``level`` (1-based).

    Level 1 angles (of a coordinate pair) are uniform on [0, 2π): the uniform quantizer is Lloyd-optimal.
    Level ℓ ≥ 2 angles combine two radii of k = 2^(ℓ-1) Gaussian coordinates each:
    ψ = atan(r₂ / r₁) ∈ [0, π/2] with sin²ψ ~ Beta(k/2, k/2).  ``mse`` is in radians².
    """
    if not isinstance(level, int) or level < 1:
        raise LowbitError(f"level must be an integer >= 1, got level={level!r}")
    if not isinstance(bits, int) or not 0 <= bits <= 8:
        raise LowbitError(f"bits must be an integer in 0..8 for an angle codebook, got bits={bits!r}")
    if level == 1:
        k = 1 << bits
        step = 2 * math.pi / k
        levels = (np.arange(k) + 0.5) * step
        return Codebook(levels, step * step / 12)
    a = (1 << (level - 1)) / 2.0
    psi = np.arcsin(np.sqrt(np.clip(_beta_quantiles(a), 0.0, 1.0)))
    if bits == 0:
        m = float(psi.mean())
        return Codebook(np.array([m]), float(np.mean((psi - m) ** 2)))
    levels, mse = lloyd_max(psi, bits)
    return Codebook(levels, mse)
