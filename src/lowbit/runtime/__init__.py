"""Speed machinery for running quantized models: compiled static-cache decoding."""

from lowbit.runtime.decode import compiled_decode, eager_decode

__all__ = ["compiled_decode", "eager_decode"]
