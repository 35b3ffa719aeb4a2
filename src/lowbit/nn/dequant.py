"""Dequantization of QuantLinear storage to a dense weight in plain torch (the path for layouts
the compiled kernels do not cover, and the reference they are tested against).

Storage: unsigned codes packed little-endian into int32 words (lowbit.core.packing layout).
"""

from __future__ import annotations

import torch

from lowbit.core.packing import unpack_bits


def expand_cols(p: torch.Tensor, n: int, k: int, group_size: int | None,
                g_idx: torch.Tensor | None) -> torch.Tensor:
    """[N|1, G|1] parameter -> broadcastable against [N, K] (full [N, K] only with g_idx)."""
    if g_idx is not None:
        return p.expand(n, p.shape[1])[:, g_idx]
    if group_size is None or p.shape[1] == 1:
        return p
    return p.repeat_interleave(group_size, dim=1)


def dequant_packed(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   table: torch.Tensor | None, bits: int, k: int, group_size: int | None,
                   g_idx: torch.Tensor | None, mode: str, offset: int,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dense [N, K] weight from pack_bits storage.

    mode: "int" (w = (u - offset - zero) * scale), "int_scaled_zero" (w = u * scale - zero), "table" (w = table[u] * scale),
    "fp8_e4m3" / "fp8_e5m2" (u is the float8 bit pattern).
    """
    n = qweight.shape[0]
    codes = unpack_bits(qweight, bits, k, torch.int32)
    if mode == "int_scaled_zero":  # w = u·scale − zero (llama.cpp's min form)
        v = codes.float() * expand_cols(scale.float(), n, k, group_size, g_idx)
        return (v - expand_cols(zero.float(), n, k, group_size, g_idx)).to(out_dtype)
    if mode == "int":
        v = codes.float()
        if zero is not None:
            v = v - expand_cols(zero.float(), n, k, group_size, g_idx)
        elif offset:
            v = v - offset
    elif mode == "table":
        v = table[codes.long()]
    else:
        dt = torch.float8_e4m3fn if mode == "fp8_e4m3" else torch.float8_e5m2
        v = codes.to(torch.uint8).view(dt).float()
    return (v * expand_cols(scale.float(), n, k, group_size, g_idx)).to(out_dtype)
