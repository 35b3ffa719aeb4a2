"""Quantization methods the pipeline runs, one per file, behind `lowbit.methods.base.Method`.

    get_method("gptq", damp=0.02)       # or get_method("gptq", {"damp": 0.02})
"""

from __future__ import annotations

from lowbit.errors import LowbitError
from lowbit.methods.awq import AWQ
from lowbit.methods.awq_gptq import AWQGPTQ
from lowbit.methods.base import Method
from lowbit.methods.gptq import GPTQ
from lowbit.methods.hqq import HQQ
from lowbit.methods.rtn import RTN

METHODS: dict[str, type[Method]] = {m.name: m for m in (RTN, GPTQ, AWQ, AWQGPTQ, HQQ)}


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str, options=None, **kwargs) -> Method:
    """A method by name, its options validated (unknown keys and wrong types raise LowbitError)."""
    if name not in METHODS:
        raise LowbitError(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
    return METHODS[name](options, **kwargs)


__all__ = ["METHODS", "Method", "get_method", "method_names"]
