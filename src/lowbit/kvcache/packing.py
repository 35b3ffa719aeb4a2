"""Bit-packing of small unsigned codes into uint8 bytes (pure tensor functions).

A vector of ``n`` codes of ``bits`` bits each occupies exactly ``ceil(n * bits / 8)`` bytes; the last
axis of the codes is packed, every leading axis is kept.  Codes are written least-significant bit
first, code after code, so any width 1..8 packs without gaps.
"""

from __future__ import annotations

import torch
from ..errors import LowbitError

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise LowbitError(f"bits must be an integer in 1..8 to bit-pack, got bits={bits!r}")


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes taken by ``n`` codes of ``bits`` bits once packed."""
    _check_bits(bits)
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` in ``[0, 2**bits)`` along the last axis into a uint8 tensor.

    Returns a tensor of shape ``[..., ceil(n * bits / 8)]``.
    """
    _check_bits(bits)
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    c = codes.to(torch.uint8)
    if bits == 8:
        return c.contiguous()
    if 8 % bits == 0:  # 1, 2, 4: whole codes per byte, fast path
        per = 8 // bits
        pad = (-n) % per
        if pad:
            c = torch.cat([c, c.new_zeros(*lead, pad)], dim=-1)
        c = c.reshape(*lead, -1, per)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=c.device)
        return (c << shifts).sum(dim=-1, dtype=torch.uint8)
    # general widths (3, 5, 6, 7): go through the bit stream
    shifts = torch.arange(bits, dtype=torch.uint8, device=c.device)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(*lead, n * bits)
    pad = (-(n * bits)) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(*lead, pad)], dim=-1)
    stream = stream.reshape(*lead, -1, 8)
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=c.device)
    return (stream << byte_shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: returns ``n`` codes per vector as int64 (ready for indexing)."""
    _check_bits(bits)
    lead = packed.shape[:-1]
    expected = packed_nbytes(n, bits)
    if packed.shape[-1] != expected:
        raise LowbitError(
            f"packed tensor has {packed.shape[-1]} bytes per vector, expected {expected} for n={n}, bits={bits}"
        )
    if packed.dtype != torch.uint8:
        raise LowbitError(f"packed tensor must be uint8, got {packed.dtype}")
    if bits == 8:
        return packed.long()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        c = (packed.unsqueeze(-1) >> shifts) & mask
        return c.reshape(*lead, -1)[..., :n].long()
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> byte_shifts) & 1).reshape(*lead, -1)[..., : n * bits]
    stream = stream.reshape(*lead, n, bits).long()
    weights = 1 << torch.arange(bits, device=packed.device)
    return (stream * weights).sum(dim=-1)


def pack_mixed(groups: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Pack several code tensors of different widths into one gap-free byte stream per vector.

    ``groups`` is a list of ``(codes [..., n_i], bits_i)``; widths of 0 are skipped.
    """
    streams = []
    for codes, bits in groups:
        if bits == 0:
            continue
        _check_bits(bits)
        shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
        c = codes.to(torch.uint8)
        streams.append(((c.unsqueeze(-1) >> shifts) & 1).flatten(-2))
    return pack_bits(torch.cat(streams, dim=-1), 1)


def unpack_mixed(packed: torch.Tensor, layout: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Inverse of :func:`pack_mixed`; ``layout`` lists ``(n_i, bits_i)``.  Width-0 groups give None."""
    total = sum(n * b for n, b in layout)
    stream = unpack_bits(packed, 1, total)
    out, pos = [], 0
    for n, b in layout:
        if b == 0:
            out.append(None)
            continue
        chunk = stream[..., pos : pos + n * b].reshape(*stream.shape[:-1], n, b)
        out.append((chunk << torch.arange(b, device=stream.device)).sum(-1))
        pos += n * b
    return out
