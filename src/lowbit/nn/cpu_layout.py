"""The row layouts lowbit's CPU kernels read (csrc/qmatmul.cpp documents them byte by byte).

Every row is a run of 64-code blocks arranged so that the kernel turns one load into 32-lane
registers of codes with a shift and a mask: 4-bit nibbles pair code j with j+32 (B4), 2-bit fields
pair j, j+16, j+32, j+48 (B2), 3-bit codes are a B2 block of their low bits plus a 64-bit plane of
their high bits (B3), 8-bit codes are plain bytes (U8), and other widths keep lowbit.core.packing's
bit stream (GENERIC). Exactly bits/8 bytes per weight in every layout.
"""

from __future__ import annotations

import torch

from lowbit.core.packing import pack_bits, unpack_bits

GENERIC, B4, B2, B3, U8 = 0, 1, 2, 3, 4
_LAYOUT = {4: B4, 2: B2, 3: B3, 8: U8}


def layout_for(bits: int) -> int:
    return _LAYOUT.get(bits, GENERIC)


def _b2(u: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..3 -> [N, K/64, 16] bytes: byte j = u[j] | u[j+16]<<2 | u[j+32]<<4 | u[j+48]<<6."""
    q = u.reshape(u.shape[0], -1, 4, 16)
    return q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)


def pack(codes_u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [N, K] (K a multiple of 64) -> uint8 [N, K*bits/8] in the kernel's layout."""
    n, k = codes_u.shape
    layout = layout_for(bits)
    u = codes_u.to(torch.uint8)
    if layout == U8:
        return u.contiguous()
    if layout == GENERIC:
        return pack_bits(codes_u, bits, torch.int32).view(torch.uint8).reshape(n, -1)
    if layout == B4:
        q = u.reshape(n, -1, 2, 32)
        return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1).contiguous()
    if layout == B2:
        return _b2(u).reshape(n, -1).contiguous()
    lo = _b2(u & 3)  # B3
    hi = ((u >> 2) & 1).reshape(n, -1, 8, 8).to(torch.int32)
    hi = (hi << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)  # [N, K/64, 8]: bit i of the block
    return torch.cat([lo, hi], dim=-1).reshape(n, -1).contiguous()


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 codes [N, K]."""
    n = packed.shape[0]
    layout = layout_for(bits)
    if layout == U8:
        return packed.clone()
    if layout == GENERIC:
        return unpack_bits(packed.reshape(n, -1).contiguous().view(torch.int32), bits, k)
    if layout == B4:
        b = packed.reshape(n, -1, 1, 32)
        return torch.cat([b & 15, b >> 4], dim=2).reshape(n, k)
    blocks = packed.reshape(n, k // 64, -1)

    def from_b2(b):
        b = b.unsqueeze(2)
        return torch.cat([(b >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(n, k)

    if layout == B2:
        return from_b2(blocks)
    lo = from_b2(blocks[..., :16])
    hi = ((blocks[..., 16:].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(n, k)
    return lo | (hi << 2)
