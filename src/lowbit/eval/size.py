"""Size on disk and in memory, and effective bits per weight of the quantizable Linears."""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.models.arch import arch_for, get_module


def disk_bytes(path: str | Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def memory_bytes(model) -> int:
    """Bytes of all parameters and buffers, shared storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta:
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def bits_per_weight(model) -> float:
    """Storage bits per weight over the decoder blocks' Linears (codes, scales and zeros counted)."""
    from lowbit.nn import QuantLinear

    arch = arch_for(model)
    bits = n = 0.0
    for i, block in enumerate(get_module(model, arch.blocks)):
        for name in arch.linears:
            mod = get_module(block, name)
            if isinstance(mod, QuantLinear):
                count = mod.in_features * mod.out_features
                bits += mod.bits_per_weight() * count
            else:
                count = mod.weight.numel()
                bits += torch.finfo(mod.weight.dtype).bits * count
            n += count
    return bits / n
