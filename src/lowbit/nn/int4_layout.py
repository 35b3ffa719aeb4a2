"""torch's CPU int4 kernel layout: packing, unpacking and the scales_and_zeros tensor.

`torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes [N, K] int32 in 0..15, 1)` returns
uint8 [N, K/2]. For N a multiple of 64 (checked by tests against the kernel itself) it is
blocked as [N/64, K, 32] bytes whose low nibble holds row j and high nibble row j + 32 of
the 64-row block. `_weight_int4pack_mm_for_cpu` computes w = (q - 8) * scale + zero_float.
"""

from __future__ import annotations

import torch

KERNEL_GROUPS = (256, 128, 64, 32)
BLOCK_N = 64


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def kernel_group(in_features: int, group_size: int | None) -> int | None:
    """The kernel group size for a spec's group (None = one scale per row): or None if unsupported."""
    if group_size is not None:
        return group_size if group_size in KERNEL_GROUPS and in_features % group_size == 0 else None
    for g in KERNEL_GROUPS:
        if in_features % g == 0:
            return g
    return None


def pack(codes_u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes [N, K] (0..15) -> kernel layout uint8 [N, K/2]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes_u.to(torch.int32).contiguous(), 1)


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Kernel layout uint8 [N, K/2] -> unsigned codes uint8 [N, K]."""
    b = packed.view(n // BLOCK_N, k, BLOCK_N // 2).transpose(1, 2)
    return torch.cat([b & 15, b >> 4], dim=1).reshape(n, k)


def scales_and_zeros(scale: torch.Tensor, zero_float: torch.Tensor | None, kgroup: int,
                     out_features: int, in_features: int) -> torch.Tensor:
    """bf16 [K/kgroup, N, 2] from scale [N|1, G|1] and the additive zero_float (same shape)."""
    shape = (out_features, in_features // kgroup)
    s = scale.float().expand(shape)  # per-channel / per-tensor repeat across kernel groups
    z = torch.zeros(shape) if zero_float is None else zero_float.float().expand(shape)
    return torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()
