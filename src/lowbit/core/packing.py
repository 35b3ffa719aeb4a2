"""The one bit packer: 1..8-bit codes into int32 or uint8 containers (little-endian bit stream).

Codes are packed along the last dimension; 3-bit codes cross container boundaries
(32 codes fill exactly three int32 words, as in GPTQ's 3-bit layout).
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

_WIDTH = {torch.int32: 32, torch.uint8: 8}


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise LowbitError(f"bits must be an integer in 1..8 to bit-pack, got bits={bits!r}")


def packed_len(n: int, bits: int, container: torch.dtype = torch.int32) -> int:
    w = _WIDTH[container]
    return (n * bits + w - 1) // w


def pack_bits(codes: torch.Tensor, bits: int, container: torch.dtype = torch.int32) -> torch.Tensor:
    """Pack unsigned codes in [0, 2**bits) along the last dim into `container` words."""
    _check_bits(bits)
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
    elif container == torch.int32:
        words = _pack_cross_int32(c, bits, lead, n)
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


def _pack_cross_int32(c: torch.Tensor, bits: int, lead: torch.Size, n: int) -> torch.Tensor:
    """Codes of a width that does not divide 32 (3, 5, 6, 7 bits): every 32 codes fill `bits` words;
    built one code position at a time, so the temporaries stay the size of the codes."""
    chunks = -(-n // 32)
    if chunks * 32 != n:
        c = torch.nn.functional.pad(c, (0, chunks * 32 - n))
    c = c.reshape(*lead, chunks, 32)
    words = torch.zeros(*lead, chunks, bits, dtype=torch.int64)
    for i in range(32):
        w, s = divmod(i * bits, 32)
        words[..., w] |= (c[..., i] << s) & 0xFFFFFFFF
        if s + bits > 32:
            words[..., w + 1] |= c[..., i] >> (32 - s)
    return words.reshape(*lead, chunks * bits)[..., :packed_len(n, bits)]


def _cross_tables(bits: int) -> tuple[torch.Tensor, ...]:
    """Index/shift/mask tables to read 32 codes of `bits` bits from `bits` int32 words."""
    mask = (1 << bits) - 1
    lo_idx, hi_idx, shift, lo_mask, hi_mask, hi_shift = [], [], [], [], [], []
    for i in range(32):
        w, s = divmod(i * bits, 32)
        lo_idx.append(w)
        shift.append(s)
        if s + bits <= 32:
            lo_mask.append(mask)
            hi_idx.append(w)
            hi_mask.append(0)
            hi_shift.append(0)
        else:
            lo_mask.append((1 << (32 - s)) - 1)
            hi_idx.append(w + 1)
            hi_mask.append((1 << (s + bits - 32)) - 1)
            hi_shift.append(32 - s)
    i32 = torch.int32
    return (torch.tensor(lo_idx), torch.tensor(hi_idx), torch.tensor(shift, dtype=i32),
            torch.tensor(lo_mask, dtype=i32), torch.tensor(hi_mask, dtype=i32), torch.tensor(hi_shift, dtype=i32))


_TABLES = {b: _cross_tables(b) for b in (3, 5, 6, 7)}


def _unpack_int32(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 words [..., ceil(n*bits/32)] -> int32 codes [..., n], in int32 arithmetic only (fast,
    and it compiles well: the dequantize kernels call it on every forward)."""
    lead = words.shape[:-1]
    if bits == 8:
        return words.contiguous().view(torch.uint8)[..., :n].to(torch.int32)
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32)
        c = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return c.reshape(*lead, -1)[..., :n]
    chunks = -(-n // 32)
    pad = chunks * bits - words.shape[-1]
    if pad:
        words = torch.nn.functional.pad(words, (0, pad))
    words = words.reshape(*lead, chunks, bits)
    lo_idx, hi_idx, shift, lo_mask, hi_mask, hi_shift = _TABLES[bits]
    lo = (words[..., lo_idx] >> shift) & lo_mask
    hi = (words[..., hi_idx] & hi_mask) << hi_shift
    return (lo | hi).reshape(*lead, chunks * 32)[..., :n]


def unpack_bits(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of pack_bits: the first n codes along the last dim, as `dtype` (uint8 or int32)."""
    _check_bits(bits)
    if packed.dtype not in _WIDTH:
        raise LowbitError(f"packed codes must be int32 or uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_len(n, bits, packed.dtype):
        raise LowbitError(f"packed codes have {packed.shape[-1]} words per row, expected "
                          f"{packed_len(n, bits, packed.dtype)} for {n} codes of {bits} bits")
    if packed.dtype == torch.int32 and 2 <= bits <= 8:
        return _unpack_int32(packed, bits, n).to(dtype)
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
    return c[..., :n].to(dtype)
