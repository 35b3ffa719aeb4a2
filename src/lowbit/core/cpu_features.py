"""What this CPU's instruction sets make fast, read once from /proc/cpuinfo (Linux).

Matmuls in bfloat16 are ~2.4x faster than float32 on CPUs with AVX-512 BF16 (or AMX), but ~50x
slower on CPUs without them (measured on an AVX2-only AMD EPYC: a 4096 x 384 x 1536 bf16 matmul
3.9 s against 75 ms in float32), and torch's CPU `_int_mm` is ~50x slower than a float32 matmul
without VNNI. Every place that picks a compute dtype or the integer matmul asks here, so a model
never silently runs 50x slower on a CPU that lacks those units. LOWBIT_COMPUTE_DTYPE=float32|bfloat16
overrides the choice.
"""

from __future__ import annotations

import functools
import os

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags as Linux lists them, or None where /proc/cpuinfo does not exist."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


@functools.cache
def this_cpu_flags() -> set[str] | None:
    """This machine's flags, read once per process."""
    return cpu_flags()


def fast_bf16(flags: set[str] | None = None) -> bool:
    """Whether bfloat16 matmuls run on native units here (AVX-512 BF16 or AMX). Unknown flags (not
    Linux): trust torch's own reading of the CPU (AVX-512 capable)."""
    flags = this_cpu_flags() if flags is None else flags
    if flags is None:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return any(f in flags for f in BF16_FLAGS)


def fast_int8(flags: set[str] | None = None) -> bool:
    """Whether int8 x int8 -> int32 matmuls (`torch._int_mm`) have native dot-product units (VNNI, AMX)."""
    flags = this_cpu_flags() if flags is None else flags
    if flags is None:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return any(f in flags for f in INT8_FLAGS)


def compute_dtype() -> torch.dtype:
    """bfloat16 where it is fast, float32 elsewhere (the dtype of dequantized weights, calibration
    activations and QLoRA's frozen base)."""
    forced = os.environ.get("LOWBIT_COMPUTE_DTYPE", "").lower()
    if forced in ("float32", "bfloat16"):
        return getattr(torch, forced)
    return torch.bfloat16 if fast_bf16() else torch.float32
