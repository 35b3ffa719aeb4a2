"""Mixed-width code streams (PolarQuant's per-level angles) on top of lowbit's one bit packer,
`lowbit.core.packing` (uint8 containers, least-significant bit first, no gaps)."""

from __future__ import annotations

import torch
from lowbit.core.packing import pack_bits, unpack_bits
from lowbit.errors import LowbitError

__all__ = ["pack_mixed", "unpack_mixed"]


def pack_mixed(groups: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Pack several code tensors of different widths into one gap-free byte stream per vector.

    ``groups`` is a list of ``(codes [..., n_i], bits_i)``; widths of 0 are skipped.
    """
    streams = []
    for codes, bits in groups:
        if bits == 0:
            continue
        if not 1 <= bits <= 8:
            raise LowbitError(f"bits must be an integer in 1..8 to bit-pack, got bits={bits!r}")
        shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
        c = codes.to(torch.uint8)
        streams.append(((c.unsqueeze(-1) >> shifts) & 1).flatten(-2))
    return pack_bits(torch.cat(streams, dim=-1), 1, torch.uint8)


def unpack_mixed(packed: torch.Tensor, layout: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Inverse of :func:`pack_mixed`; ``layout`` lists ``(n_i, bits_i)``.  Width-0 groups give None."""
    total = sum(n * b for n, b in layout)
    stream = unpack_bits(packed, 1, total).long()
    out, pos = [], 0
    for n, b in layout:
        if b == 0:
            out.append(None)
            continue
        chunk = stream[..., pos : pos + n * b].reshape(*stream.shape[:-1], n, b)
        out.append((chunk << torch.arange(b, device=stream.device)).sum(-1))
        pos += n * b
    return out
