"""Fast dequantization of QuantLinear storage to a dense weight, optionally through torch.compile.

Storage: unsigned codes packed little-endian into int32 words (lowbit.core.packing layout), or
torch's int4 kernel layout. These functions run on every forward of the dequant path, so they
avoid int64 bit streams and fuse well under inductor.
"""

from __future__ import annotations

import logging

import torch

from lowbit.core.packing import unpack_bits
from lowbit.nn import int4_layout

log = logging.getLogger(__name__)


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


def dequant_int4pack(packed: torch.Tensor, sz: torch.Tensor, n: int, k: int,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dense [N, K] weight from the int4 kernel layout and its scales_and_zeros [K/g, N, 2].

    Works on the contiguous [N/64, K, 64] block view and transposes once at the end.
    """
    groups, nb = sz.shape[0], n // int4_layout.BLOCK_N
    half = int4_layout.BLOCK_N // 2
    b = packed.view(nb, k, half)
    q = torch.cat([b & 15, b >> 4], dim=-1).view(nb, groups, k // groups, 2 * half).float() - 8
    s = sz[..., 0].float().view(groups, nb, 2 * half).permute(1, 0, 2).unsqueeze(2)
    z = sz[..., 1].float().view(groups, nb, 2 * half).permute(1, 0, 2).unsqueeze(2)
    w = (q * s + z).to(out_dtype)
    return w.view(nb, k, 2 * half).transpose(1, 2).reshape(n, k)


def dequant_int8(w: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (w.float() * scale.float().reshape(-1, 1)).to(out_dtype)


class MaybeCompiled:
    """Calls torch.compile(fn) when enabled and working; falls back to eager once on failure.

    Shapes are static (a dynamic-shape kernel measured 30x slower here); each layer shape is
    one specialization, so the per-function recompile limit is raised for these calls only.
    """

    RECOMPILE_LIMIT = 64

    def __init__(self, fn):
        self.fn = fn
        self._compiled = None
        self._broken = False

    def __call__(self, *args, compile: bool = True, **kwargs):
        if compile and not self._broken:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=False)
            try:
                with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT):
                    return self._compiled(*args, **kwargs)
            except Exception as e:  # no C++ compiler, unsupported op, ...
                log.warning("torch.compile of %s failed (%s); using eager dequantization", self.fn.__name__, e)
                self._broken = True
        return self.fn(*args, **kwargs)


dequant_packed_fast = MaybeCompiled(dequant_packed)
dequant_int4pack_fast = MaybeCompiled(dequant_int4pack)
dequant_int8_fast = MaybeCompiled(dequant_int8)
