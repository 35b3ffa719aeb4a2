"""Bit packing of 2..8-bit codes into int32 or uint8 containers (little-endian bit stream).

Codes are packed along the last dimension; 3-bit codes cross container boundaries
(32 codes fill exactly three int32 words, as in GPTQ's 3-bit layout).
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

_WIDTH = {torch.int32: 32, torch.uint8: 8}


def packed_len(n: int, bits: int, container: torch.dtype = torch.int32) -> int:
    w = _WIDTH[container]
    return (n * bits + w - 1) // w


def pack_bits(codes: torch.Tensor, bits: int, container: torch.dtype = torch.int32) -> torch.Tensor:
    """Pack unsigned codes in [0, 2**bits) along the last dim into `container` words."""
    if container not in _WIDTH:
        raise LowbitError(f"container must be torch.int32 or torch.uint8, got {container}")
    w = _WIDTH[container]
    lead, n = codes.shape[:-1], codes.shape[-1]
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise LowbitError(f"codes span {int(c.min())}..{int(c.max())}, outside 0..{2**bits - 1} for {bits}-bit packing; "
                          "offset signed codes by 2**(bits-1) first")
    if w % bits == 0:
        per = w // bits
        pad = (-n) % per
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        c = c.reshape(*lead, -1, per)
        shifts = torch.arange(per, dtype=torch.int64) * bits
        words = (c << shifts).sum(-1)
    else:
        bit_idx = torch.arange(bits, dtype=torch.int64)
        stream = ((c.unsqueeze(-1) >> bit_idx) & 1).reshape(*lead, n * bits)
        pad = (-stream.shape[-1]) % w
        if pad:
            stream = torch.nn.functional.pad(stream, (0, pad))
        stream = stream.reshape(*lead, -1, w)
        words = (stream << torch.arange(w, dtype=torch.int64)).sum(-1)
    if container == torch.int32:
        words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(container)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: the first n codes along the last dim, as uint8."""
    w = _WIDTH[packed.dtype]
    lead = packed.shape[:-1]
    words = packed.to(torch.int64)
    if packed.dtype == torch.int32:
        words = words & 0xFFFFFFFF
    mask = (1 << bits) - 1
    if w % bits == 0:
        per = w // bits
        shifts = torch.arange(per, dtype=torch.int64) * bits
        c = ((words.unsqueeze(-1) >> shifts) & mask).reshape(*lead, -1)
    else:
        stream = ((words.unsqueeze(-1) >> torch.arange(w, dtype=torch.int64)) & 1).reshape(*lead, -1)
        stream = stream[..., : n * bits].reshape(*lead, n, bits)
        c = (stream << torch.arange(bits, dtype=torch.int64)).sum(-1)
    return c[..., :n].to(torch.uint8)
