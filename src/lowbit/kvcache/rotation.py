"""Seeded random projections: a Haar-random orthogonal rotation and a Gaussian sketch matrix."""

from __future__ import annotations

import functools

import torch
from ..errors import LowbitError

__all__ = ["random_rotation", "gaussian_matrix"]


@functools.cache
def random_rotation(dim: int, seed: int) -> torch.Tensor:
    """Haar-distributed orthogonal ``[dim, dim]`` matrix from the QR of a seeded Gaussian matrix."""
    if not isinstance(dim, int) or dim < 1:
        raise LowbitError(f"dim must be a positive integer, got dim={dim!r}")
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # sign fix makes Q exactly Haar
    return q.to(torch.float32)


@functools.cache
def gaussian_matrix(rows: int, dim: int, seed: int) -> torch.Tensor:
    """i.i.d. N(0, 1) ``[rows, dim]`` matrix (the QJL sketch)."""
    if rows < 1 or dim < 1:
        raise LowbitError(f"sketch shape must be positive, got rows={rows}, dim={dim}")
    g = torch.Generator().manual_seed(int(seed) + 0x5EED)
    return torch.randn(rows, dim, generator=g, dtype=torch.float32)
