"""Method names -> (key quantizer, value quantizer) pairs for the KV cache."""

from __future__ import annotations

from ..errors import LowbitError
from .base import VectorQuantizer
from .kivi import KIVI
from .polarquant import PolarQuant
from .qjl import QJL
from .turboquant import TurboQuantMSE, TurboQuantProd

__all__ = ["METHODS", "make_kv_quantizers"]

#: method -> (how keys are quantized, how values are quantized); documentation and CLI choices
METHODS = {
    "turboquant": "keys and values: TurboQuantMSE",
    "turboquant-prod": "keys: TurboQuantProd (unbiased scores); values: TurboQuantMSE",
    "polarquant": "keys and values: PolarQuant",
    "qjl": "keys: QJL sketch with bits·d sign bits; values: per-token asymmetric int (as in the QJL paper)",
    "kivi": "keys: per-channel asymmetric int over token groups; values: per-token asymmetric int",
}


def make_kv_quantizers(
    method: str, key_dim: int, value_dim: int, bits: float, seed: int = 0, group_size: int = 32, norm_bits: int = 16
) -> tuple[VectorQuantizer, VectorQuantizer]:
    """Build the key and value quantizers of one cache layer (``norm_bits``: TurboQuant's stored norms, 16 or 8)."""
    if method not in METHODS:
        raise LowbitError(f"unknown KV method {method!r}; choose one of {sorted(METHODS)}")
    if norm_bits != 16 and method != "turboquant":
        raise LowbitError(f"norm_bits={norm_bits!r} is a turboquant option; method={method!r} stores fp16 norms")
    if method == "turboquant":
        return (TurboQuantMSE(key_dim, bits, seed, norm_bits=norm_bits),
                TurboQuantMSE(value_dim, bits, seed + 1, norm_bits=norm_bits))
    if method == "turboquant-prod":
        return TurboQuantProd(key_dim, bits, seed), TurboQuantMSE(value_dim, bits, seed + 1)
    if method == "polarquant":
        return PolarQuant(key_dim, bits, seed), PolarQuant(value_dim, bits, seed + 1)
    gv = min(group_size, value_dim)
    if method == "qjl":
        return QJL(key_dim, bits, seed), KIVI(value_dim, bits, seed + 1, mode="value", group_size=gv)
    return (
        KIVI(key_dim, bits, seed, mode="key", group_size=group_size),
        KIVI(value_dim, bits, seed + 1, mode="value", group_size=gv),
    )
