"""lowbit: make trained models smaller and faster, and measure exactly what that cost.

    import lowbit
    model, tok = lowbit.quantize("default", method="gptq", bits=4, group_size=64, out="out/w4g64")
    model, tok = lowbit.load("out/w4g64")

Importing lowbit changes no process-wide state (threads, allocator, compile flags); the CLI sets
them through `lowbit.runtime.configure()`.
"""

from lowbit.spec import PRESETS, QuantSpec, preset

__version__ = "0.1.0"


def quantize(model: str = "default", **kwargs):
    """See `lowbit.api.quantize`."""
    from lowbit.api import quantize as _quantize

    return _quantize(model, **kwargs)


def load(path):
    """See `lowbit.api.load`."""
    from lowbit.api import load as _load

    return _load(path)


__all__ = ["QuantSpec", "PRESETS", "preset", "quantize", "load", "__version__"]
