"""Running quantized models: compiled static-cache decoding, and process settings (`configure`)."""

from lowbit.runtime.configure import configure
from lowbit.runtime.decode import compiled_decode, eager_decode

__all__ = ["compiled_decode", "configure", "eager_decode"]
