"""lowbit: make trained models smaller and faster, and measure exactly what that cost.

    import lowbit
    model, tok = lowbit.quantize("default", method="gptq", bits=4, group_size=64, out="out/w4g64")
    model, tok = lowbit.load("out/w4g64")
    records = lowbit.quantize_module(cnn, calibration_batches, method="gptq", bits=4)  # any nn.Module

Importing lowbit changes no process-wide state (threads, allocator, compile flags); the CLI sets
them through `lowbit.runtime.configure()`.
"""

from lowbit.spec import PRESETS, QuantSpec, preset

__version__ = "0.1.0"


def quantize(model: str = "default", **kwargs):
    """See `lowbit.api.quantize`."""
    from lowbit.api import quantize as _quantize

    return _quantize(model, **kwargs)


def quantize_module(model, batches=None, **kwargs):
    """See `lowbit.api.quantize_module`: GPTQ / RTN for any nn.Module (CNNs, encoders)."""
    from lowbit.api import quantize_module as _quantize_module

    return _quantize_module(model, batches, **kwargs)


def load(path):
    """See `lowbit.api.load`."""
    from lowbit.api import load as _load

    return _load(path)


__all__ = ["QuantSpec", "PRESETS", "preset", "quantize", "quantize_module", "load", "__version__"]
