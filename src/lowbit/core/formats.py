"""Value tables of the non-uniform 4-bit formats and the float8 dtypes."""

from __future__ import annotations

import torch

# QLoRA's NormalFloat4: quantiles of N(0,1) normalised to [-1, 1], with an exact zero (bitsandbytes order).
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 E2M1 by its bit pattern: code = sign<<3 | exponent<<1 | mantissa.
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_VALUES = _E2M1_MAGNITUDES + tuple(-v for v in _E2M1_MAGNITUDES)

# bitsandbytes' "fp4" table by code (quantize_4bit(quant_type="fp4")): not E2M1's order nor scale.
BNB_FP4_VALUES = tuple(v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                          -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0))

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def codebook(dtype: str) -> torch.Tensor:
    """The 16 values a 4-bit codebook dtype can represent, indexed by code."""
    if dtype == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if dtype == "fp4":
        return torch.tensor(FP4_VALUES, dtype=torch.float32)
    raise ValueError(f"{dtype!r} is not a codebook dtype")


def codebook_max(dtype: str) -> float:
    return 1.0 if dtype == "nf4" else 6.0


def fp8_max(dtype: str) -> float:
    return float(torch.finfo(FP8_DTYPES[dtype]).max)


def nearest_code(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table value for each element of x (x already divided by its scale)."""
    order = torch.argsort(table)
    sorted_vals = table[order]
    mids = (sorted_vals[1:] + sorted_vals[:-1]) / 2
    pos = torch.bucketize(x.contiguous(), mids)
    return order[pos].to(torch.uint8)
